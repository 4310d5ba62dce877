"""Data for every CoLA training stage: an embedded corpus, token shards and loaders, fine-tuning records.

What it provides (PAPER.md §3):
  - `stdlib_docs()`: real natural language with no download: the docstrings of Python's standard library, read
    with `ast` (nothing is imported), cached under data/cache/. Stands in for SlimPajama & co.
  - `embedded_corpus(split)`: docstrings mixed with task texts (tasks.py: Countdown and arithmetic problems with
    their reference solutions), with held-out "val" documents and problems: the pre-training text of Algorithm 1
    (Stage A, IDM + world model; Stage B, policy behaviour cloning).
  - `load_sft_jsonl`, `encode_sft` (loss on response tokens only) and `SFTLoader`: the fine-tuning data of FTA-I,
    FTA-P and the token-level "Llama SFT" baseline (Algorithm 2); `sft_tensors` picks --sft-data or fresh task
    records (tasks.task_sft_records).
  - `prepare` / `prepare_embedded`: documents -> uint32 token shards, each document <|begin_of_text|> ...
    <|end_of_text|> ("documents packed, separated by EOS"); `TokenLoader` packs them into windows of seq_len + 1
    tokens, sharded over ranks, resumable. Every loader yields a `Batch` (tokens, mask, stream positions).
  - `lm_shards`, `general_text_shards`: what a training run reads (--data / --val-data, or the embedded corpus).

Commands:
    python data.py sample --kind countdown -n 3              # print fresh problems and reference solutions
    python data.py sample --kind arith -n 3 --split val
    python data.py embedded --out data/embedded             # train/ and val/ shards of the embedded corpus
    python data.py prepare --out data/mycorpus a.txt b.jsonl [--tokenizer Meta-Llama-3.1-8B/tokenizer.model]
    python data.py sft --kind countdown --split train -n 5000 --out data/countdown_sft.jsonl
    python data.py tokenizer --ranks 2048 --out data/bpe-2048.json   # a BPE trained on the embedded corpus

Formats (choices made here):
  - .txt input: documents separated by a form feed (\\f); a file without one is one document. Each document is
    stripped of surrounding whitespace; empty ones are skipped. (Blank lines are paragraph breaks, not document
    breaks.) .jsonl input: one JSON object per line with a string "text", used verbatim.
  - Shards: out_dir/shard_00000.bin ... (raw uint32 token ids, numpy tofile) and out_dir/meta.json (tokenizer,
    vocabulary size, largest token id, ...). The whole directory is written aside and swapped in when every input
    has been read, so a reader never sees half a shard, and a failed `prepare` leaves the old shards intact.
    Training checks the shards once when it opens them: whole uint32 files, at least one window, every id inside
    the run's vocabulary (meta.json's max_id, or one memory-mapped scan).
  - Windows: stride seq_len with a one-token overlap: window i = stream[i*T : i*T + T + 1], so every token after
    the first is a target exactly once per epoch. Window order is a permutation seeded by (seed, epoch), epochs
    end to end; each optimizer step takes the next global-batch positions and rank r of W reads the r-th
    contiguous W-th of them (EpochOrder), so the data of a step does not depend on the world size.
  - SFT records longer than seq_len + 1 tokens are truncated on the right (one warning per call with the count);
    a record whose prompt alone fills the window has no response token left and is dropped (counted too).
  - Splits: a document or problem is "val" when the blake2b hash of its text (of its prompt, for problems) falls
    in the lowest 5%; identical texts therefore always land in the same split, and train/val never overlap.
  - Mix: tasks are 95% of the embedded corpus's characters (PRETRAIN_KINDS in turn: countdown-2 three times, then
    arithmetic), docstrings 5%. A base that sees mostly task text learns to copy the prompt's numbers into its answer
    and solves some countdown-2 problems before any fine-tuning; at 20% or 50% it solved none (docs/results.md).

Deviations from the paper / official code:
  - Pre-training text is Python's stdlib docstrings (~1.2 MB, English technical prose with some code) plus
    synthetic tasks, instead of SlimPajama, StarCoder, Proof-Pile-2 and WuDao (~1T tokens).
  - The task texts and their rewards are our own (tasks.py lists how they differ from MATH and agent tasks).
"""
from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import random
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from infra.files import atomic_write, replace_dir
from tasks import (KINDS, MATH_INSTRUCTION, SPLITS, Problem, check_split, json_object, make_problems, problem_stream,
                   question_of, reward, split_of, task_sft_records)
from tokenizer import ChatFormat, Tokenizer, bpe_json, corpus_digest, train_bpe

ROOT = Path(__file__).resolve().parent
CACHE_DIR = ROOT / "data" / "cache"          # gitignored
DATA_VERSION = 2                             # bump when the extraction, the task templates or the mix change
MIN_DOC_CHARS = 200                          # keep docstrings of at least this many characters
TASK_SHARE = 0.95                            # share of the embedded corpus's characters that are task texts
PRETRAIN_KINDS = ("countdown-2", "countdown-2", "countdown-2", "arith")  # the task texts' kinds, in turn
VAL_SEED = 1234                              # the held-out windows' order: the same evaluation batches everywhere


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
    streams = [problem_stream(kind, seed, f"pretrain:{i}", split) for i, kind in enumerate(PRETRAIN_KINDS)]
    while chars < budget:
        p = next(streams[len(tasks) % len(streams)])
        tasks.append(p.text)
        chars += len(p.text)
    out = docs + tasks
    random.Random(f"corpus:{split}:{seed}").shuffle(out)
    return out


def tokenizer_text() -> list[str]:
    """What `python data.py tokenizer` trains on: the train split of the embedded corpus at seed 0."""
    return embedded_corpus("train", seed=0)


def tokenizer_spec(n_ranks: int) -> tuple[dict, dict]:
    """A BPE of n_ranks trained on the embedded corpus, as a tokenizer.json, and a note of the text it was trained
    on (name and digest: the stdlib docstrings differ between Python versions, and so would the merges)."""
    texts = tokenizer_text()
    spec = bpe_json(train_bpe(texts, n_ranks))
    note = {"corpus": f"embedded corpus, train split, seed 0, data v{DATA_VERSION}, Python "
                      f"{sys.version.split()[0]}", "digest": corpus_digest(texts), "ranks": len(spec["model"]["vocab"]),
            "asked": n_ranks}
    return spec, note


# ----------------------------------------------------------------------------------------------------------------
# Documents -> uint32 token shards

def atomic_write_text(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
    """Line i of a JSONL file as a dict, else a ValueError naming the file and line (tasks.json_object)."""
    return json_object(line, f"data: {path}:{i}")


def write_shards(docs: Iterable[str], out_dir: str | Path, tokenizer: Tokenizer, shard_tokens: int = 50_000_000,
                 source: str = "") -> list[Path]:
    """Tokenize documents as <|begin_of_text|> doc <|end_of_text|>, concatenate, cut into shards of shard_tokens
    (documents may straddle shards: the loader reads them as one stream), then meta.json.

    Everything is written into a temporary directory that replaces out_dir only once the last document is in
    (files.replace_dir): a failure on the way (a bad input file, a full disk) leaves the old shards and their
    meta.json as they were. out_dir must be absent, empty or a shard directory (shard_*.bin and meta.json only)."""
    out_dir = Path(out_dir)
    if tokenizer.n_words > 2**32:
        raise ValueError(f"data: vocabulary of {tokenizer.n_words} does not fit uint32")
    if out_dir.is_dir():
        other = [f.name for f in out_dir.iterdir() if not f.name.startswith(("shard_", "meta.json"))]
        if other:
            raise ValueError(f"data: {out_dir} holds files that are not shards ({other[0]}, ...); shards replace a "
                             f"whole directory: choose a new or empty --out")
    names = []

    def write(tmp: Path):
        buf, buf_len, n_docs, n_tokens, max_id = [], 0, 0, 0, 0

        def flush(arr: np.ndarray):
            names.append(f"shard_{len(names):05d}.bin")
            arr.astype(np.uint32).tofile(tmp / names[-1])

        for doc in docs:
            ids = np.asarray(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32)
            buf.append(ids)
            buf_len += len(ids)
            n_docs += 1
            n_tokens += len(ids)
            max_id = max(max_id, int(ids.max()))
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
                "max_id": max_id, "shards": names, "source": source}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    replace_dir(out_dir, write)
    return [out_dir / name for name in names]


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
# Loaders: deterministic, rank-sharded, resumable orders. Every loader yields the same Batch.


class Batch(NamedTuple):
    """One micro batch, the same shape in every stage."""
    tokens: torch.Tensor   # [B, T+1] long: windows x_{1:T+1}; inputs x[:, :-1], targets x[:, 1:]
    mask: torch.Tensor     # [B, T+1] bool: True where a token is a target that counts (pre-training windows: all;
                           #   SFT records: the response and its closing eos). Targets x[:, 1:] use mask[:, 1:]
    ids: torch.Tensor      # [B] long: the rows' positions in the global data stream (they seed per-row noise)

    def to(self, device) -> "Batch":
        """tokens and mask on `device`; ids stay on the host, where they seed the noise (no device sync per row).
        To a GPU the copy goes from pinned memory without blocking: the host goes on to queue the forward instead
        of waiting for the copy (a plain pageable copy synchronises every micro batch)."""
        if torch.device(device).type != "cuda":
            return Batch(self.tokens.to(device), self.mask.to(device), self.ids)
        move = lambda t: t.pin_memory().to(device, non_blocking=True)        # noqa: E731
        return Batch(move(self.tokens), move(self.mask), self.ids)


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

    def next_batch(self) -> Batch:
        idx, pos = self.order.take(self.batch_size)
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in idx]).astype(np.int64))  # [B, T+1]
        return Batch(w, torch.ones_like(w, dtype=torch.bool), torch.from_numpy(pos))

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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data: {path}: not UTF-8 text (byte {e.start})") from None
    records = []
    for i, line in enumerate(text.splitlines(), 1):
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
    """Batches of encoded SFT records, shuffled per epoch, rank-sharded, endless,
    resumable, with the same order rules as TokenLoader."""

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, global_batch: int | None = None):
        if tokens.dim() != 2 or tokens.shape != mask.shape:
            raise ValueError(f"data: SFTLoader needs tokens and mask of the same shape [N, T+1], got "
                             f"{tuple(tokens.shape)} and {tuple(mask.shape)}")
        if len(tokens) == 0:
            raise ValueError("data: SFTLoader got no records")
        if not mask[:, 1:].any(1).all():
            raise ValueError("data: SFTLoader needs a counted target (mask True) after the first token of every row")
        self.tokens, self.mask, self.batch_size = tokens, mask.bool(), batch_size
        global_batch = global_batch or batch_size * world_size
        self.order = EpochOrder(len(tokens), rank, world_size, seed, global_batch, batch_size)

    def next_batch(self) -> Batch:
        """The rows cut after the batch's last counted target: [B, n] with n <= T+1. The columns cut are padding
        (mask False in every row) and the models are causal, so no loss or gradient changes; a countdown-2 record is
        ~275 tokens, so at --seq-len 448 this skips ~40% of the fine-tuning compute."""
        idx, pos = self.order.take(self.batch_size)
        idx = torch.from_numpy(idx)
        tokens, mask = self.tokens[idx], self.mask[idx]                                      # [B, T+1]
        n = int(mask[:, 1:].any(0).nonzero().max()) + 2            # each row has a target past column 0: n >= 2
        return Batch(tokens[:, :n], mask[:, :n], torch.from_numpy(pos))                      # [B, n], [B, n], [B]

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, d: dict):
        self.order.load_state_dict(d, "SFTLoader")


# ----------------------------------------------------------------------------------------------------------------
# What a training run reads: --data / --val-data shards, or the embedded corpus; the task records of fine-tuning

def embedded_cache(cfg, tok: Tokenizer) -> Path:
    """Where the embedded corpus of this tokenizer and seed is tokenized once (gitignored)."""
    return CACHE_DIR / f"embedded-{tok.model.name}{'-' + tok.digest if tok.digest else ''}-seed{cfg.seed}"


def lm_shards(cfg, tok: Tokenizer) -> tuple[list[Path], list[Path]]:
    """Train/val token shards: --data / --val-data directories (checked: check_shards), or the embedded corpus
    prepared once."""
    def shards(d: str, flag: str) -> list[Path]:
        paths = sorted(Path(d).glob("*.bin"))
        if not paths:
            raise SystemExit(f"{flag} {d}: no .bin token shards (make them with `python data.py prepare`)")
        check_shards(paths, tok, cfg.seq_len, f"{flag} {d}")
        return paths
    if cfg.data:
        train = shards(cfg.data, "--data")
        return train, shards(cfg.val_data, "--val-data") if cfg.val_data else train
    splits = prepare_embedded(embedded_cache(cfg, tok), tok, seed=cfg.seed)
    return splits["train"], splits["val"]


def check_shards(paths: list[Path], tok: Tokenizer, seq_len: int, what: str):
    """Shards a run will read, checked once before any step, each failure one line naming `what`: whole uint32
    files, at least one window of seq_len + 1 tokens, the run's tokenizer (meta.json, when there is one) and every
    token id inside its vocabulary, which the model's embedding covers (train.check_fits)."""
    sizes = [p.stat().st_size for p in paths]
    for p, size in zip(paths, sizes):
        if size == 0 or size % 4:
            raise SystemExit(f"{what}: shard {p.name} has {size} bytes, not a whole number of uint32 tokens "
                             f"(truncated?): prepare the data again")
    if sum(sizes) // 4 < seq_len + 1:
        raise SystemExit(f"{what}: {sum(sizes) // 4} tokens, fewer than one window of --seq-len + 1 = {seq_len + 1}: "
                         f"use more data or a smaller --seq-len")
    try:
        meta = json.loads((paths[0].parent / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("tokenizer", tok.model.name) != tok.model.name or meta.get("vocab_size", tok.n_words) != tok.n_words:
        raise SystemExit(f"{what}: prepared with tokenizer {meta['tokenizer']} ({meta['vocab_size']} tokens), but "
                         f"this run's is {tok.model.name} ({tok.n_words} tokens): prepare the data with the run's "
                         f"tokenizer (python data.py prepare --tokenizer ...)")
    described = meta.get("shards") == [p.name for p in paths] and 4 * meta.get("n_tokens", -1) == sum(sizes)
    top = meta["max_id"] if described and "max_id" in meta else max(max_token_id(str(p), s) for p, s in
                                                                      zip(paths, sizes))
    if top >= tok.n_words:
        raise SystemExit(f"{what}: token id {top} is outside the vocabulary of {tok.n_words} tokens "
                         f"({tok.model.name}) that the model embeds: prepare the data with the run's tokenizer")


@functools.lru_cache(maxsize=None)
def max_token_id(path: str, size: int) -> int:
    """The largest id of a uint32 shard, memory-mapped (read once per process and file size)."""
    return int(np.memmap(path, dtype=np.uint32, mode="r").max())


def general_text_shards(cfg, tok: Tokenizer) -> list[Path]:
    """Held-out natural text only, to measure what fine-tuning costs in general ability (the retention claim).

    The embedded pre-training corpus also holds task text, which fine-tuning on tasks improves; this set leaves it
    out (the held-out stdlib docstrings). With --data / --val-data, that corpus is used as it is.
    """
    if cfg.val_data or cfg.data:
        return lm_shards(cfg, tok)[1]
    out, source = embedded_cache(cfg, tok) / "general-val", f"stdlib-docstrings:val:v{DATA_VERSION}"
    docs = (d for d in stdlib_docs() if split_of(d) == "val")
    return finished_shards(out, tok, source) or write_shards(docs, out, tok, source=source)


def sft_tensors(cfg, tok: Tokenizer, split: str):
    """(tokens [N, T+1], response mask [N, T+1]) of the task data."""
    path, flag = (cfg.sft_data, "--sft-data") if split == "train" else (cfg.sft_val, "--sft-val")
    try:
        if path:
            records = load_sft_jsonl(path)
        else:
            n = cfg.n_records if split == "train" else max(64, cfg.n_records // 10)
            kinds = KINDS if cfg.task == "mix" else (cfg.task,)
            records = [r for kind in kinds for r in task_sft_records(kind, split, n // len(kinds), seed=cfg.seed)]
        return encode_sft(records, tok, cfg.seq_len, chat=cfg.chat)
    except (ValueError, FileNotFoundError) as e:          # the records' file, line and field: one line
        raise SystemExit(f"{flag} {path or '(embedded tasks)'}: {str(e).removeprefix('data: ')}") from None


# ----------------------------------------------------------------------------------------------------------------
# Math problems (tasks.load_problems reads them from --data / --val-data): the prompt the model completes

def encode_problem(tok: Tokenizer, problem: Problem, chat: bool = False) -> list[int]:
    """The prompt's tokens; the model's completion follows them. Plain: bos + problem.prompt (math: the question,
    then the instruction). chat: the Llama-3.1 dialog (a model fine-tuned with train.py --chat, or an Instruct
    model): system = the math instruction (math problems), user = the question, then the assistant's header."""
    if not chat:
        return tok.encode(problem.prompt, bos=True, eos=False)
    system = [{"role": "system", "content": MATH_INSTRUCTION}] if problem.kind == "math" else []
    return ChatFormat(tok).encode_dialog_prompt(system + [{"role": "user", "content": question_of(problem)}])


# ----------------------------------------------------------------------------------------------------------------
# RL episodes: sampled responses to task prompts, and the teacher-forced batch an update reads (rl.py, qnet.py)


@torch.no_grad()
def rollout(model, tok: Tokenizer, prompts: list[list[int]], choose, max_new_tokens: int) -> list[dict]:
    """One response per prompt with the chooser -> per row {tokens, text} and, for CoLA, {actions}: the latent
    action behind every token (CoLA.generate returns them; a plain Llama's Transformer.generate does not)."""
    out = model.generate(prompts, max_new_tokens, eos=tok.stop_tokens, choose=choose)
    if isinstance(out, dict):
        rows = [{"tokens": t, "actions": a} for t, a in zip(out["tokens"], out["actions"])]
    else:
        rows = [{"tokens": t} for t in out]
    for r in rows:
        r["text"] = tok.decode([t for t in r["tokens"] if t not in tok.stop_tokens])
    return rows


def pack(prompts: list[list[int]], rows: list[dict], device) -> dict:
    """Right-padded x [B, L] (prompt + response), the response mask m [B, L-1] over the targets x[:, 1:], and for
    latent rows the actions [B, L-1] aligned with those targets (the action behind x_{t+1} sits at t)."""
    seqs = [p + r["tokens"] for p, r in zip(prompts, rows)]
    L = max(map(len, seqs))
    x = torch.zeros(len(seqs), L, dtype=torch.long)
    m = torch.zeros(len(seqs), L - 1, dtype=torch.bool)
    a = torch.full((len(seqs), L - 1), -1, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        x[i, :len(seqs[i])] = torch.tensor(seqs[i])
        m[i, len(p) - 1:len(seqs[i]) - 1] = True
        if "actions" in r:
            a[i, len(p) - 1:len(seqs[i]) - 1] = torch.tensor(r["actions"], dtype=torch.long)
    return {"x": x.to(device), "mask": m.to(device), "actions": a.to(device)}


# ----------------------------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl files into uint32 shards")
    p.add_argument("inputs", nargs="+", help=".txt (form-feed separated documents) or .jsonl (a 'text' field)")
    p.add_argument("--out", required=True, help="output directory for shard_*.bin and meta.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json (default: the embedded one: bytes + two-digit numbers)")
    p.add_argument("--shard-tokens", type=int, default=50_000_000)
    p = sub.add_parser("embedded", help="write train/ and val/ shards of the embedded corpus")
    p.add_argument("--out", default="data/embedded")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("tokenizer", help="train a byte-level BPE on the embedded corpus (a tokenizer.json)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write (a .trained-on.json note goes beside)")
    p.add_argument("--ranks", type=int, default=2048, help="tokens before the 256 specials (256 bytes + merges)")
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
        elif args.cmd == "tokenizer":
            if args.ranks < 257:
                raise ValueError(f"--ranks {args.ranks}: expected more than the 256 single bytes")
            out = Path(args.out)
            note_path = out.with_suffix(".trained-on.json")
            if out.suffix != ".json" or out.name.endswith(".trained-on.json"):
                raise ValueError(f"--out {out}: expected a path ending in .json (not .trained-on.json, the name of "
                                 f"the note written beside it)")
            for p in (out, note_path):
                if p.exists() and not p.is_file():
                    raise ValueError(f"--out {out}: {p} exists and is not a regular file; name a new .json path")
            spec, note = tokenizer_spec(args.ranks)
            for p, text in ((note_path, json.dumps(note, indent=1)), (out, json.dumps(spec, ensure_ascii=False,
                                                                                          indent=0))):
                try:                                   # the note first: a tokenizer never sits beside a stale note
                    atomic_write_text(p, text + "\n")
                except OSError as e:
                    raise ValueError(f"--out {out}: cannot write {p}: {e.strerror or e}") from None
            print(f"wrote {out} and {out.with_suffix('.trained-on.json').name}: {note['ranks']} ranks + 256 "
                  f"specials, trained on {note['corpus']}" + (f" (fewer than --ranks {args.ranks}: no pair of the "
                                                              f"corpus is left to merge)" if note['ranks'] < args.ranks
                                                              else ""))
        elif args.cmd == "sample":
            for pr in make_problems(args.kind, args.n, args.seed, args.split):
                print(f"--- {pr.kind}  answer={pr.answer}  reward(reference)={reward(pr, pr.response)}")
                print(pr.prompt + pr.response)
        elif args.cmd == "sft":
            recs = task_sft_records(args.kind, args.split, args.n, args.seed)
            atomic_write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in recs))
            print(f"wrote {len(recs)} records to {args.out}")
    except (OSError, ValueError) as e:                   # a missing or bad input, a full disk: one line
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
