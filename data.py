"""Data for every CoLA stage: an embedded corpus, synthetic RL tasks with checkers, token shards and loaders.

What it provides, and which part of ../shared/cola-spec.md each piece serves:
  - `stdlib_docs()`: real natural language with no download: the docstrings of Python's standard library, read
    with `ast` (nothing is imported), cached under data/cache/. Stands in for SlimPajama & co. (section 3).
  - Synthetic tasks with reference solutions and rule-based checkers (section 4, "Rewards: rule-based"):
    Countdown in the "thinking format" (<think> ... </think> <answer> equation </answer>) and multi-step arithmetic
    word problems answered in \\boxed{}. `Problem`, `make_countdown`, `make_arith`, `make_problems`, `reward`.
  - `embedded_corpus(split)`: docstrings mixed with task texts, with held-out "val" documents and problems: the
    pre-training text of Algorithm 1 (stage A, IDM + world model; stage B, policy behaviour cloning).
  - `task_sft_records`: fresh prompt/response pairs for FTA-I / FTA-P and the token-level "Llama SFT" baseline
    (section 3, post-training); `load_sft_jsonl`, `encode_sft` (loss on response tokens only) and `SFTLoader`.
  - `prepare` / `prepare_embedded`: documents -> uint32 token shards, each document <|begin_of_text|> ... 
    <|end_of_text|> ("documents packed, separated by EOS", section 3); `TokenLoader` packs them into windows of
    seq_len + 1 tokens, sharded over ranks, resumable.

Commands:
    python data.py sample --kind countdown -n 3              # print fresh problems and reference solutions
    python data.py sample --kind arith -n 3 --split val
    python data.py embedded --out data/embedded             # train/ and val/ shards of the embedded corpus
    python data.py prepare --out data/mycorpus a.txt b.jsonl [--tokenizer Meta-Llama-3.1-8B/tokenizer.model]
    python data.py sft --kind countdown --split train -n 5000 --out data/countdown_sft.jsonl

Formats (choices made here):
  - .txt input: documents separated by a form feed (\\f); a file without one is one document. Each document is
    stripped of surrounding whitespace; empty ones are skipped. (Blank lines are paragraph breaks, not document
    breaks.) .jsonl input: one JSON object per line with a string "text", used verbatim.
  - Shards: out_dir/shard_00000.bin ... (raw uint32 token ids, numpy tofile) and out_dir/meta.json; every file is
    written under a temporary name and renamed into place (os.replace), so a reader never sees half a shard.
  - Windows: stride seq_len with a one-token overlap: window i = stream[i*T : i*T + T + 1], so every token after
    the first is a target exactly once per epoch. Window order is a permutation seeded by (seed, epoch), epochs
    end to end; each optimizer step takes the next global-batch positions and rank r of W reads the r-th
    contiguous W-th of them (EpochOrder), so the data of a step does not depend on the world size.
  - SFT records longer than seq_len + 1 tokens are truncated on the right (one warning per call with the count);
    a record whose prompt alone fills the window has no response token left and is dropped (counted too).
  - Splits: a document or problem is "val" when the blake2b hash of its text (of its prompt, for problems) falls
    in the lowest 5%; identical texts therefore always land in the same split, and train/val never overlap.
  - Mix: tasks are 20% of the embedded corpus's characters (countdown and arithmetic alternate), docstrings 80%.

Deviations from the paper / official code:
  - Pre-training text is Python's stdlib docstrings (~1.2 MB, English technical prose with some code) plus
    synthetic tasks, instead of SlimPajama, StarCoder, Proof-Pile-2 and WuDao (~1T tokens).
  - RL tasks are our own Countdown (TinyZero-style prompt, shortened) and templated arithmetic word problems
    instead of MATH / agent benchmarks; the checkers follow the same rules (0/1 on the final answer).
  - Countdown reward: 1.0 when the last <answer> uses each given number exactly once (TinyZero convention) and
    equals the target under exact rational arithmetic (fractional intermediate results are allowed in answers;
    generated problems only use integer ones); 0.1 (`format_score`) for a well-formed <think>..</think>
    <answer>..</answer> completion with a wrong answer, as TinyZero; else 0.0.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import sys
import sysconfig
import warnings
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from tokenizer import ChatFormat, Tokenizer

ROOT = Path(__file__).resolve().parent
CACHE_DIR = ROOT / "data" / "cache"          # gitignored
DATA_VERSION = 1                             # bump when the extraction or the task templates change
MIN_DOC_CHARS = 200                          # keep docstrings of at least this many characters
VAL_FRACTION = 0.05                          # share of documents / problems held out as "val"
TASK_SHARE = 0.20                            # share of the embedded corpus's characters that are task texts
KINDS = ("countdown", "arith")
SPLITS = ("train", "val")


# ----------------------------------------------------------------------------------------------------------------
# Natural text: the standard library's docstrings, parsed, never imported

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """All .py files of this Python's standard library, in sorted order, minus tests and tools."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, subdirs, names in os.walk(root):
        subdirs[:] = sorted(s for s in subdirs if s not in SKIP_DIRS)
        files += [Path(d) / n for n in names if n.endswith(".py")]
    return sorted(files)


def extract_docstrings(files: Iterable[Path]) -> list[str]:
    """Module, class and function docstrings (cleaned like inspect.cleandoc) of >= MIN_DOC_CHARS characters,
    in file order then source order, first occurrence kept. Files that do not parse are skipped."""
    docs, seen = [], set()
    for path in files:
        try:
            with warnings.catch_warnings():                    # invalid escapes in old files warn on parse
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                                       ast.AsyncFunctionDef))]
        nodes.sort(key=lambda n: getattr(n, "lineno", 0))             # source order, module first
        for node in nodes:
            doc = ast.get_docstring(node, clean=True)                 # clean=True: inspect.cleandoc
            if doc is None:
                continue
            doc = "\n".join(line.rstrip() for line in doc.strip().splitlines())
            if len(doc) >= MIN_DOC_CHARS and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


_STDLIB_DOCS: list[str] | None = None


def stdlib_docs() -> list[str]:
    """The stdlib docstring corpus, one document per docstring; cached per Python version (~4 s to build)."""
    global _STDLIB_DOCS
    if _STDLIB_DOCS is None:
        v = sys.version_info
        cache = CACHE_DIR / f"stdlib_docs_py{v.major}.{v.minor}.{v.micro}_v{DATA_VERSION}.json"
        try:
            _STDLIB_DOCS = json.loads(cache.read_text(encoding="utf-8"))["docs"]
        except (OSError, ValueError, KeyError, TypeError):
            _STDLIB_DOCS = extract_docstrings(stdlib_files())
            if not _STDLIB_DOCS:
                raise RuntimeError(f"data: no docstrings found under {sysconfig.get_paths()['stdlib']}")
            atomic_write_text(cache, json.dumps({"python": sys.version, "docs": _STDLIB_DOCS}))
    return list(_STDLIB_DOCS)


def split_of(text: str) -> str:
    """'val' for the VAL_FRACTION of texts whose hash is lowest, else 'train' (content-based, seed-free)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h % 10_000 < VAL_FRACTION * 10_000 else "train"


def check_split(split: str | None, allow_none: bool = False):
    if split not in SPLITS and not (allow_none and split is None):
        raise ValueError(f"data: split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tasks (spec section 4): a problem, its reference solution, and a rule-based checker

@dataclass
class Problem:
    kind: str              # "countdown" or "arith"
    prompt: str            # the question, ending in "\n"; the model's completion follows it
    answer: str            # reference final answer: an equation (countdown) or a number (arith)
    meta: dict = field(default_factory=dict)   # countdown: numbers, target; arith: template name
    response: str = ""     # reference solution text (think trace / steps, then the answer)

    @property
    def text(self) -> str:
        """Prompt and solution as one pre-training document."""
        return self.prompt + self.response

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(d["kind"], d["prompt"], d["answer"], dict(d.get("meta", {})), d.get("response", ""))


# --- Countdown: reach the target with + - * / using each number once ---

PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def render(e, parent: str | None = None, right: bool = False) -> str:
    """Expression tree (int or (op, left, right)) -> infix text with only the parentheses it needs."""
    if isinstance(e, int):
        return str(e)
    op, a, b = e
    s = f"{render(a, op)} {op} {render(b, op, True)}"
    if parent and (PREC[op] < PREC[parent] or (right and PREC[op] == PREC[parent] and parent in "-/")):
        s = f"({s})"
    return s


def combine(rng: random.Random, numbers: list[int]):
    """Combine random pairs with a random legal op until one value is left; every intermediate is a positive
    integer. Returns (value, expression tree, steps like '50 + 25 = 75')."""
    items, steps = [(n, n) for n in numbers], []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (a, ea), (b, eb) = items[i], items[j]
        ops = ["+", "*"] + (["-"] if a > b else []) + (["/"] if b > 1 and a % b == 0 else [])
        op = rng.choice(ops)
        v = {"+": a + b, "-": a - b, "*": a * b, "/": a // (b or 1)}[op]
        steps.append(f"{a} {op} {b} = {v}")
        items = [x for k, x in enumerate(items) if k not in (i, j)] + [(v, (op, ea, eb))]
    return items[0][0], items[0][1], steps


def make_countdown(rng: random.Random) -> Problem:
    """3-4 numbers in 1..99, a target in 1..999 reachable with all of them, and a think trace with one failed
    attempt then the construction that works."""
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        target, expr, steps = combine(rng, numbers)
        if not 1 <= target <= 999:
            continue
        for _ in range(20):                                   # a failed attempt: another order/ops, wrong value
            miss, _, miss_steps = combine(rng, numbers)
            if miss != target:
                break
        else:
            continue
        prompt = (f"Using the numbers {numbers}, create an equation that equals {target}. Use + - * / and each "
                  f"number exactly once. Show your work in <think> </think> and the equation in <answer> </answer>."
                  f"\n")
        answer = render(expr)
        response = (f"<think>\nTry {', '.join(miss_steps)}. {miss} is not {target}.\n"
                    f"Try {', '.join(steps)}. That is {target}.\n</think>\n<answer>{answer}</answer>")
        return Problem("countdown", prompt, answer, {"numbers": numbers, "target": target}, response)


def last_tag(text: str, tag: str) -> str | None:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
    return found[-1].strip() if found else None


THINK_FORMAT = re.compile(r"<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>).)*</answer>",
                          flags=re.DOTALL)


def safe_arith(expr: str) -> tuple[list[int], Fraction] | None:
    """Parse `expr` with ast (never eval): only non-negative integer literals, + - * / and parentheses.
    Returns (the literals used, exact value) or None if anything else appears or it divides by zero."""
    if len(expr) > 300:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = []
    ops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
           ast.Div: Fraction.__truediv__}

    def value(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            used.append(n.value)
            return Fraction(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](value(n.left), value(n.right))
        raise ValueError(f"not allowed: {type(n).__name__}")

    try:
        return used, value(tree.body)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def countdown_reward(problem: Problem, completion: str, format_score: float = 0.1) -> float:
    """1.0 if the last <answer> uses each listed number exactly once, nothing else, and equals the target;
    format_score if the completion is a well-formed <think>..</think><answer>..</answer> but wrong; else 0.0."""
    numbers, target = problem.meta["numbers"], problem.meta["target"]
    expr = last_tag(completion, "answer")
    parsed = safe_arith(expr) if expr else None
    if parsed is not None:
        used, v = parsed
        if sorted(used) == sorted(numbers) and v == target:
            return 1.0
    return format_score if THINK_FORMAT.fullmatch(completion.strip()) else 0.0


# --- Arithmetic word problems, 2-4 steps, answer in \boxed{} ---

NAMES = ["Tom", "Ana", "Ravi", "Mei", "Omar", "Lena", "Kofi", "Sara", "Ivan", "Yuki", "Lucas", "Nadia"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cards", "shells", "stamps", "coins"]
THINGS = ["bike", "game", "jacket", "lamp", "book set", "guitar"]


def arith_buy_give(r):
    n, it = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 30), r.randint(2, 6), r.randint(2, 12)
    s = a + b * c
    d = r.randint(1, s - 1)
    q = (f"{n} has {a} {it}. {n} buys {b} bags with {c} {it} each and gives away {d}. "
         f"How many {it} does {n} have now?")
    return q, [f"The bags hold {b} * {c} = {b * c} {it}.", f"After buying, {n} has {a} + {b * c} = {s} {it}.",
               f"After giving away {d}, {n} has {s} - {d} = {s - d} {it}."], s - d


def arith_savings(r):
    n, a, w = r.choice(NAMES), r.randint(3, 40), r.randint(2, 12)
    s = a * w
    b = r.randint(1, s - 1)
    q = (f"{n} saves {a} dollars every week for {w} weeks and then spends {b} dollars on a {r.choice(THINGS)}. "
         f"How many dollars does {n} have left?")
    return q, [f"{n} saves {a} * {w} = {s} dollars.", f"After spending {b}, {n} has {s} - {b} = {s - b} dollars."], \
        s - b


def arith_cookies(r):
    while True:
        t, c, p = r.randint(2, 6), r.randint(4, 12), r.randint(2, 9)
        total = t * c
        if (total - 1) // p >= 1:
            break
    per = r.randint(1, (total - 1) // p)
    k = total - p * per
    q = (f"A baker bakes {t} trays of {c} cookies. {k} cookies break, and the rest are shared equally among {p} "
         f"friends. How many cookies does each friend get?")
    return q, [f"There are {t} * {c} = {total} cookies.", f"After {k} break, {total} - {k} = {total - k} are left.",
               f"Each friend gets {total - k} / {p} = {per} cookies."], per


def arith_travel(r):
    v, h, u, g = r.randint(20, 120), r.randint(1, 6), r.randint(20, 120), r.randint(1, 6)
    q = (f"A train travels at {v} km per hour for {h} hours, then at {u} km per hour for {g} hours. "
         f"How many kilometres does it travel in total?")
    return q, [f"First part: {v} * {h} = {v * h} km.", f"Second part: {u} * {g} = {u * g} km.",
               f"Total: {v * h} + {u * g} = {v * h + u * g} km."], v * h + u * g


def arith_change(r):
    while True:
        n, p, m, c = r.randint(1, 6), r.randint(2, 9), r.randint(1, 6), r.randint(1, 5)
        cost = n * p + m * c
        bills = [b for b in (20, 50, 100) if b > cost]
        if bills:
            break
    name, bill = r.choice(NAMES), r.choice(bills)
    q = (f"{name} buys {n} notebooks at {p} dollars each and {m} pens at {c} dollars each, paying with a "
         f"{bill}-dollar bill. How much change does {name} get?")
    return q, [f"Notebooks cost {n} * {p} = {n * p} dollars.", f"Pens cost {m} * {c} = {m * c} dollars.",
               f"Together {n * p} + {m * c} = {cost} dollars.", f"The change is {bill} - {cost} = {bill - cost} "
               f"dollars."], bill - cost


def arith_pencils(r):
    c, s, k = r.randint(2, 9), r.randint(15, 35), r.randint(2, 5)
    x = r.randint(1, c * s - 1)
    q = (f"A school has {c} classes of {s} students. {x} students are absent today, and each student present "
         f"gets {k} pencils. How many pencils are handed out?")
    return q, [f"There are {c} * {s} = {c * s} students.", f"Present: {c * s} - {x} = {c * s - x} students.",
               f"Pencils: {c * s - x} * {k} = {(c * s - x) * k}."], (c * s - x) * k


def arith_ages(r):
    n, a, b, k = r.choice(NAMES), r.randint(3, 15), r.randint(1, 8), r.randint(3, 5)
    q = (f"{n} is {a} years old. {n}'s brother is {b} years older, and their grandmother is {k} times as old as "
         f"the brother. How old is the grandmother?")
    return q, [f"The brother is {a} + {b} = {a + b} years old.",
               f"The grandmother is {a + b} * {k} = {(a + b) * k} years old."], (a + b) * k


def arith_orchard(r):
    rows, c, f, bx = r.randint(2, 8), r.randint(3, 10), r.randint(4, 20), r.randint(2, 10)
    total = rows * c * f
    full = total // bx                                         # >= 2 full boxes since total >= 24, bx <= 10
    g = total % bx + bx * r.randint(0 if total % bx else 1, min(3, full - 1))   # 1 <= g <= total - bx
    good = total - g
    q = (f"A farmer plants {rows} rows of {c} trees. Each tree gives {f} apples, and {g} apples are rotten. The "
         f"good apples are packed in boxes of {bx}. How many boxes are filled?")
    return q, [f"There are {rows} * {c} = {rows * c} trees.", f"They give {rows * c} * {f} = {total} apples.",
               f"Good apples: {total} - {g} = {good}.", f"Boxes: {good} / {bx} = {good // bx}."], good // bx


ARITH_TEMPLATES = [arith_buy_give, arith_savings, arith_cookies, arith_travel, arith_change, arith_pencils,
                   arith_ages, arith_orchard]


def make_arith(rng: random.Random) -> Problem:
    """A word problem from one of the templates; the solution is one line per step, then \\boxed{answer}."""
    template = rng.choice(ARITH_TEMPLATES)
    question, steps, answer = template(rng)
    prompt = f"{question} Solve step by step and put the final answer in \\boxed{{}}.\n"
    response = "\n".join(steps) + f"\nThe answer is \\boxed{{{answer}}}."
    return Problem("arith", prompt, str(answer), {"template": template.__name__}, response)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def parse_number(s: str) -> Fraction | None:
    s = s.replace(" ", "").replace(",", "").replace("$", "").replace("\\!", "").rstrip(".")
    m = re.fullmatch(r"\\d?frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        s = f"{m[1]}/{m[2]}"
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def math_reward(problem: Problem, completion: str) -> float:
    """1.0 if the last \\boxed{} of the completion equals the answer as a number (20 == 20.0 == 40/2), else 0.0."""
    boxed = last_boxed(completion)
    got = parse_number(boxed) if boxed is not None else None
    return 1.0 if got is not None and got == parse_number(problem.answer) else 0.0


MAKERS = {"countdown": make_countdown, "arith": make_arith}
CHECKERS = {"countdown": countdown_reward, "arith": math_reward}


def reward(problem: Problem, completion: str) -> float:
    """Rule-based reward of a completion (the text generated after problem.prompt)."""
    if problem.kind not in CHECKERS:
        raise ValueError(f"data: no checker for problem kind {problem.kind!r}; kinds are {KINDS}")
    return CHECKERS[problem.kind](problem, completion)


def problem_stream(kind: str, seed: int, stream: str, split: str | None = None) -> Iterator[Problem]:
    """Endless problems of `kind` ("countdown", "arith" or "mix": alternating) from a named seed stream; with a
    split, only problems whose prompt hashes into it. Streams "pretrain", "sft" and "rl" give different problems."""
    if kind not in KINDS + ("mix",):
        raise ValueError(f"data: unknown task kind {kind!r}; use one of {KINDS + ('mix',)}")
    check_split(split, allow_none=True)
    rng = random.Random(f"{stream}:{kind}:{seed}")            # str seeds are hashed with sha512: stable everywhere
    i = 0
    while True:
        k = KINDS[i % 2] if kind == "mix" else kind
        i += 1
        p = MAKERS[k](rng)
        if split is None or split_of(p.prompt) == split:
            yield p


def make_problems(kind: str, n: int, seed: int, split: str | None = None, stream: str = "rl") -> list[Problem]:
    """n problems, deterministic from (kind, seed, split, stream). RL draws from stream "rl"."""
    it = problem_stream(kind, seed, stream, split)
    return [next(it) for _ in range(n)]


def task_sft_records(kind: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n {prompt, response, kind, answer, meta} records for FTA / SFT, from the "sft" stream (fresh problems,
    not the pre-training ones)."""
    check_split(split)
    return [p.to_dict() for p in make_problems(kind, n, seed, split, stream="sft")]


# ----------------------------------------------------------------------------------------------------------------
# The embedded corpus: docstrings + task texts, held-out val split

def embedded_corpus(split: str = "train", seed: int = 0) -> list[str]:
    """Documents of one split: the split's docstrings plus task texts (prompt + reference solution) making up
    TASK_SHARE of the characters, shuffled together with `seed`. Docstring membership does not depend on seed."""
    check_split(split)
    docs = [d for d in stdlib_docs() if split_of(d) == split]
    natural = sum(map(len, docs))
    budget = natural * TASK_SHARE / (1 - TASK_SHARE)          # task chars so that tasks / total = TASK_SHARE
    tasks, chars = [], 0
    for p in problem_stream("mix", seed, "pretrain", split):
        if chars >= budget:
            break
        tasks.append(p.text)
        chars += len(p.text)
    out = docs + tasks
    random.Random(f"corpus:{split}:{seed}").shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Documents -> uint32 token shards

def atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of one .txt (form-feed separated, stripped) or .jsonl ("text" field, verbatim) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} not found")
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"data: {path}: unsupported file type {path.suffix!r}; use .txt or .jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {path}: not UTF-8 text (byte {e.start})") from None
    if path.suffix == ".txt":
        yield from (d.strip() for d in text.split("\f") if d.strip())
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        rec = json_line(path, i, line)
        if not isinstance(rec.get("text"), str):
            raise ValueError(f'data: {path}:{i}: expected a JSON object with a string field "text"')
        if rec["text"]:
            yield rec["text"]


def json_line(path: Path, i: int, line: str) -> dict:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"data: {path}:{i}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"data: {path}:{i}: expected a JSON object, got {type(rec).__name__}")
    return rec


def write_shards(docs: Iterable[str], out_dir: str | Path, tokenizer: Tokenizer, shard_tokens: int = 50_000_000,
                 source: str = "") -> list[Path]:
    """Tokenize documents as <|begin_of_text|> doc <|end_of_text|>, concatenate, cut into shards of shard_tokens
    (documents may straddle shards: the loader reads them as one stream), write atomically, then meta.json.
    Shards left over from an earlier, longer run in out_dir are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.n_words > 2**32:
        raise ValueError(f"data: vocabulary of {tokenizer.n_words} does not fit uint32")
    paths, buf, buf_len, n_docs, n_tokens = [], [], 0, 0, 0

    def flush(arr: np.ndarray):
        path = out_dir / f"shard_{len(paths):05d}.bin"
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            arr.astype(np.uint32).tofile(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        paths.append(path)

    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32)
        buf.append(ids)
        buf_len += len(ids)
        n_docs += 1
        n_tokens += len(ids)
        while buf_len >= shard_tokens:
            cat = np.concatenate(buf)
            flush(cat[:shard_tokens])
            buf, buf_len = [cat[shard_tokens:]], len(cat) - shard_tokens
    if n_docs == 0:
        raise ValueError(f"data: {source or 'input'} contains no documents")
    if buf_len:
        flush(np.concatenate(buf))
    meta = {"tokenizer": tokenizer.model.name, "vocab_size": tokenizer.n_words, "n_tokens": n_tokens,
            "n_documents": n_docs, "dtype": "uint32", "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
            "shards": [p.name for p in paths], "source": source}
    atomic_write_text(out_dir / "meta.json", json.dumps(meta, indent=1))
    for stale in out_dir.glob("shard_*.bin"):
        if stale not in paths:
            stale.unlink()
    return paths


def finished_shards(out_dir: Path, tokenizer: Tokenizer, source: str) -> list[Path] | None:
    """The shards of out_dir if its meta.json records this source and tokenizer and every shard is there in full."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    paths = [out_dir / name for name in meta.get("shards", [])]
    same = (meta.get("source"), meta.get("tokenizer"), meta.get("vocab_size")) == \
        (source, tokenizer.model.name, tokenizer.n_words)
    if not (same and paths and all(p.is_file() for p in paths)):
        return None
    return paths if sum(p.stat().st_size for p in paths) == 4 * meta["n_tokens"] else None


def prepare(inputs: list[str | Path], out_dir: str | Path, tokenizer: Tokenizer,
            shard_tokens: int = 50_000_000) -> list[Path]:
    """.txt / .jsonl files -> out_dir/shard_*.bin (uint32) + meta.json. Every input is checked before writing."""
    if not inputs:
        raise ValueError("data: prepare got no input files")
    for p in inputs:
        if not Path(p).is_file():
            raise FileNotFoundError(f"data: {p} not found")
    docs = (d for p in inputs for d in read_documents(p))
    return write_shards(docs, out_dir, tokenizer, shard_tokens, source=", ".join(map(str, inputs)))


def prepare_embedded(out_dir: str | Path, tokenizer: Tokenizer, seed: int = 0) -> dict[str, list[Path]]:
    """The embedded corpus tokenized: out_dir/train/shard_*.bin and out_dir/val/shard_*.bin (+ meta.json each),
    once: later calls find the finished shards. Under torchrun call it on rank 0 first and barrier."""
    out = {}
    for split in SPLITS:
        d, source = Path(out_dir) / split, f"embedded:{split}:seed{seed}:v{DATA_VERSION}"
        out[split] = finished_shards(d, tokenizer, source) or write_shards(embedded_corpus(split, seed), d,
                                                                           tokenizer, source=source)
    return out


def list_shards(paths) -> list[Path]:
    """A path, a directory (its shard_*.bin, else *.bin, sorted) or a list of them -> shard files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("shard_*.bin")) or sorted(p.glob("*.bin"))
            if not found:
                raise FileNotFoundError(f"data: no .bin shards in {p}; run `python data.py prepare` first")
            out += found
        else:
            out.append(p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Loaders: deterministic, rank-sharded, resumable orders

class EpochOrder:
    """An endless, resumable order over n items that is the same for every world size.

    The global stream is perm_0 ++ perm_1 ++ ... where perm_e is a permutation of range(n) seeded by (seed, e).
    One optimizer step consumes the next `global_batch` positions of it. Rank r of W reads the contiguous slice
    [r * c, (r + 1) * c) of them (c = global_batch / W), in calls of take(micro batch). So a step's items, and how
    they group into micro batches, do not depend on W. The state is one global position, and a run resumes on
    another world size at the same place.
    """

    def __init__(self, n: int, rank: int, world_size: int, seed: int, global_batch: int, micro: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"data: rank {rank} is not in [0, world_size={world_size})")
        if micro <= 0 or global_batch % (world_size * micro):
            raise ValueError(f"data: global batch {global_batch} is not a multiple of world size {world_size} x "
                             f"micro batch {micro}")
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.global_batch, self.micro, self.chunk = global_batch, micro, global_batch // world_size
        self.step_start, self.offset = 0, 0     # global position of this step's first item; items taken of my chunk
        self._perms = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}     # keep at most two epochs
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._perms[epoch]

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The next k items of this rank -> (items [k], their global stream positions [k])."""
        if k != self.micro:
            raise ValueError(f"data: take({k}) but this order serves micro batches of {self.micro}")
        pos = self.step_start + self.rank * self.chunk + self.offset + np.arange(k)
        self.offset += k
        if self.offset == self.chunk:
            self.step_start, self.offset = self.step_start + self.global_batch, 0
        items = np.array([self.perm(int(p) // self.n)[int(p) % self.n] for p in pos], dtype=np.int64)
        return items, pos

    def state_dict(self) -> dict:
        return {"step_start": self.step_start, "offset": self.offset, "world_size": self.world_size,
                "global_batch": self.global_batch, "n": self.n, "seed": self.seed}

    def load_state_dict(self, d: dict, what: str):
        if d["n"] != self.n or d["seed"] != self.seed:
            raise ValueError(f"data: cannot resume {what}: saved for {d['n']} items with seed {d['seed']}, "
                             f"now {self.n} items with seed {self.seed} (the data or the seed changed)")
        if d["global_batch"] != self.global_batch:
            raise ValueError(f"data: cannot resume {what}: saved with global batch {d['global_batch']}, now "
                             f"{self.global_batch}")
        if d["offset"] and d["world_size"] != self.world_size:
            raise ValueError(f"data: cannot resume {what} on world size {self.world_size} in the middle of a "
                             f"step saved on world size {d['world_size']}")
        self.step_start, self.offset = d["step_start"], d["offset"]


class TokenLoader:
    """Batches [B, seq_len + 1] of packed token windows from uint32 shards read as one stream (np.memmap).
    Window i = stream[i*T : i*T + T + 1] (stride T, one token of overlap); train.py takes x = w[:, :-1],
    y = w[:, 1:]."""

    def __init__(self, paths, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 global_batch: int | None = None):
        self.paths = list_shards(paths)
        if not self.paths:
            raise ValueError("data: TokenLoader got no shard files")
        self.shards = []
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"data: shard {p} not found; run `python data.py prepare` first")
            size = p.stat().st_size
            if size == 0 or size % 4:
                raise ValueError(f"data: shard {p} has {size} bytes; expected a non-empty uint32 file")
            self.shards.append(np.memmap(p, dtype=np.uint32, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])     # stream offset of each shard
        self.n_tokens = int(self.starts[-1])
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_windows = max(self.n_tokens - 1, 0) // seq_len
        if self.n_windows == 0:
            names = ", ".join(map(str, self.paths))
            raise ValueError(f"data: {names} has {self.n_tokens} tokens, fewer than one window of seq_len+1 = "
                             f"{seq_len + 1}")
        global_batch = global_batch or batch_size * world_size
        self.order = EpochOrder(self.n_windows, rank, world_size, seed, global_batch, batch_size)
        self.steps_per_epoch = self.n_windows / global_batch           # may be fractional
        self.ids = None                   # global stream positions of the last batch's rows (seed per-row noise)

    def window(self, i: int) -> np.ndarray:
        """Tokens [T+1] of window i, read across a shard boundary if needed."""
        lo, hi = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        parts = []
        while lo < hi:
            s = int(np.searchsorted(self.starts, lo, side="right")) - 1
            end = min(hi, int(self.starts[s + 1]))
            parts.append(self.shards[s][lo - self.starts[s]:end - self.starts[s]])
            lo = end
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])

    def next_batch(self) -> torch.Tensor:
        idx, self.ids = self.order.take(self.batch_size)
        w = np.stack([self.window(int(i)) for i in idx]).astype(np.int64)  # [B, T+1]
        return torch.from_numpy(w)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "seq_len": self.seq_len}

    def load_state_dict(self, d: dict):
        if d.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"data: cannot resume TokenLoader: saved with seq_len {d['seq_len']}, now "
                             f"{self.seq_len}")
        self.order.load_state_dict(d, "TokenLoader")


# ----------------------------------------------------------------------------------------------------------------
# SFT data (FTA-I / FTA-P / token SFT): loss on response tokens only

def load_sft_jsonl(path: str | Path) -> list[dict]:
    """Records {"prompt": str, "response": str, ...} of a .jsonl file; one-line errors with file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: {path} not found")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json_line(path, i, line)
        if not (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str)):
            raise ValueError(f'data: {path}:{i}: expected string fields "prompt" and "response"')
        records.append(rec)
    if not records:
        raise ValueError(f"data: {path} has no records")
    return records


def encode_sft(records: list[dict], tokenizer: Tokenizer, seq_len: int, chat: bool = False):
    """Records -> (tokens LongTensor [N, T+1], loss_mask BoolTensor [N, T+1]); mask is True on response tokens and
    the closing eos (plain) / eot (chat). Plain: bos prompt response eos. Chat: Llama-3.1 dialog, user = prompt,
    assistant = response. Padded right with eos (mask False). Use mask[:, 1:] with targets tokens[:, 1:]."""
    L = seq_len + 1
    fmt = ChatFormat(tokenizer) if chat else None
    rows, masks, truncated, dropped = [], [], 0, 0
    for rec in records:
        if chat:
            head = fmt.encode_dialog_prompt([{"role": "user", "content": rec["prompt"]}])
            body = tokenizer.encode(rec["response"].strip(), bos=False, eos=False) + [tokenizer.eot_id]
        else:
            head = tokenizer.encode(rec["prompt"], bos=True, eos=False)
            body = tokenizer.encode(rec["response"], bos=False, eos=True)
        ids, m = head + body, [False] * len(head) + [True] * len(body)
        if len(ids) > L:
            truncated += 1
            ids, m = ids[:L], m[:L]
            if not any(m):                                     # the prompt alone fills the window
                dropped += 1
                continue
        rows.append(ids + [tokenizer.eos_id] * (L - len(ids)))
        masks.append(m + [False] * (L - len(m)))
    if truncated:
        warnings.warn(f"data: {truncated} of {len(records)} SFT records are longer than seq_len+1 = {L} tokens and "
                      f"were truncated ({dropped} dropped: no response token left)")
    if not rows:
        raise ValueError(f"data: no SFT record has a response token within seq_len+1 = {L} tokens")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)


class SFTLoader:
    """Batches (tokens [B, T+1], mask [B, T+1]) of encoded SFT records, shuffled per epoch, rank-sharded, endless,
    resumable, with the same order rules as TokenLoader."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, global_batch: int | None = None):
        if tokens.dim() != 2 or tokens.shape != mask.shape:
            raise ValueError(f"data: SFTLoader needs tokens and mask of the same shape [N, T+1], got "
                             f"{tuple(tokens.shape)} and {tuple(mask.shape)}")
        if len(tokens) == 0:
            raise ValueError("data: SFTLoader got no records")
        self.tokens, self.mask, self.batch_size = tokens, mask.bool(), batch_size
        global_batch = global_batch or batch_size * world_size
        self.order = EpochOrder(len(tokens), rank, world_size, seed, global_batch, batch_size)
        self.steps_per_epoch = len(tokens) / global_batch
        self.ids = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, self.ids = self.order.take(self.batch_size)
        idx = torch.from_numpy(idx)
        return self.tokens[idx], self.mask[idx]                            # [B, T+1], [B, T+1]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, d: dict):
        self.order.load_state_dict(d, "SFTLoader")


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl files into uint32 shards")
    p.add_argument("inputs", nargs="+", help=".txt (form-feed separated documents) or .jsonl (a 'text' field)")
    p.add_argument("--out", required=True, help="output directory for shard_*.bin and meta.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json (default: embedded bytes)")
    p.add_argument("--shard-tokens", type=int, default=50_000_000)
    p = sub.add_parser("embedded", help="write train/ and val/ shards of the embedded corpus")
    p.add_argument("--out", default="data/embedded")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("sample", help="print problems with their reference solutions and rewards")
    p.add_argument("--kind", default="countdown", choices=KINDS + ("mix",))
    p.add_argument("-n", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default=None, choices=SPLITS)
    p = sub.add_parser("sft", help="write SFT records (prompt, response, ...) as .jsonl")
    p.add_argument("--kind", default="countdown", choices=KINDS + ("mix",))
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    try:
        if args.cmd == "prepare":
            paths = prepare(args.inputs, args.out, Tokenizer(args.tokenizer), args.shard_tokens)
            print(json.loads((Path(args.out) / "meta.json").read_text()) | {"shards": [str(p) for p in paths]})
        elif args.cmd == "embedded":
            docs = stdlib_docs()
            print(f"stdlib docstrings: {len(docs)} documents, {sum(map(len, docs)):,} characters")
            for split, paths in prepare_embedded(args.out, Tokenizer(args.tokenizer), args.seed).items():
                meta = json.loads((Path(args.out) / split / "meta.json").read_text())
                print(f"{split}: {meta['n_documents']} documents, {meta['n_tokens']:,} tokens -> {paths}")
        elif args.cmd == "sample":
            for pr in make_problems(args.kind, args.n, args.seed, args.split):
                print(f"--- {pr.kind}  answer={pr.answer}  reward(reference)={reward(pr, pr.response)}")
                print(pr.prompt + pr.response)
        elif args.cmd == "sft":
            recs = task_sft_records(args.kind, args.split, args.n, args.seed)
            atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in recs))
            print(f"wrote {len(recs)} records to {args.out}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
