"""Llama 3 tokenizer on tiktoken, plus an embedded default (bytes + two-digit numbers) that needs no download.

Llama 3 (PAPER.md §2, "Base": V = 128256): 128000 byte-level BPE ranks read from Meta's `tokenizer.model`
(one "<base64 token bytes> <rank>" per line; the rank is both merge priority and token id), Meta's
pre-tokenisation regex, and 256 special tokens with ids 128000..128255 (Llama-3.1 names).

Embedded default (the tiny CPU preset): the 256 single bytes plus the 100 two-digit strings "00".."99" as merges
of two digits (ranks 256..355), so every UTF-8 string round-trips, a number up to 99 is one token and no file is
needed; the same 256 special-token names follow at ids 356..611, so V = 612 and code written against Llama 3's names
(<|begin_of_text|>, <|eot_id|>, ...) runs unchanged. Why numbers as tokens and everything else as bytes: with
bytes alone the tiny base never learns to copy a prompt's numbers into its answer and solves no Countdown problem;
with one token per number copying is one step and RL gets a start with room to learn (docs/results.md, "Number
tokens, a task-dense corpus, more fine-tuning"), while a trained BPE of 512-2048 ranks made the world model's
task loss worse relative to its base the more ranks it had. The merges are a fixed list, not trained, so they are
the same on every Python. The price is ~4x more tokens per English text than Llama 3's tokenizer.
`Tokenizer("bytes")` is the plain byte tokenizer (V = 512) of earlier tiny checkpoints.

Usage:
    tok = Tokenizer()                                    # embedded default (V = 612)
    tok = Tokenizer("Meta-Llama-3.1-8B/tokenizer.model") # official file
    tok = Tokenizer.find("/path/to/checkpoint")          # tokenizer.model, original/tokenizer.model or
                                                         # tokenizer.json inside a checkpoint directory
    ids = tok.encode("Hello world!", bos=True, eos=False)

Trained BPE (opt-in): `train_bpe` learns byte-level merges from text and `bpe_json` writes them as a Hugging Face
tokenizer.json that `Tokenizer(path)` and the `tokenizers` library read alike; `python data.py tokenizer --ranks N
--out F` trains one on the embedded corpus (docs/results.md, "A BPE tokenizer for the tiny preset": tried, not
the default).

Deviations from Meta's tokenizer.py: none in behaviour; `Tokenizer.find` also rebuilds the ranks from a Hugging
Face tokenizer.json (GPT-2 byte alphabet), which gives the same ids for Llama 3. `train_bpe` counts pre-tokenised
chunks with Python's `re` (TRAIN_PAT, Meta's regex with \\p{L} / \\p{N} written as \\w classes; identical on ASCII
text) and merges the most frequent pair, ties to the lowest ids, as the classic BPE of Sennrich et al.; tiktoken
then applies the ranks by lowest rank first, as for Llama 3.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import tiktoken

# Meta's pre-tokenisation regex (identical in llama3, llama-models and HF tokenizer.json).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")

# The same regex in Python's `re` (no \\p{...}): letters [^\\W\\d_], digits \\d, neither [\\W_]. For train_bpe only.
TRAIN_PAT = re.compile(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n]*|"
                       r"\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_RESERVED_SPECIAL_TOKENS = 256
# Llama-3.1 special tokens (llama-models 3.1 release); id = number of base tokens + index.
SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - 11)]

TIKTOKEN_MAX_ENCODE_CHARS = 400_000     # tiktoken gets text in chunks of at most this many characters
MAX_NO_WHITESPACES_CHARS = 25_000       # and no run of (non-)whitespace longer than this (tiktoken panics)


def load_tokenizer_model(path: Path) -> dict[bytes, int]:
    """Meta's tokenizer.model: "<base64> <rank>" per line -> {token bytes: rank}, with a one-line error."""
    ranks = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tokenizer file not found") from None
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}: line {i + 1} is not '<base64 token> <rank>'") from None
    if not ranks:
        raise ValueError(f"{path}: no tokens")
    return ranks


def gpt2_byte_alphabet() -> dict[str, int]:
    """The printable-unicode stand-ins HF byte-level BPE uses for each byte (space -> 'Ġ', newline -> 'Ċ')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def load_tokenizer_json(path: Path) -> dict[bytes, int]:
    """Ranks from a HF tokenizer.json (byte-level BPE): vocab string -> bytes, id = rank."""
    model = json.loads(path.read_text()).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model:
        raise ValueError(f"{path}: not a byte-level BPE tokenizer.json")
    alphabet = gpt2_byte_alphabet()
    try:
        return {bytes(alphabet[c] for c in s): i for s, i in model["vocab"].items()}
    except KeyError:
        raise ValueError(f"{path}: vocabulary is not in the GPT-2 byte alphabet") from None


def train_bpe(texts, n_ranks: int) -> list[tuple[int, int]]:
    """Byte-level BPE: the merges (a, b), most frequent adjacent pair first (ties: lowest ids), counted over
    TRAIN_PAT chunks, until there are n_ranks tokens; a merge whose bytes are new makes the next id (256, 257, ...),
    one whose bytes exist reuses that token. Incremental pair counts and a lazy heap: seconds for
    the tiny corpus."""
    chunks = Counter(c.encode("utf-8") for t in texts for c in TRAIN_PAT.findall(t))
    words, freq = [list(w) for w in chunks], list(chunks.values())
    pairs, where = Counter(), {}
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freq[i]
            where.setdefault(p, set()).add(i)
    heap = [(-n, p) for p, n in pairs.items()]
    heapq.heapify(heap)
    merges, token = [], [bytes([b]) for b in range(256)]
    known = {t: i for i, t in enumerate(token)}
    while len(token) < n_ranks and heap:
        n, p = heapq.heappop(heap)
        if -n != pairs.get(p, 0) or n == 0:
            continue                                     # stale entry: the pair's count changed since
        joined = token[p[0]] + token[p[1]]
        new = known.setdefault(joined, len(token))       # "ab"+"c" after "a"+"bc": the same token, no new rank
        if new == len(token):
            token.append(joined)
        merges.append(p)
        touched = set()
        for i in sorted(where.pop(p)):
            w = words[i]
            for q in zip(w, w[1:]):
                pairs[q] -= freq[i]
                touched.add(q)
            out, k = [], 0
            while k < len(w):
                if k + 1 < len(w) and (w[k], w[k + 1]) == p:
                    out.append(new)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            words[i] = out
            for q in zip(out, out[1:]):
                pairs[q] += freq[i]
                touched.add(q)
                where.setdefault(q, set()).add(i)
        pairs.pop(p, None)
        for q in touched - {p}:
            if pairs[q] > 0:
                heapq.heappush(heap, (-pairs[q], q))
    return merges


def bpe_json(merges: list[tuple[int, int]]) -> dict:
    """Merges -> a Hugging Face tokenizer.json (byte-level BPE, GPT-2 byte alphabet) that load_tokenizer_json and
    the `tokenizers` library read (which refuses keys of its own, so what it was trained on goes beside it)."""
    to_char = {b: c for c, b in gpt2_byte_alphabet().items()}
    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    for a, b in merges:
        if tokens[a] + tokens[b] not in known:
            tokens.append(tokens[a] + tokens[b])
            known.add(tokens[-1])
    text = ["".join(to_char[x] for x in t) for t in tokens]
    pre = [{"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre}, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {s: i for i, s in enumerate(text)},
                      "merges": [[text[a], text[b]] for a, b in merges]}}


def corpus_digest(texts) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\f")
    return h.hexdigest()[:16]


def tokenizer_file(ckpt_dir: str | Path | None) -> Path | None:
    """The tokenizer file of a checkpoint directory (Meta: tokenizer.model, HF: original/tokenizer.model or
    tokenizer.json; our exports copy theirs in), or None: the embedded tokenizer."""
    if ckpt_dir is not None:
        d = Path(ckpt_dir)
        for cand in (d / "tokenizer.model", d / "original" / "tokenizer.model", d / "tokenizer.json"):
            if cand.exists():
                return cand
    return None


def embedded_ranks(digits: bool = True) -> dict[bytes, int]:
    """The embedded tokenizer's ranks: the 256 bytes, then (digits) "00".."99", each the merge of two digit bytes."""
    ranks = {bytes([b]): b for b in range(256)}
    if digits:
        ranks.update({f"{i:02d}".encode(): 256 + i for i in range(100)})
    return ranks


def export_tokenizer(name: str, init: str | Path | None, out: Path):
    """Into an export directory out/: the tokenizer a run read, so that the next stage finds it there. name is its
    --tokenizer: a file (copied as tokenizer.json or tokenizer.model), "bytes" (the plain byte tokenizer, written out
    as a tokenizer.json with V = 512) or "" (--init's file, if it has one; none: the embedded tokenizer)."""
    if name == "bytes":
        (out / "tokenizer.json").write_text(json.dumps(bpe_json([])))
        return
    src = Path(name) if name else tokenizer_file(init)
    if src is not None:
        shutil.copyfile(src, out / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model"))


class Tokenizer:
    def __init__(self, model_path: str | Path | None = None):
        if model_path is None:
            ranks, name = embedded_ranks(), "llama3-bytes-digits"
        elif str(model_path) == "bytes":
            ranks, name = embedded_ranks(digits=False), "llama3-bytes"
        else:
            model_path = Path(model_path)
            ranks = load_tokenizer_json(model_path) if model_path.suffix == ".json" else \
                load_tokenizer_model(model_path)
            name = model_path.name
        # what the data cache is keyed on: two files of one name (tokenizer.json) must not share tokenized shards
        self.digest = "" if model_path is None or str(model_path) == "bytes" else \
            hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:12]
        self.special_tokens = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.n_words = self.model.n_vocab                        # V: 128256 for Llama 3, 612 embedded
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    @classmethod
    def find(cls, ckpt_dir: str | Path | None, explicit: str | Path | None = None) -> "Tokenizer":
        """The tokenizer of a checkpoint directory (Meta or HF layout), or the embedded one if it has none."""
        if explicit is not None:
            if str(explicit) == "bytes" and Path("bytes").exists():
                raise SystemExit("--tokenizer bytes names the plain byte tokenizer, but a file ./bytes exists too: "
                                 "pass ./bytes for the file")
            try:
                return cls(explicit)
            except (OSError, ValueError) as e:        # missing, a directory, not JSON, not a tokenizer: one line
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).removeprefix(f"{explicit}: ")
                raise SystemExit(f"--tokenizer {explicit}: {reason}") from None
        found = tokenizer_file(ckpt_dir)
        return cls(found) if found is not None else cls()

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special="none", disallowed_special=()) -> list[int]:
        """Text -> ids. Special-token text is encoded as plain text unless allowed_special says otherwise
        ("all" or a set of names), as in Meta's tokenizer."""
        allowed = set() if allowed_special == "none" else allowed_special
        chunks = (s[i:i + TIKTOKEN_MAX_ENCODE_CHARS] for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS))
        ids = [self.bos_id] if bos else []
        for chunk in chunks:
            for piece in split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS):
                ids += self.model.encode(piece, allowed_special=allowed, disallowed_special=disallowed_special)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        return self.model.decode(list(ids))


def check_vocab(tok: Tokenizer, vocab_size: int, what: str):
    """A model and its tokenizer must agree on V: a larger tokenizer has ids past the model's embedding, a smaller
    one cannot decode ids the model may emit (tiktoken raises mid-run). One line naming `what` (a flag and path)."""
    hint = "; a tiny checkpoint from before the two-digit tokens: --tokenizer bytes" if vocab_size == 512 else ""
    if tok.n_words > vocab_size:
        raise SystemExit(f"the tokenizer has {tok.n_words} tokens but {what} has vocab_size {vocab_size}: pass the "
                         f"--tokenizer the model was trained with (this one: {tok.model.name}{hint})")
    if tok.n_words < vocab_size:
        raise SystemExit(f"the tokenizer has only {tok.n_words} tokens but {what} has vocab_size {vocab_size}: the "
                         f"model can emit ids {tok.n_words}..{vocab_size - 1}, which it cannot decode; pass the "
                         f"--tokenizer the model was trained with (this one: {tok.model.name})")


def split_long_runs(s: str, max_len: int):
    """Cut s wherever a run of only-whitespace or only-non-whitespace characters exceeds max_len (Meta's rule)."""
    start, run, kind = 0, 0, None
    for i, c in enumerate(s):
        space = c.isspace()
        run = run + 1 if space == kind else 1
        kind = space
        if run > max_len:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]


class ChatFormat:
    """Llama-3.1 Instruct dialog encoding (Meta's ChatFormat, no HF date preamble):
    <|begin_of_text|> (<|start_header_id|>role<|end_header_id|>\\n\\n content <|eot_id|>)* assistant header."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer

    def encode_header(self, role: str) -> list[int]:
        t = self.tok
        return [t.special_tokens["<|start_header_id|>"]] + t.encode(role, bos=False, eos=False) + \
            [t.special_tokens["<|end_header_id|>"]] + t.encode("\n\n", bos=False, eos=False)

    def encode_message(self, role: str, content: str) -> list[int]:
        return self.encode_header(role) + self.tok.encode(content.strip(), bos=False, eos=False) + [self.tok.eot_id]

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        ids = [self.tok.bos_id]
        for m in messages:
            ids += self.encode_message(m["role"], m["content"])
        return ids + self.encode_header("assistant")
