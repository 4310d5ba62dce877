"""Tests for tokenizer.py: Meta's Llama 3 tokenizer on tiktoken and the embedded default (bytes + numbers).

Every file the tokenizer reads is built here (no download): a tiny tokenizer.model with 256 single bytes plus a few
merges, and the same ranks as a Hugging Face tokenizer.json, so merges, id offsets and both readers are checked
against hand-computed ids and against the `tokenizers` library itself.

Run:  python -m pytest -q tests/test_tokenizer.py
"""
import base64
import json
import random

import pytest
import tokenizers        # Hugging Face's tokenizer library, installed with transformers (requirements-dev.txt)

from tokenizer import PAT_STR, ChatFormat, Tokenizer, bpe_json, train_bpe

# Meta's Llama-3.1 special-token offsets: id = number of base tokens + index.
OFFSETS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|finetune_right_pad_id|>": 4, "<|step_id|>": 5,
           "<|start_header_id|>": 6, "<|end_header_id|>": 7, "<|eom_id|>": 8, "<|eot_id|>": 9,
           "<|python_tag|>": 10, "<|reserved_special_token_2|>": 11, "<|reserved_special_token_246|>": 255}

TEXTS = ["Hello world!", "hello world", "café hello\n\n  wow", "It's 12345 ÉTÉ\t\r\n", "naïve 東京 🦙🦙 e\u0301",
         "<|eot_id|> is text here"]


def random_unicode(n: int, seed: int = 0) -> str:
    """n random code points from the whole range, without surrogates (not encodable in UTF-8)."""
    rng = random.Random(seed)
    cps = [rng.choice([rng.randrange(1, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800),
                       rng.randrange(0xE000, 0x110000)]) for _ in range(n)]
    return "".join(map(chr, cps))


# ----------------------------------------------------------------------------------------------------------------
# Embedded default: bytes plus the two-digit numbers


def test_embedded_default_ids():
    tok = Tokenizer()
    assert tok.n_words == 612
    for name, offset in OFFSETS.items():
        assert tok.special_tokens[name] == 356 + offset, name
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.pad_id) == (356, 357, 365, 364, 360)
    assert sorted(tok.stop_tokens) == [357, 364, 365]
    assert len(tok.special_tokens) == 256 and max(tok.special_tokens.values()) == 611
    # Bytes are their own ids, "00".."99" are 256..355: "Hi" -> [72, 105], "7" -> 55, "40" -> 296.
    assert tok.encode("Hi", bos=True, eos=True) == [356, 72, 105, 357]
    assert tok.encode("[7, 40]", bos=False, eos=False) == [91, 55, 44, 32, 296, 93]
    # Meta's regex cuts digits into runs of at most 3 ("4567" -> "456" "7"); in a run the lowest rank merges first:
    # "123" -> "12" "3", "456" -> "45" "6".
    assert tok.encode("123 4567", bos=False, eos=False) == [256 + 12, 51, 32, 256 + 45, 54, 55]
    plain = Tokenizer("bytes")                                  # the byte tokenizer of earlier tiny checkpoints
    assert plain.n_words == 512 and plain.encode("40", bos=True, eos=False) == [256, 52, 48]


def test_embedded_digits_are_the_trained_bpe_of_digit_pairs(tmp_path):
    """The embedded ranks are what tokenizer.json with the 100 digit-pair merges (bpe_json) loads to: the same ids
    through the file path, so a run with --tokenizer of that file and one without agree."""
    from tokenizer import bpe_json
    f = tmp_path / "digits.json"
    f.write_text(json.dumps(bpe_json([(48 + a, 48 + b) for a in range(10) for b in range(10)])))
    text = "Using the numbers [12, 7, 40], create 1999 = 19 * 99 + 118."
    assert Tokenizer(f).encode(text, bos=True, eos=True) == Tokenizer().encode(text, bos=True, eos=True)


@pytest.mark.parametrize("text", TEXTS + [random_unicode(3000, seed) for seed in range(3)])
def test_embedded_round_trip(text):
    tok = Tokenizer()
    ids = tok.encode(text, bos=False, eos=False)
    pieces = [tok.model.decode_single_token_bytes(i) for i in ids]   # a byte, or two digits for ids 256..355
    assert b"".join(pieces) == text.encode("utf-8")
    assert all(len(p) == 1 if i < 256 else (i < 356 and p == f"{i - 256:02d}".encode()) for i, p in zip(ids, pieces))
    assert tok.decode(ids) == text
    assert Tokenizer("bytes").encode(text, bos=False, eos=False) == list(text.encode("utf-8"))


def test_special_text_is_plain_text_unless_allowed():
    tok = Tokenizer()
    text = "<|start_header_id|>user<|end_header_id|>"
    assert tok.encode(text, bos=False, eos=False) == list(text.encode())
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [362] + list(b"user") + [363]
    assert tok.encode(text, bos=False, eos=False, allowed_special={"<|end_header_id|>"}) == \
        list(b"<|start_header_id|>user") + [363]
    assert tok.decode([362, 365]) == "<|start_header_id|><|eot_id|>"


@pytest.mark.parametrize("text", ["a" * 30_000, " " * 30_000, "x" * 60_000 + " " * 26_000 + "é" * 30_000])
def test_long_runs_encode_and_round_trip(text):
    tok = Tokenizer()
    ids = tok.encode(text, bos=False, eos=False)
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text


def test_chat_format_structure():
    tok = Tokenizer()
    dialog = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "  Hi!\n"}]
    ids = ChatFormat(tok).encode_dialog_prompt(dialog)

    def header(role):
        return [362] + list(role.encode()) + [363] + list(b"\n\n")     # start_header role end_header \n\n

    expected = [356] + header("system") + list(b"You are helpful.") + [365] \
        + header("user") + list(b"Hi!") + [365] + header("assistant")   # content stripped, assistant open
    assert ids == expected


# ----------------------------------------------------------------------------------------------------------------
# A tiny tokenizer.model and the same ranks as tokenizer.json


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet, written out here: printable Latin-1 bytes stand for themselves, the other 68 bytes
    map to chr(256), chr(257), ... in byte order (space -> 'Ġ' = chr(288), newline -> 'Ċ' = chr(266))."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


# Single bytes in reversed order (rank 255 - b: the ranks are not the byte values, as in Meta's file), then merges
# in priority order. "\xc3\xa9" is é: a merge of two bytes that are not text on their own.
MERGES = [(b"h", b"e"), (b"l", b"l"), (b"ll", b"o"), (b" ", b"w"), (b"he", b"llo"), (b"\xc3", b"\xa9")]
N_BASE = 256 + len(MERGES)


def tiny_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): 255 - b for b in range(256)}
    for a, b in MERGES:
        ranks[a + b] = len(ranks)
    return ranks


def byte_ids(s: bytes) -> list[int]:
    return [255 - b for b in s]


@pytest.fixture
def tiny_model_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in tiny_ranks().items()]
    path.write_text("".join(lines))
    return path


@pytest.fixture
def tiny_json_file(tmp_path):
    """The same ranks as a Hugging Face byte-level BPE tokenizer.json."""
    alphabet = gpt2_bytes_to_unicode()

    def s(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    pre = [{"type": "Split", "pattern": {"Regex": PAT_STR}, "behavior": "Isolated", "invert": False},
           {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre}, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {s(t): r for t, r in tiny_ranks().items()},
                      "merges": [[s(a), s(b)] for a, b in MERGES]}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False))
    return path


def test_tokenizer_model_applies_merges(tiny_model_file):
    tok = Tokenizer(tiny_model_file)
    enc = lambda s: tok.encode(s, bos=False, eos=False)   # noqa: E731
    # "hello" -> he|l|l|o -> he|ll|o -> he|llo -> hello; " world" -> " w"|o|r|l|d
    assert enc("hello world") == [260, 259] + byte_ids(b"orld")
    assert enc("café") == byte_ids(b"caf") + [261]
    assert enc("Hello") == byte_ids(b"H") + byte_ids(b"e") + [258]     # "He" is no merge: capitals differ
    assert enc("l" * 30_000) == [257] * 15_000                          # runs cut at 25000 chars, even pieces
    for text in TEXTS + [random_unicode(2000)]:
        assert tok.decode(enc(text)) == text


def test_tokenizer_model_special_ids_follow_the_ranks(tiny_model_file):
    tok = Tokenizer(tiny_model_file)
    assert tok.n_words == N_BASE + 256
    for name, offset in OFFSETS.items():
        assert tok.special_tokens[name] == N_BASE + offset, name
    assert tok.encode("<|eot_id|>", bos=True, eos=False, allowed_special="all") == [N_BASE, N_BASE + 9]
    assert tok.encode("hello", bos=True, eos=True) == [N_BASE, 260, N_BASE + 1]


def test_tokenizer_json_gives_the_same_ids(tiny_model_file, tiny_json_file):
    from_model, from_json = Tokenizer(tiny_model_file), Tokenizer(tiny_json_file)
    assert from_json.n_words == from_model.n_words
    assert from_json.special_tokens == from_model.special_tokens
    texts = TEXTS + [random_unicode(2000, seed=7)]
    for text in texts:
        assert from_json.encode(text, bos=True, eos=False) == from_model.encode(text, bos=True, eos=False), text
    # The file is a real tokenizer.json: Hugging Face's own library reads it and agrees.
    hf = tokenizers.Tokenizer.from_file(str(tiny_json_file))
    for text in texts:
        assert hf.encode(text).ids == from_json.encode(text, bos=False, eos=False), text


def test_find_in_checkpoint_directory(tmp_path, tiny_model_file):
    (tmp_path / "hf" / "original").mkdir(parents=True)
    tiny_model_file.rename(tmp_path / "hf" / "original" / "tokenizer.model")   # HF repos keep Meta's file here
    assert Tokenizer.find(tmp_path / "hf").n_words == N_BASE + 256
    (tmp_path / "empty").mkdir()
    assert Tokenizer.find(tmp_path / "empty").n_words == 612


@pytest.mark.parametrize("bad_line", ["aGVsbG8=", "!!not-base64!! 300", "aGVsbG8= three", "aGk= 1 2"])
def test_malformed_tokenizer_model_line(tiny_model_file, bad_line):
    lines = tiny_model_file.read_text().splitlines()
    lines.insert(2, bad_line)
    tiny_model_file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer.model: line 3 is not '<base64 token> <rank>'") as e:
        Tokenizer(tiny_model_file)
    msg = str(e.value)
    assert str(tiny_model_file) in msg and "\n" not in msg


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found") as e:
        Tokenizer(tmp_path / "tokenizer.model")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# A BPE trained on the embedded corpus (opt-in: python data.py tokenizer)


def test_train_bpe_by_hand():
    # chunks "ab", " ab", " ab", " abc": (a, b) x4 first, then (" ", ab) x3, then (" ab", c) x1
    assert train_bpe(["ab ab ab abc"], 259) == [(97, 98), (32, 256), (257, 99)]
    # ties go to the lowest ids: chunks "ab", " cd", " ab", " cd" have (a, b), (" ", c), (c, d) x2 each
    assert train_bpe(["ab cd ab cd"], 257) == [(32, 99)]
    spec = bpe_json(train_bpe(["the cat, the hat; the 12345 cats"], 300))["model"]
    assert sorted(spec["vocab"].values()) == list(range(len(spec["vocab"])))      # ids 0.. without a gap
    assert any(m in spec["merges"] for m in (["Ġ", "the"], ["Ġt", "he"], ["Ġth", "e"]))


def test_trained_bpe_loads_and_agrees_with_hugging_face(tmp_path, capsys):
    """`python data.py tokenizer` writes a tokenizer.json that Tokenizer and the `tokenizers` library encode alike,
    with fewer tokens than bytes, and a note of what it was trained on; a rerun writes the same file."""
    from data import main as data_main, stdlib_docs
    out = tmp_path / "bpe.json"
    data_main(["tokenizer", "--ranks", "600", "--out", str(out)])
    first = out.read_bytes()
    note = json.loads((tmp_path / "bpe.trained-on.json").read_text())
    assert note["ranks"] == note["asked"] == 600 and len(note["digest"]) == 16 and "embedded corpus" in note["corpus"]
    tok, hf = Tokenizer(out), tokenizers.Tokenizer.from_file(str(out))
    assert tok.n_words == 600 + 256 and tok.bos_id == 600
    texts = TEXTS + stdlib_docs()[:100] + ["Using the numbers [12, 7, 3], create an equation that equals 33."]
    for text in texts:
        ids = tok.encode(text, bos=False, eos=False)
        assert hf.encode(text).ids == ids and tok.decode(ids) == text, text[:80]
    doc = stdlib_docs()[0]
    assert len(tok.encode(doc, bos=False, eos=False)) < 0.7 * len(doc.encode())  # the corpus is 95% task text
    data_main(["tokenizer", "--ranks", "600", "--out", str(out)])
    assert out.read_bytes() == first                                           # deterministic
    with pytest.raises(SystemExit) as e:
        data_main(["tokenizer", "--ranks", "256", "--out", str(out)])
    assert "--ranks 256" in str(e.value)
    import os
    os.mkfifo(tmp_path / "pipe.json")
    for bad, why in ((tmp_path, "expected a path ending in .json"), (tmp_path / "bpe.trained-on.json", "not "
                     ".trained-on.json"), (tmp_path / "pipe.json", "is not a regular file")):
        with pytest.raises(SystemExit) as e:
            data_main(["tokenizer", "--ranks", "300", "--out", str(bad)])
        assert f"--out {bad}: " in str(e.value) and why in str(e.value), str(e.value)
    assert out.read_bytes() == first and (tmp_path / "pipe.json").is_fifo()
    with pytest.raises(SystemExit) as e:
        Tokenizer.find(None, tmp_path / "bpe.trained-on.json")          # a JSON file that is no tokenizer
    assert str(e.value) == f"--tokenizer {tmp_path / 'bpe.trained-on.json'}: not a byte-level BPE tokenizer.json"
    for missing in (tmp_path / "none.json", tmp_path / "none.model", tmp_path):
        with pytest.raises(SystemExit, match=f"--tokenizer {missing}: "):
            Tokenizer.find(None, missing)


def test_train_bpe_stops_when_no_pair_is_left():
    merges = train_bpe(["abab abab"], 10_000)       # "abab", " abab": ab, then abab / " abab" ... then nothing
    spec = bpe_json(merges)["model"]
    assert len(spec["vocab"]) == 256 + len(merges) < 10_000 and len(merges) >= 3


def test_exports_carry_the_run_tokenizer_and_rl_checks_it(tmp_path, chain):
    """An export holds the tokenizer the run read (--tokenizer, else the one in --init), so the next stage finds it
    without the flag; an export of the embedded tokenizer holds none. rl.py --eval-only refuses a tokenizer whose
    vocabulary is not the model's (it used to evaluate with it and decode nonsense)."""
    import train
    from conftest import LM
    from tokenizer import bpe_json, tokenizer_file
    src = tmp_path / "bytes-as-json.json"                  # the byte ranks written as a tokenizer.json: V = 512
    src.write_text(json.dumps(bpe_json([])))
    flags = [*LM, "--steps", "1", "--dtype", "float32"]
    train.main(["--stage", "base", "--out-dir", str(tmp_path / "base"), "--tokenizer", str(src), *flags])
    copied = tmp_path / "base/final/tokenizer.json"
    assert copied.read_bytes() == src.read_bytes() and Tokenizer.find(tmp_path / "base/final").model.name == copied.name
    train.main(["--stage", "pretrain", "--out-dir", str(tmp_path / "a"), "--init", str(tmp_path / "base/final"),
                *flags])
    assert (tmp_path / "a/final/tokenizer.json").read_bytes() == src.read_bytes()
    assert tokenizer_file(chain / "sft/final") is None                  # the chain runs on the embedded tokenizer
    import rl
    with pytest.raises(SystemExit, match=r"the tokenizer has only 512 tokens but --init .* has vocab_size 612"):
        rl.main(["--init", str(chain / "sft/final"), "--level", "token", "--eval-only", "--tokenizer", str(src),
                 "--eval-problems", "1", "--max-new-tokens", "2", "--judge", "none", "--dtype", "float32"])
