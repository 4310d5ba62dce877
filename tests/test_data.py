"""data.py: embedded corpus, task generators and checkers, token shards, loaders, SFT encoding (all CPU, ~10 s)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import SFTLoader, TokenLoader, embedded_corpus, encode_sft, load_sft_jsonl, prepare, prepare_embedded, stdlib_docs
from tasks import task_sft_records
from tokenizer import ChatFormat, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ---- corpus ----------------------------------------------------------------------------------------------------

def test_stdlib_docs_deterministic_and_large():
    docs = stdlib_docs()
    chars = sum(map(len, docs))
    print(f"stdlib docstrings: {len(docs)} documents, {chars:,} characters")
    assert chars > 1_000_000 and len(docs) > 1000
    assert len(set(docs)) == len(docs)                                   # deduplicated
    assert min(map(len, docs)) >= data.MIN_DOC_CHARS
    assert stdlib_docs() == docs
    # the cache is what extraction gives: extracting the first files afresh reproduces the corpus's prefix
    fresh = data.extract_docstrings(data.stdlib_files()[:25])
    assert fresh and docs[:len(fresh)] == fresh
    assert all(not d[0].isspace() and "\t" not in d[:1] for d in fresh)  # cleaned (cleandoc)


def test_embedded_corpus_splits_disjoint_and_mixed():
    train, val = embedded_corpus("train", 0), embedded_corpus("val", 0)
    assert embedded_corpus("train", 0) == train                          # deterministic
    assert val and not set(train) & set(val)                             # held out, never overlapping
    docs = set(stdlib_docs())
    n_val_docs = sum(d in docs for d in val)
    assert 0.02 < n_val_docs / len(docs) < 0.09                          # ~5% of docstrings are val
    assert set(train) | set(val) >= docs                                 # every docstring is in one split
    tasks_ = [d for d in train if d not in docs]
    assert 0.93 < sum(map(len, tasks_)) / sum(map(len, train)) < 0.97     # tasks ~95% of the characters
    two = sum(d.startswith("Using the numbers [") and d.index("]") < d.index(",", d.index(",") + 1) for d in tasks_)
    assert abs(two / len(tasks_) - 0.75) < 0.01                           # countdown-2 three times in four
    other = embedded_corpus("train", 1)                                  # the seed changes tasks, not docstrings
    assert {d for d in other if d in docs} == {d for d in train if d in docs} and other != train
    with pytest.raises(ValueError):
        embedded_corpus("test")


# ---- shards ----------------------------------------------------------------------------------------------------

def test_prepare_roundtrip_uint32_atomic(tmp_path, tok):
    (tmp_path / "a.txt").write_text("First document.\n\fSecond one, with a blank line\n\nin it. \u00e9\u4e2d\n\f\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Third <|eot_id|> text"}) + "\n\n" +
                                      json.dumps({"text": "Fourth", "id": 4}) + "\n")
    docs = ["First document.", "Second one, with a blank line\n\nin it. \u00e9\u4e2d", "Third <|eot_id|> text",
            "Fourth"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard_00099.bin").write_bytes(b"\0" * 8)                     # stale shard of an earlier run
    paths = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], out, tok, shard_tokens=16)
    assert len(paths) > 2 and all(p.stat().st_size % 4 == 0 for p in paths)
    ids = np.concatenate([np.fromfile(p, dtype=np.uint32) for p in paths])
    assert tok.decode(ids.tolist()) == "".join(BOS + d + EOS for d in docs)
    assert ids.tolist() == [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_tokens"] == len(ids) and meta["n_documents"] == 4 and meta["vocab_size"] == tok.n_words
    assert sorted(f.name for f in out.iterdir()) == sorted([p.name for p in paths] + ["meta.json"])  # no temp files


def test_prepare_errors_are_one_line(tmp_path, tok):
    with pytest.raises(FileNotFoundError) as e:
        prepare([tmp_path / "missing.txt"], tmp_path / "o", tok)
    assert "missing.txt" in one_line(e)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError) as e:
        prepare([tmp_path / "bad.jsonl"], tmp_path / "o", tok)
    assert "bad.jsonl:2" in one_line(e)
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n\n{"text": \n')
    with pytest.raises(ValueError) as e:
        prepare([tmp_path / "broken.jsonl"], tmp_path / "o", tok)
    assert "broken.jsonl:3" in one_line(e)
    (tmp_path / "empty.txt").write_text("  \f\n")
    with pytest.raises(ValueError) as e:
        prepare([tmp_path / "empty.txt"], tmp_path / "o", tok)
    assert "no documents" in one_line(e)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError) as e:
        prepare([tmp_path / "x.csv"], tmp_path / "o", tok)
    assert ".csv" in one_line(e)


def test_prepare_embedded(tmp_path, tok):
    out = prepare_embedded(tmp_path, tok, seed=0)
    n = {s: sum(p.stat().st_size // 4 for p in paths) for s, paths in out.items()}
    print(f"embedded corpus, byte tokenizer: {n}")
    assert set(out) == {"train", "val"} and n["train"] > 1_000_000 and n["val"] > 20_000
    val = np.fromfile(out["val"][0], dtype=np.uint32)
    assert val[0] == tok.bos_id and val[-1] == tok.eos_id and (val == tok.bos_id).sum() == (val == tok.eos_id).sum()


# ---- TokenLoader -----------------------------------------------------------------------------------------------

def arange_shards(tmp_path, n, cut):
    """A token stream 0..n-1 split into two shards at `cut`: a window's first token is its offset."""
    a = np.arange(n, dtype=np.uint32)
    (tmp_path / "shard_00000.bin").write_bytes(a[:cut].tobytes())
    (tmp_path / "shard_00001.bin").write_bytes(a[cut:].tobytes())
    return [tmp_path / "shard_00000.bin", tmp_path / "shard_00001.bin"]


def epoch_windows(loader, n_batches):
    return [w for _ in range(n_batches) for w in loader.next_batch().tokens]


def test_token_loader_windows_ranks_union(tmp_path):
    T, B = 8, 3
    paths = arange_shards(tmp_path, 24 * T + 1, cut=101)                 # 24 windows, one straddles the cut
    single = TokenLoader(paths, B, T, seed=5)
    assert single.n_windows == 24
    ws = epoch_windows(single, 8)                                        # one epoch = 24 windows
    assert all(w.shape == (T + 1,) and w.dtype == torch.long for w in ws)
    assert all(torch.equal(w, torch.arange(w[0], w[0] + T + 1)) for w in ws)   # contiguous, stride T
    starts = [int(w[0]) for w in ws]
    assert sorted(starts) == list(range(0, 24 * T, T)) and starts != sorted(starts)   # each once, shuffled
    assert [int(w[0]) for w in epoch_windows(single, 8)] != starts      # next epoch: new order
    # Global batch 6 = 2 ranks x micro 3: each step's 6 windows are the single-process step's, micro batch for
    # micro batch (rank 0 the first 3, rank 1 the next 3), and the stream positions say which rows they are.
    one = TokenLoader(paths, B, T, seed=5, global_batch=6)
    two = [TokenLoader(tmp_path, B, T, r, 2, seed=5, global_batch=6) for r in range(2)]
    for step in range(10):                                               # crosses epoch boundaries
        for r in range(2):
            want, got = one.next_batch(), two[r].next_batch()
            assert torch.equal(got.tokens, want.tokens) and bool(got.mask.all())
            assert got.ids.tolist() == want.ids.tolist() == list(range(6 * step + 3 * r, 6 * step + 3 * r + 3))
    with pytest.raises(ValueError, match="global batch 8 is not a multiple of world size 2 x micro batch 3"):
        TokenLoader(paths, B, T, 0, 2, global_batch=8)


def test_token_loader_resume(tmp_path):
    paths = arange_shards(tmp_path, 30 * 8 + 5, cut=77)
    a = TokenLoader(paths, 4, 8, rank=1, world_size=2, seed=3)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))                       # survives a checkpoint
    expected = [a.next_batch() for _ in range(10)]                       # crosses epoch boundaries (30/epoch)
    b = TokenLoader(paths, 4, 8, rank=1, world_size=2, seed=3)
    b.load_state_dict(state)
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(expected, [b.next_batch() for _ in range(10)]))
    # the same state resumes on one rank: it reads both ranks' rows of the next steps, in the same order
    c = TokenLoader(paths, 4, 8, seed=3, global_batch=8)
    c.load_state_dict(state)
    both = [c.next_batch() for _ in range(20)]
    assert all(torch.equal(x.tokens, y.tokens) for x, y in zip(expected, both[1::2]))
    with pytest.raises(ValueError):
        TokenLoader(paths, 4, 16, rank=1, world_size=2, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch 8, now 4"):
        TokenLoader(paths, 4, 8, seed=3).load_state_dict(state)


def test_token_loader_errors(tmp_path):
    paths = arange_shards(tmp_path, 20, cut=7)
    with pytest.raises(ValueError) as e:
        TokenLoader(paths, 2, 32, rank=0, world_size=2)
    assert "has 20 tokens, fewer than one window of seq_len+1 = 33" in one_line(e)
    with pytest.raises(FileNotFoundError) as e:
        TokenLoader([tmp_path / "nope.bin"], 2, 4)
    assert "nope.bin" in one_line(e)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        TokenLoader([tmp_path / "empty.bin"], 2, 4)
    assert "empty.bin" in one_line(e)


# ---- SFT -------------------------------------------------------------------------------------------------------

def test_encode_sft_mask_is_the_response(tok):
    recs = task_sft_records("arith", "train", 4, seed=0) + [{"prompt": "Hi\n", "response": "Hello!"}]
    L = 400
    x, m = encode_sft(recs, tok, L - 1)
    assert x.shape == m.shape == (5, L) and x.dtype == torch.long and m.dtype == torch.bool
    for r, row, mask in zip(recs, x, m):
        head = tok.encode(r["prompt"], bos=True, eos=False)
        body = tok.encode(r["response"], bos=False, eos=True)
        assert row[mask].tolist() == body                                # response + eos, nothing else
        assert row[:len(head)].tolist() == head and not mask[:len(head)].any()
        assert (row[len(head) + len(body):] == tok.eos_id).all()         # right padding with eos, unmasked
    xc, mc = encode_sft(recs, tok, L - 1, chat=True)
    fmt = ChatFormat(tok)
    for r, row, mask in zip(recs, xc, mc):
        head = fmt.encode_dialog_prompt([{"role": "user", "content": r["prompt"]}])
        assert row[:len(head)].tolist() == head and not mask[:len(head)].any()
        assert row[mask].tolist() == tok.encode(r["response"].strip(), bos=False, eos=False) + [tok.eot_id]
    long = [{"prompt": "p" * 10, "response": "r" * 100}, {"prompt": "p" * 100, "response": "r"}]
    with pytest.warns(UserWarning, match="2 of 3 SFT records .* truncated \\(1 dropped"):
        xt, mt = encode_sft(long + recs[-1:], tok, 31)
    assert xt.shape == (2, 32) and mt[0, 11:].all() and not mt[0, :11].any()


def test_sft_loader_and_jsonl(tmp_path, tok):
    x, m = encode_sft(task_sft_records("countdown", "train", 10, seed=0), tok, 511)
    batches = lambda ld, k: [ld.next_batch() for _ in range(k)]          # noqa: E731
    full = lambda bs: torch.cat([torch.nn.functional.pad(b.tokens, (0, 512 - b.tokens.shape[1]), value=tok.eos_id)
                                 for b in bs])                            # noqa: E731  (batches come cut)
    a = SFTLoader(x, m, 3, rank=0, world_size=2, seed=1)
    order = full(batches(SFTLoader(x, m, 5, seed=1), 2))                 # one epoch, single rank
    got = full(batches(SFTLoader(x, m, 5, 1, 2, seed=1), 1))
    assert torch.equal(got, order[5:10])                                 # rank 1: the second half of step 0
    batches(a, 2)
    state = a.state_dict()
    b = SFTLoader(x, m, 3, rank=0, world_size=2, seed=1)
    b.load_state_dict(state)
    for (t1, m1, i1), (t2, m2, i2) in zip(batches(a, 4), batches(b, 4)):
        assert torch.equal(t1, t2) and torch.equal(m1, m2) and torch.equal(i1, i2) and t1.shape[0] == 3
        assert t1.shape[1] <= 512 and m1[:, -1].any()                    # cut after the batch's last target
    with pytest.raises(ValueError, match="SFTLoader needs a counted target"):
        SFTLoader(x, torch.zeros_like(m), 3)
    f = tmp_path / "sft.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(ValueError) as e:
        load_sft_jsonl(f)
    assert "sft.jsonl:2" in one_line(e)
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    assert load_sft_jsonl(f) == [{"prompt": "a", "response": "b"}]


def test_sft_batches_cut_after_the_last_target(tok):
    """SFTLoader drops the columns that are padding in every row; on a causal model the loss and every gradient
    equal those of the full window (base_loss, the token SFT loss)."""
    from model import ModelArgs, Transformer
    from train import base_loss
    recs = [{"prompt": "p" * (5 + 3 * i), "response": "r" * (4 + i)} for i in range(4)]
    x, m = encode_sft(recs, tok, 63)
    b = SFTLoader(x, m, 4, seed=0).next_batch()
    longest = max(len(tok.encode(r["prompt"], bos=True, eos=False)) + len(r["response"]) + 1 for r in recs)
    assert b.tokens.shape == b.mask.shape == (4, longest) and b.mask[:, -1].any()
    F = torch.nn.functional
    padded = data.Batch(F.pad(b.tokens, (0, 64 - longest), value=tok.eos_id), F.pad(b.mask, (0, 64 - longest)), b.ids)
    assert sorted(map(tuple, padded.tokens.tolist())) == sorted(map(tuple, x.tolist()))  # the records, uncut [4, 64]
    assert sorted(map(tuple, padded.mask.tolist())) == sorted(map(tuple, m.tolist()))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                                  max_seq_len=64))
    grads = []
    for batch in (b, padded):
        model.zero_grad()
        loss, _ = base_loss(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert all(torch.allclose(g0, g1, atol=1e-6) for g0, g1 in zip(grads[0][1], grads[1][1]))


def test_cli_sample():
    r = subprocess.run([sys.executable, "data.py", "sample", "--kind", "countdown", "-n", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- countdown") == 2 and r.stdout.count("</answer>\n") == 2
    assert "reward(reference)=1.0" in r.stdout
