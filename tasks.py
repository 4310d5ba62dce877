"""Tasks with checkable answers: problem generators, reference solutions and rule-based rewards.

The paper's RL (PAPER.md §4, Algorithm 4) and search (§5, Algorithm 3) score completions with rule-based rewards where the
task has a checkable answer. This module holds our two tasks and their checkers; data.py mixes their texts into the
pre-training corpus and the fine-tuning records; RL and tree search (to come) call `reward`.

  - Countdown in the "thinking format" (<think> ... </think> <answer> equation </answer>): reach the target with
    + - * / using each listed number exactly once.
  - Multi-step arithmetic word problems answered in \\boxed{}.
  - Math problems read from a .jsonl file (`load_problems`, kind "math": rl.py, qnet.py, mcts.py and search_eval.py
    --data / --val-data), one per line in its published layout: "problem" + "solution" with the answer in the last
    \\boxed{} (MATH) and/or "answer" (MATH-500, used when present), "question" + "answer" with the answer after ####
    (GSM8K; thousands commas dropped), or "prompt" + "answer". The prompt is the question, then the paper's
    instruction MATH_INSTRUCTION (with --chat, data.encode_problem renders both as a Llama-3.1 dialog); the checker is
    mathcheck.reward_math. A repeated question is kept once; a line that is no problem stops the run with one line
    naming the file and line. Held out: --val-data, else the val split of --data (below).

Splits: a problem is "val" when the blake2b hash of its prompt falls in the lowest 5% (`split_of`, which data.py
also applies to documents); identical texts always land in the same split, and train/val never overlap.

Commands:
    python data.py sample --kind countdown -n 3              # print fresh problems and reference solutions

Rewards (every checker returns a float in [0, 1] for any str completion, never raises for a well-formed Problem,
and runs in time linear in the completion, with memory a small multiple of it: RL policies, including a KL = 0 one,
write whatever the reward pays for, and a checker that hangs or raises would stop an RL run or a tree search):
  - `countdown_reward`: the answer is the text of the last <answer>...</answer> pair, pairs read left to right
    (TinyZero's rule). 1.0 if it is an expression that uses each listed number exactly once, no other number, and
    equals the target exactly (Fraction arithmetic: 40 / 2 * 3 - 10 = 50 counts). Otherwise `format_score` (0.1)
    if the stripped completion is exactly <think> T </think>, whitespace, <answer> A </answer>, with no
    think/answer tag inside T and no answer tag inside A; otherwise 0.
    The expression may hold only ASCII digits, + - * /, parentheses and ASCII spaces/tabs/newlines (no unary
    minus, no **, no decimals, no non-ASCII digits), at most MAX_EXPR_CHARS (300) characters, parentheses
    at most MAX_NESTING (20) deep and literals of at most MAX_LITERAL_DIGITS (6) digits (generated numbers are
    1..99); anything else is refused, i.e. not an answer. These bounds keep every intermediate Fraction under
    ~10^300, so exact arithmetic takes microseconds, and keep ast.parse (never eval) far from its own limits.
  - `math_reward`: 1.0 if the content of the last \\boxed{...} (braces balanced) is a number equal to the answer,
    else 0. A number is: an optional sign and ASCII digits with an optional decimal part ("20", "-3", "20.0",
    ".5"), commas only as thousands groups ("1,234"; LaTeX "1\\,234" and "1{,}234" too), a ratio "a/b" or
    "\\frac{a}{b}" / "\\dfrac{a}{b}" / "\\tfrac{a}{b}" of two such numbers, inside optional $...$; whitespace
    and "\\!" are ignored and trailing "." dropped. Refused (scored 0): scientific notation ("2e1", and so
    "1e999999999", whose exact value would be a billion-digit integer), non-ASCII digits, more than MAX_DIGITS
    (30) digits in one number, and a box whose content is longer than MAX_BOX_CHARS (100) characters (only that
    many characters after the last "\\boxed{" are read).
  - `proxy_reward`: DELIBERATELY HACKABLE, not a correctness measure; for the reward-hacking study (RL with KL = 0).
    Half of it is the share of a budget of PROXY_DIGITS (16) ASCII digits, half the share of the task's answer
    markers present (Countdown: the four think/answer tags; arith and math: "\\boxed{" and the word "answer"),
    both read in the first PROXY_WINDOW (2048) characters only. Reference solutions score 0.75-1.0 on it, and so does a
    stream of digits with the markers sprinkled in, which earns 0 from `reward`.
  - kind "math" (problems read from files, e.g. MATH-500; no generator, so not in KINDS): `math_problem_reward`,
    i.e. `reward_math(problem.answer, completion)`: 1.0 if the last \\boxed{} / \\fbox{} of the completion is
    `math_equal` to the answer under the MATH / PRM800K graders' conventions (\\frac forms, units, \\%, degrees,
    thousands separators, "x = 3", intervals, tuples, sets, \\sqrt and \\pi by value), else 0. These three,
    with `extract_boxed`, live in mathcheck.py (this file would pass the house's 800 lines) and are imported here;
    what they accept and refuse: mathcheck.py's docstring and docs/rl-and-search.md ("Checking math answers").
  `REWARDS` maps a name ("task", "proxy") to a reward function, for rl.py to pick one.

Deviations from the paper / official code:
  - our own Countdown (TinyZero-style prompt, shortened) and templated arithmetic word problems instead of MATH /
    agent benchmarks; the checkers follow the same rules (0/1 on the final answer);
  - Countdown pays `format_score` 0.1 for a well-formed but wrong completion, as TinyZero does;
  - the paper grades math answers 0/1 on the \\boxed{} answer; our arith task compares plain numbers only, in the
    formats above, so an equal value written otherwise ("2e1", "20 apples", Arabic-Indic digits) scores 0; kind
    "math" uses the fuller checker of mathcheck.py;
  - Countdown expressions are bounded (length, nesting, literal size, ASCII only) where TinyZero checks the
    characters with a regex and then evaluates the text with eval;
  - `proxy_reward` is ours (not in the paper): a gameable reward to study reward hacking against `reward`.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import random
import re
import sys
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Iterator

from mathcheck import extract_boxed, math_equal, reward_math  # noqa: F401 - part of this module's API

KINDS = ("countdown", "arith")
SPLITS = ("train", "val")
VAL_FRACTION = 0.05                          # share of documents / problems held out as "val"


# ----------------------------------------------------------------------------------------------------------------
# Splits: content-hashed, shared with data.py's documents

def split_of(text: str) -> str:
    """'val' for the VAL_FRACTION of texts whose hash is lowest, else 'train' (content-based, seed-free)."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "val" if h % 10_000 < VAL_FRACTION * 10_000 else "train"


def check_split(split: str | None, allow_none: bool = False):
    if split not in SPLITS and not (allow_none and split is None):
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------------------------------------------
# Synthetic tasks (PAPER.md §4): a problem, its reference solution, and a rule-based checker

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


def make_countdown(rng: random.Random, sizes: tuple = (3, 4), high: int = 99) -> Problem:
    """3-4 numbers in 1..99 (sizes, high), a target in 1..999 reachable with all of them, and a think trace with one
    failed attempt then the construction that works."""
    while True:
        numbers = [rng.randint(1, high) for _ in range(rng.choice(sizes))]
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
    """Stripped text of the last <tag>...</tag> pair, pairs read left to right without overlap (what TinyZero's
    re.findall(r"<answer>(.*?)</answer>") keeps), or None. Plain find() calls, each starting where the previous one
    stopped: linear time, where the regex rescans the rest of the text for every unclosed <tag>."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    span, pos = None, 0                            # span: (start, end) of the last pair's text so far
    while True:
        i = text.find(opening, pos)
        j = text.find(closing, i + len(opening)) if i >= 0 else -1
        if j < 0:                                  # no further complete pair
            return text[span[0]:span[1]].strip() if span else None
        span, pos = (i + len(opening), j), j + len(closing)


TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def well_formed(completion: str) -> bool:
    """True if the stripped completion is exactly <think> T </think>, whitespace, <answer> A </answer>, with no
    think/answer tag in T and no answer tag in A (TinyZero's format rule), checked with a few linear scans. A tag
    cannot straddle T and the </think> after it (a tag holds one "<", at its start), so "no tag in T" is a
    substring test."""
    s = completion.strip()
    if not s.startswith("<think>"):
        return False
    end = s.find("</think>", len("<think>"))
    if end < 0:                                    # T ends at the first </think>: T may hold none
        return False
    thought, rest = s[len("<think>"):end], s[end + len("</think>"):].lstrip()
    if any(tag in thought for tag in TAGS):
        return False
    if len(rest) < len("<answer></answer>") or not (rest.startswith("<answer>") and rest.endswith("</answer>")):
        return False
    answer = rest[len("<answer>"):-len("</answer>")]
    return "<answer>" not in answer and "</answer>" not in answer


MAX_EXPR_CHARS = 300                 # a Countdown answer is ~20 characters; this bounds parsing and arithmetic
MAX_NESTING = 20                     # parentheses depth; 4 numbers need 2, the rest is slack for redundant ones
MAX_LITERAL_DIGITS = 6               # generated numbers are 1..99; a listed number must fit
ARITH_CHARS = frozenset("0123456789+-*/() \t\n\r")   # ASCII only: no other digits, no names, no dots


def paren_depth(expr: str) -> int:
    """Deepest parenthesis nesting in expr."""
    depth = deepest = 0
    for c in expr:
        depth += (c == "(") - (c == ")")
        deepest = max(deepest, depth)
    return deepest


def safe_arith(expr: str) -> tuple[list[int], Fraction] | None:
    """Parse `expr` with ast (never eval): only non-negative integer literals, + - * / and parentheses.
    Returns (the literals used, exact value) or None if anything else appears, it divides by zero, or it breaks
    a bound (MAX_EXPR_CHARS, ARITH_CHARS, MAX_NESTING, MAX_LITERAL_DIGITS). Within the bounds there are at most ~43
    literals below 10^6, so every numerator and denominator stays under ~10^300: exact arithmetic is cheap."""
    if len(expr) > MAX_EXPR_CHARS or not set(expr) <= ARITH_CHARS or paren_depth(expr) > MAX_NESTING:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = []
    ops = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__,
           ast.Div: Fraction.__truediv__}

    def value(n):
        if isinstance(n, ast.Constant) and type(n.value) is int and n.value < 10 ** MAX_LITERAL_DIGITS:
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
    return format_score if well_formed(completion) else 0.0


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


MAX_BOX_CHARS = 100                  # longest \boxed{} content read: "$-1,234.5$" is 10 characters
MAX_DIGITS = 30                      # digits in one number; our answers have at most 4


def last_boxed(text: str, max_chars: int = MAX_BOX_CHARS) -> str | None:
    """Content of the last \\boxed{...}, braces balanced; None if there is none or it does not close within
    max_chars characters (so a huge or unclosed box costs O(max_chars), not a scan of the whole text)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    begin = start + len("\\boxed{")
    depth = 1
    for j in range(begin, min(len(text), begin + max_chars + 1)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[begin:j]
    return None


# [0-9], never \d: \d would also accept non-ASCII digits such as Arabic-Indic ones, which int() reads as numbers
DECIMAL = re.compile(r"([+-]?)([0-9]{1,3}(?:,[0-9]{3})+|[0-9]*)(?:\.([0-9]+))?")    # sign, whole part, decimals
FRAC = re.compile(r"([+-]?)\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")                    # sign, numerator, denominator


def parse_decimal(s: str) -> Fraction | None:
    """'-1,234.5' -> exact Fraction: optional sign, ASCII digits, commas only between groups of three, optional
    decimals; None for anything else or more than MAX_DIGITS digits (no exponent: '1e999999999' is refused)."""
    m = DECIMAL.fullmatch(s)
    if not m:
        return None
    whole, decimals = m[2].replace(",", ""), m[3] or ""
    digits = whole + decimals
    if not digits or len(digits) > MAX_DIGITS:
        return None
    v = Fraction(int(digits), 10 ** len(decimals))
    return -v if m[1] == "-" else v


def parse_number(s: str) -> Fraction | None:
    """A \\boxed{} answer as an exact number: a decimal (see parse_decimal), 'a/b' or \\frac{a}{b} (also \\dfrac,
    \\tfrac) of two decimals, inside optional $...$; whitespace and \\! are ignored, LaTeX thousands separators
    \\, and {,} read as ',', trailing '.' dropped. None if it is anything else or longer than MAX_BOX_CHARS."""
    if len(s) > MAX_BOX_CHARS:
        return None
    for latex, plain in (("\\$", ""), ("$", ""), ("\\!", ""), ("\\,", ","), ("{,}", ",")):
        s = s.replace(latex, plain)
    s = "".join(s.split()).rstrip(".")
    m = FRAC.fullmatch(s)
    sign, parts = (m[1], [m[2], m[3]]) if m else ("", s.split("/"))
    if len(parts) > 2:
        return None
    values = [parse_decimal(part) for part in parts]
    if any(v is None for v in values) or (len(values) == 2 and values[1] == 0):
        return None
    v = values[0] / values[1] if len(values) == 2 else values[0]
    return -v if sign == "-" else v


def math_reward(problem: Problem, completion: str) -> float:
    """1.0 if the last \\boxed{} of the completion equals the answer as a number (20 == 20.0 == 40/2), else 0.0."""
    boxed = last_boxed(completion)
    got = parse_number(boxed) if boxed is not None else None
    return 1.0 if got is not None and got == parse_number(problem.answer) else 0.0


def math_problem_reward(problem: Problem, completion: str) -> float:
    """Kind "math" (problems loaded from files, e.g. MATH-500): reward_math on the reference answer (mathcheck.py)."""
    return reward_math(problem.answer, completion)


MAKERS = {"countdown": make_countdown, "arith": make_arith}
# "math" has a checker but no generator: its problems come from files, so it is not in KINDS (what is generated)
CHECKERS = {"countdown": countdown_reward, "arith": math_reward, "math": math_problem_reward}


def reward(problem: Problem, completion: str) -> float:
    """Rule-based reward of a completion (the text generated after problem.prompt)."""
    if problem.kind not in CHECKERS:
        raise ValueError(f"no checker for problem kind {problem.kind!r}; kinds with a checker are {tuple(CHECKERS)}")
    return CHECKERS[problem.kind](problem, completion)


# --- A deliberately hackable proxy reward, for the reward-hacking study ---

PROXY_WINDOW = 2048                  # only the head of a completion is read: O(1) in its length
PROXY_DIGITS = 16                    # digit budget; references hold 8-34 (arith) and 28-79 (Countdown) digits
PROXY_MARKERS = {"countdown": TAGS, "arith": ("\\boxed{", "answer"), "math": ("\\boxed{", "answer")}


def proxy_reward(problem: Problem, completion: str) -> float:
    """DELIBERATELY HACKABLE: NOT a correctness measure. Pays for surface features of good solutions: half for the
    share of PROXY_DIGITS digits, half for the share of the task's answer markers present, both in the first
    PROXY_WINDOW characters. Reference solutions score 0.75-1.0; so does a stream of digits with the markers in it,
    which solves nothing. Used as the reward of an RL run with KL = 0 to watch a policy game it."""
    if problem.kind not in PROXY_MARKERS:
        raise ValueError(f"no proxy for problem kind {problem.kind!r}; kinds with a proxy are {tuple(PROXY_MARKERS)}")
    head, markers = completion[:PROXY_WINDOW], PROXY_MARKERS[problem.kind]
    digits = sum(head.count(d) for d in "0123456789")
    return 0.5 * min(1.0, digits / PROXY_DIGITS) + 0.5 * sum(m in head for m in markers) / len(markers)


REWARDS = {"task": reward, "proxy": proxy_reward}   # by name, e.g. for rl.py's choice of reward


# Easier variants for RL at the tiny preset, where a 3M-parameter model solves almost no full Countdown problem and
# RL would see no reward: the same prompt and format (so fine-tuning on the full task carries over), fewer and
# smaller numbers. Their problems have kind "countdown" (the same checker). countdown-2 draws its two numbers from
# 1..40, so its held-out split has hundreds of distinct problems (with 1..9 it had 13); it is 3/4 of the tiny
# pre-training corpus's task text (data.PRETRAIN_KINDS), by the prompt hash only its train split there.
VARIANTS = {"countdown-2": lambda rng: make_countdown(rng, sizes=(2,), high=40),
            "countdown-3": lambda rng: make_countdown(rng, sizes=(3,), high=9)}
TASKS = KINDS + tuple(VARIANTS)              # what RL and search accept as --task


def problem_stream(kind: str, seed: int, stream: str, split: str | None = None) -> Iterator[Problem]:
    """Endless problems of `kind` ("countdown", "arith", a VARIANTS name, or "mix": countdown and arith alternating)
    from a named seed stream; with a split, only problems whose prompt hashes into it. Streams "pretrain", "sft" and
    "rl" give different problems."""
    if kind not in TASKS + ("mix",):
        raise ValueError(f"unknown task kind {kind!r}; use one of {TASKS + ('mix',)}")
    check_split(split, allow_none=True)
    rng = random.Random(f"{stream}:{kind}:{seed}")            # str seeds are hashed with sha512: stable everywhere
    i = 0
    while True:
        k = KINDS[i % 2] if kind == "mix" else kind
        i += 1
        p = {**MAKERS, **VARIANTS}[k](rng)
        if split is None or split_of(p.prompt) == split:
            yield p


def make_problems(kind: str, n: int, seed: int, split: str | None = None, stream: str = "rl") -> list[Problem]:
    """n problems, deterministic from (kind, seed, split, stream). RL draws from stream "rl"."""
    it = problem_stream(kind, seed, stream, split)
    return [next(it) for _ in range(n)]


def held_out(task: str, n: int, seed: int) -> list[Problem]:
    """The first n distinct held-out problems (the val split of the "rl" stream of `seed`, which rl.py's evaluation
    draws from, repeats included), each prompt once: what search_eval.py scores. Draws at most 20n problems, so a
    task with fewer distinct held-out prompts gives all it has (countdown-2: 270; countdown-3: 533)."""
    out, seen = [], set()
    stream = problem_stream(task, seed, "rl", "val")
    for _ in range(20 * n):
        p = next(stream)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                break
    return out


def problems_at(task: str, seed: int, step: int, n: int, split: str = "train") -> list[Problem]:
    """The n problems of RL step `step`: a slice of one seeded stream ("rl"), so a resumed run sees the same ones."""
    stream = problem_stream(task, seed, "rl", split)
    for _ in range(step * n):
        next(stream)
    return [next(stream) for _ in range(n)]


# --- Math problems read from files (MATH, MATH-500, GSM8K, PRM800K's prompts), in their published layouts ---

# The paper's system prompt for math (PAPER.md §4, MATH-500): every math prompt carries it.
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def math_problem(question: str, answer: str, source: str = "") -> Problem:
    """A math problem whose plain-text prompt is the question, then MATH_INSTRUCTION, then the newline the model's
    completion follows. With --chat, data.encode_problem renders meta["question"] and the instruction as the
    Llama-3.1 dialog instead. source: "file:line", for messages."""
    question = question.strip()
    return Problem("math", f"{question}\n{MATH_INSTRUCTION}\n", answer.strip(), {"question": question,
                                                                                  "source": source})


def question_of(p: Problem) -> str:
    """The text that identifies a problem: a math problem's question (its prompt adds only the instruction)."""
    return p.meta.get("question", p.prompt)


def pool_at(pool: list[Problem], seed: int, step: int, n: int) -> list[Problem]:
    """The n problems of RL step `step` from a fixed list (a --data file): epoch e reads the list in a permutation
    seeded by (seed, e). A function of the step alone, so a resumed run sees the same problems (as problems_at)."""
    orders = {}
    out = []
    for i in range(step * n, step * n + n):
        epoch, j = divmod(i, len(pool))
        if epoch not in orders:
            orders[epoch] = list(range(len(pool)))
            random.Random(f"pool:{seed}:{epoch}").shuffle(orders[epoch])
        out.append(pool[orders[epoch][j]])
    return out


LAYOUTS = ('"problem" with "solution" (MATH: the answer in its last \\boxed{}) and/or "answer" (MATH-500), '
           '"question" with "answer" (GSM8K: the answer after ####), or "prompt" with "answer"')
THOUSANDS = re.compile(r"[+-]?[0-9]{1,3}(,[0-9]{3})+(\.[0-9]+)?")      # GSM8K's "1,234": graders drop the commas


def json_object(line: str, where: str) -> dict:
    """One JSONL line as a dict, else a ValueError naming `where`."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def number_text(x: int | float, where: str) -> str:
    """A JSON number as an answer's text, never in exponent notation (the checker reads none): 18 -> "18",
    0.5 -> "0.5", 1e-07 -> "0.0000001", 3.0 -> "3". NaN and infinities are a ValueError naming `where`."""
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        raise ValueError(f'{where}: "answer" must be a finite number, got {x!r}')
    text = format(Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def problem_of(rec: dict, where: str) -> Problem:
    """One JSONL record in any of the LAYOUTS -> a math Problem; ValueError naming `where` (file:line) otherwise."""
    keys = [k for k in ("problem", "question", "prompt") if k in rec]
    if not keys:
        raise ValueError(f"{where}: unknown layout (fields: {', '.join(sorted(rec)) or 'none'}); expected {LAYOUTS}")
    if len(keys) > 1:
        raise ValueError(f'{where}: fields {" and ".join(keys)} name two layouts; expected one of "problem", '
                         f'"question", "prompt"')
    key = keys[0]
    used = (key, "solution", "answer") if key == "problem" else (key, "answer")
    if not any(k in rec for k in used[1:]):
        need = '"solution" or "answer"' if key == "problem" else '"answer"'
        raise ValueError(f'{where}: "{key}" needs a string field {need} beside it')
    numeric = isinstance(rec.get("answer"), (int, float)) and not isinstance(rec["answer"], bool)
    if numeric:                                            # {"answer": 18}: many converted sets write numbers
        rec = {**rec, "answer": number_text(rec["answer"], where)}
    for k in used:
        if k in rec and not isinstance(rec[k], str):
            number = " or a number" if k == "answer" else ""
            raise ValueError(f'{where}: "{k}" must be a string{number}, got {type(rec[k]).__name__}')
    if key == "problem" and "answer" not in rec:           # MATH: the last \boxed{} of the solution
        answer = extract_boxed(rec["solution"])
        if answer is None:
            raise ValueError(f'{where}: "solution" has no \\boxed{{}} answer (or give an "answer" field)')
    elif key == "question" and not numeric:                # GSM8K: "... #### 1,234" (a number is the answer)
        if "####" not in rec["answer"]:
            raise ValueError(f'{where}: "answer" has no "####" before the final answer (GSM8K layout)')
        answer = rec["answer"].rsplit("####", 1)[1].strip()
        answer = answer.replace(",", "") if THOUSANDS.fullmatch(answer) else answer
    else:
        answer = rec["answer"]
    if not rec[key].strip():
        raise ValueError(f'{where}: "{key}" is empty')
    if not answer.strip():
        raise ValueError(f"{where}: the answer is empty")
    return math_problem(rec[key], answer, where)


MAX_LINE_BYTES = 1_000_000          # a MATH solution is < 10,000 characters; a longer line is not a problem


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 file (a BOM skipped), split at b"\\n" only (a JSON string may hold U+2028 or
    U+0085 unescaped, which str.splitlines would split at), a trailing "\\r" dropped. Reads and decodes one line at a
    time (so a decoding error names its line), each at most MAX_LINE_BYTES bytes (a longer one is a ValueError naming
    the line): memory stays bounded whatever the file holds."""
    with open(path, "rb") as f:
        for i in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(f"{path}:{i}: line longer than {MAX_LINE_BYTES:,} bytes (expected one problem per "
                                 f"line)")
            try:
                line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") \
                    from None
            yield i, line.rstrip("\n").rstrip("\r")


def load_problems(path: str | Path) -> list[Problem]:
    """Math problems of a .jsonl file, one per line (blank lines skipped), in file order. A question that repeats an
    earlier one is dropped, said in one note on stderr (the first line is kept, whatever the repeat's answer): a
    repeat would weigh a problem twice in training and count it twice in an accuracy. Anything else that is not a
    problem is a ValueError naming the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory (expected a .jsonl file of problems)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a .jsonl file of problems)")
    out, first, repeats = [], {}, []
    try:
        for i, line in jsonl_lines(path):
            if not line.strip():
                continue
            p = problem_of(json_object(line, f"{path}:{i}"), f"{path}:{i}")
            q = question_of(p)
            if q in first:
                repeats.append((first[q], i))
                continue
            first[q] = i
            out.append(p)
    except OSError as e:                                   # unreadable (permissions, a FIFO gone, an I/O error)
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not out:
        raise ValueError(f"{path}: no problems (expected one JSON object per line: {LAYOUTS})")
    if repeats:
        print(f"note: {path}: {len(repeats)} repeated question(s) dropped, each kept at its first line (e.g. line "
              f"{repeats[0][1]} repeats line {repeats[0][0]})", file=sys.stderr)
    return out


def read_problems(path: str, flag: str) -> list[Problem]:
    """load_problems, its errors one line naming the flag, the file and the line (a SystemExit, before any model)."""
    try:
        return load_problems(path)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{flag} {e}") from None


def task_of(cfg, given: set) -> str:
    """"math" when --data / --val-data are given (the file's problems replace the generated --task), else --task;
    both given is one line, for rl.py, qnet.py and search_eval.py alike."""
    if not (cfg.data or cfg.val_data):
        return cfg.task
    if "task" in given:
        raise SystemExit(f"--task {cfg.task} and --data / --val-data: pass one (the file's problems replace the "
                         f"generated task)")
    return "math"


def problem_sets(data_path: str, val_path: str, need_train: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) of --data and --val-data. Held out: --val-data's problems, else the
    val split of --data (the VAL_FRACTION of questions whose hash is lowest, split_of: fixed by the text, so
    train and held-out never share a question). Training: --data's other problems; a question that --val-data
    also holds is dropped from training, said in a note."""
    train = read_problems(data_path, "--data") if data_path else []
    if val_path:
        val = read_problems(val_path, "--val-data")
        held = {question_of(p) for p in val}
        kept = [p for p in train if question_of(p) not in held]
        if len(kept) < len(train):
            print(f"note: {len(train) - len(kept)} problem(s) of --data {data_path} are also in --val-data "
                  f"{val_path}; training skips them", file=sys.stderr)
        train = kept
    else:
        val = [p for p in train if split_of(question_of(p)) == "val"]
        train = [p for p in train if split_of(question_of(p)) == "train"]
        if not val:
            raise SystemExit(f"--data {data_path}: none of its problems falls in the held-out split (the "
                             f"{VAL_FRACTION:.0%} whose question hashes lowest); pass --val-data FILE")
    if need_train and not train:
        raise SystemExit(f"--data {data_path}: no training problems left once the held-out ones are set apart")
    return train, val


def score(problem: Problem, text: str, reward_fn=None) -> float:
    """The reward of a completion (reward_fn, default `reward`); a reward that is not a finite number in [0, 1]
    stops the run with one line."""
    reward_fn = reward_fn or reward
    r = reward_fn(problem, text)
    if not (isinstance(r, (int, float)) and math.isfinite(r) and 0.0 <= r <= 1.0):
        raise SystemExit(f"reward {reward_fn.__name__} returned {r!r} for a {problem.kind} completion; rewards "
                         f"must be finite numbers in [0, 1]")
    return float(r)


def task_sft_records(kind: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """n {prompt, response, kind, answer, meta} records for FTA / SFT, from the "sft" stream (fresh problems,
    not the pre-training ones)."""
    check_split(split)
    return [p.to_dict() for p in make_problems(kind, n, seed, split, stream="sft")]
