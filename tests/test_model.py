"""Tests for model.py: the Llama-3.1 base of CoLA (PAPER.md §2, "Base").

Tiers, all on CPU in a few seconds:
  parity      our logits and greedy tokens == transformers' LlamaForCausalLM, for checkpoints in every layout we
              read (HF written by us, HF written by transformers, sharded, tied, Meta consolidated.00.pth);
  round trip  save_pretrained -> from_pretrained is bit-exact in float32 and bfloat16;
  generation  KV cache == no cache, eos, seeded sampling, a prefill chunk after a cached prefix;
  errors      each predictable mistake gives one line naming the file / tensor and what was expected;
  RoPE        llama3 frequencies == transformers' reference exactly; RoPE stays float32 in a bf16 model;
  meta device build on 'meta' -> to_empty -> init_weights, and the presets' exact parameter counts.

Run:  python -m pytest -q tests/test_model.py

The tiny config keeps every feature the 8B model has: grouped-query attention (H=4, Hkv=2), untied and tied
embeddings, and llama3 rope scaling whose three frequency bands all apply. The original context is 64 instead
of 8192 so that sequences of 384 tokens rotate the slowed low-frequency channels by a visible angle: a loader
that dropped or mis-read rope_scaling fails the 1e-4 logit check.
"""
import json
import math
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM      # the independent reference (requirements-dev.txt)

from model import PRESETS, ModelArgs, Transformer, apply_rope, rope_frequencies


# Small tensors: one thread is as fast, and immune to a busy neighbour on a shared CPU (an OpenMP barrier waiting for
# a descheduled second thread made this file 10x slower on a loaded 2-core VM). conftest's fixture.
pytestmark = pytest.mark.usefixtures("one_thread")


# The Meta rule gives F = 352 for d = 128: int(8 * 128 / 3) = 341 -> round up to a multiple of 32.
ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                 ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=10000.0, use_scaled_rope=True,
                 rope_scale_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                 rope_original_context=64, max_seq_len=512)
SEQ = 384            # longer than 4x the original context: all three rope bands matter
PROMPT, NEW = 300, 16


def hf_llama_config(tie: bool = False, original_context: int = 64) -> LlamaConfig:
    """The same architecture as ARGS, spelled the transformers way (written here, not by model.hf_config)."""
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": original_context},
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights far from the usual 0.02 init so attention is peaked and every channel matters (norms too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():       # a tied weight is visited once
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.15 * noise)
    return model


def random_hf_model(tie: bool = False, original_context: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return randomize_(LlamaForCausalLM(hf_llama_config(tie, original_context)), seed).eval()


def random_model(tie: bool = False, dtype=torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    args = replace(ARGS, tie_embeddings=tie)
    return randomize_(Transformer(args), seed).to(dtype).eval()


def load_hf(path) -> LlamaForCausalLM:
    """transformers' own loader; it must find every tensor it expects (it silently re-inits missing ones)."""
    hf, info = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return hf.eval()


def assert_same_model(ours: Transformer, hf: LlamaForCausalLM):
    """minGPT's test_huggingface_import: logits allclose, greedy tokens identical."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))   # [B, T]
    with torch.no_grad():
        ours_logits, hf_logits = ours(tokens), hf(tokens).logits                                       # [B, T, V]
    diff = (ours_logits - hf_logits).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff:.2e}"
    prompts = tokens[:, :PROMPT]                                                                       # [B, T]
    hf_new = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, PROMPT:]            # [B, NEW]
    assert ours.generate(prompts.tolist(), NEW, temperature=0.0) == hf_new.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Parity with transformers, every checkpoint layout


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_hf_checkpoint_written_by_transformers(tmp_path, tie, shard):
    hf = random_hf_model(tie)
    hf.save_pretrained(tmp_path, max_shard_size=shard or "1GB")
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").exists(), files
    if tie:      # transformers drops the tied duplicate: the loader must re-tie
        index = tmp_path / "model.safetensors.index.json"
        names = json.loads(index.read_text())["weight_map"] if shard else safetensors_names(tmp_path / files[0])
        assert "lm_head.weight" not in names
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.args.use_scaled_rope and ours.args.rope_original_context == 64
    assert (ours.output.weight is ours.tok_embeddings.weight) == tie
    assert_same_model(ours, hf)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("shard", [None, 40_000], ids=["single", "sharded"])
def test_hf_checkpoint_written_by_us(tmp_path, tie, shard):
    ours = random_model(tie)
    ours.save_pretrained(tmp_path, **({"max_shard_bytes": shard} if shard else {}))
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
        assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == shards
        assert not (tmp_path / "model.safetensors").exists()
    assert_same_model(ours, load_hf(tmp_path))                     # transformers reads what we write
    assert_same_model(Transformer.from_pretrained(tmp_path), load_hf(tmp_path))


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the converter's q/k permutation, written with explicit row indices.

    Inside a head of Dh rows, HF keeps Meta's pair (2i, 2i+1) at rows (i, Dh/2 + i): Meta row 2i + c is
    HF row c * Dh/2 + i.
    """
    dh = w.shape[0] // n_heads
    rows = [h * dh + c * (dh // 2) + i for h in range(n_heads) for i in range(dh // 2) for c in (0, 1)]
    return w[rows]


def write_meta_checkpoint(path: Path, hf: LlamaForCausalLM, params: dict):
    """params.json + consolidated.00.pth with Meta's names from an HF model."""
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    c = hf.config
    state = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    # Meta's 3.2 files carry output.weight even when tied; here it is the same tensor as the embeddings.
    state["output.weight"] = state["tok_embeddings.weight"] if c.tie_word_embeddings else sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        state.update({
            f"layers.{i}.attention.wq.weight": hf_to_meta_rows(sd[p + "self_attn.q_proj.weight"], 4),
            f"layers.{i}.attention.wk.weight": hf_to_meta_rows(sd[p + "self_attn.k_proj.weight"], 2),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(params))


# Meta's params.json keys for the tiny architecture.
META_PARAMS = {"dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "multiple_of": 32,
               "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 10000.0, "use_scaled_rope": True}


@pytest.mark.parametrize("tie,original_context,extra", [
    (False, 64, {"rope_original_context": 64}),    # our ModelArgs field, to test the short-context scaling
    (True, 64, {"rope_original_context": 64}),
    (False, 8192, {}),                              # Meta's exact key set: scaling constants default to 3.1's
], ids=["untied", "tied", "meta-keys-only"])
def test_meta_checkpoint(tmp_path, tie, original_context, extra):
    hf = random_hf_model(tie, original_context)
    write_meta_checkpoint(tmp_path, hf, {**META_PARAMS, **extra})
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.args.ffn_hidden == 352 and ours.args.rope_original_context == original_context
    assert_same_model(ours, hf)


# ----------------------------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_round_trip_is_bit_exact(tmp_path, dtype, tie):
    ours = random_model(tie, dtype)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).removeprefix("torch.")
    back = Transformer.from_pretrained(tmp_path, dtype=dtype)
    # config.json stores F itself (intermediate_size), not Meta's rule that produced it
    rule = ("multiple_of", "ffn_dim_multiplier", "ffn_hidden_dim")
    assert replace(back.args, **{k: getattr(ours.args, k) for k in rule}) == ours.args
    assert back.args.ffn_hidden == ours.args.ffn_hidden
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k], b[k]), k
    assert (back.output.weight is back.tok_embeddings.weight) == tie


# ----------------------------------------------------------------------------------------------------------------
# Generation


def prompts_of(lengths, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ARGS.vocab_size, (n,), generator=g).tolist() for n in lengths]


LENGTHS = [5, 23, 40]


def test_greedy_kv_cache_equals_no_cache_and_rows_are_independent():
    model = random_model()
    prompts = prompts_of(LENGTHS)
    cached = model.generate(prompts, 20, temperature=0.0, use_cache=True)
    assert cached == model.generate(prompts, 20, temperature=0.0, use_cache=False)
    assert [len(o) for o in cached] == [20, 20, 20]
    assert all(a.attention.cache is None for a in model.layers)       # the cache is freed afterwards
    # Meta's scheme must not leak between rows: each prompt alone gives the same tokens.
    assert cached == [model.generate([p], 20, temperature=0.0)[0] for p in prompts]


def test_eos_stops_each_row():
    model = random_model()
    prompts = prompts_of(LENGTHS)
    free = model.generate(prompts, 20, temperature=0.0)
    # A different stop token per row, each produced at a different step (0-based) of its own row; plus a token of
    # the longest prompt past the shortest prompt's end: an eos id read from a prompt must not stop that row.
    eos = [free[0][2], free[1][6], free[2][11], prompts[2][30]]
    first_stop = [min(j for j, t in enumerate(row) if t in eos) for row in free]
    out = model.generate(prompts, 20, temperature=0.0, eos=eos)
    assert out == [row[:j + 1] for row, j in zip(free, first_stop)]
    assert max(len(o) for o in out) < 20


def test_seeded_sampling_is_reproducible():
    model = random_model()
    prompts = prompts_of(LENGTHS)

    def run(seed):
        return model.generate(prompts, 20, temperature=1.0, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    assert run(0) == run(0)
    assert run(0) != run(1)
    assert run(0) != model.generate(prompts, 20, temperature=0.0)


def test_prefill_chunk_after_cached_prefix_equals_uncached():
    model = random_model()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 200), generator=torch.Generator().manual_seed(3))  # [B, T]
    with torch.no_grad():
        full = model(tokens)                                                                       # [B, T, V]
        model.setup_cache(2, 200)
        try:
            prefix = model(tokens[:, :120], start_pos=0)                                           # [B, 120, V]
            chunk = model(tokens[:, 120:170], start_pos=120)                                       # [B, 50, V]
            step = model(tokens[:, 170:171], start_pos=170)                                        # [B, 1, V]
        finally:
            model.clear_cache()
    torch.testing.assert_close(prefix, full[:, :120], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunk, full[:, 120:170], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, 170:171], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line naming the file or tensor and what was expected


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


def safetensors_names(f: Path) -> set:
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    return set(json.loads(f.read_bytes()[8:8 + n])) - {"__metadata__"}


def test_missing_shard(tmp_path):
    random_model().save_pretrained(tmp_path, max_shard_bytes=40_000)
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim.name}.*missing") as e:
        Transformer.from_pretrained(tmp_path)
    assert str(victim) in one_line(e)


@pytest.mark.parametrize("keep", [4, 100, 0.5], ids=["no-header-length", "header", "data"])
def test_truncated_safetensors(tmp_path, keep):
    random_model().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="model.safetensors: truncated safetensors file") as e:
        Transformer.from_pretrained(tmp_path)
    one_line(e)


@pytest.mark.parametrize("field,value,match", [
    # hidden_size 128 -> 96 (head_dim removed so it is derived): the embedding no longer fits
    # errors name tensors as the HF file spells them
    ("hidden_size", 96, r"'model.embed_tokens.weight' has shape \(256, 128\), config expects \(256, 96\)"),
    ("intermediate_size", 256, r"'model.layers.0.mlp.gate_proj.weight' has shape \(352, 128\), config expects "
                               r"\(256, 128\)"),
    ("num_hidden_layers", 3, r"missing tensor 'model.layers.2.self_attn.q_proj.weight'"),
    ("num_hidden_layers", 1, r"unexpected tensor 'model.layers.1."),
])
def test_config_disagrees_with_tensors(tmp_path, field, value, match):
    random_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    cfg.pop("head_dim")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match) as e:
        Transformer.from_pretrained(tmp_path)
    assert one_line(e).startswith(str(tmp_path))


def test_directory_of_neither_layout(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="neither a Hugging Face checkpoint.*nor a Meta one") as e:
        Transformer.from_pretrained(tmp_path)
    assert str(tmp_path) in one_line(e)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found") as e:
        Transformer.from_pretrained(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_line(e)


def test_meta_directory_without_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    with pytest.raises(FileNotFoundError, match="params.json found but no consolidated.00.pth") as e:
        Transformer.from_pretrained(tmp_path)
    one_line(e)


def test_corrupt_meta_weights(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(META_PARAMS))
    (tmp_path / "consolidated.00.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="consolidated.00.pth: cannot read") as e:
        Transformer.from_pretrained(tmp_path)
    one_line(e)


def test_prompt_longer_than_max_seq_len():
    model = Transformer(replace(ARGS, max_seq_len=64))
    with pytest.raises(ValueError, match="prompt of 65 tokens is longer than max_seq_len 64") as e:
        model.generate([[1] * 10, [1] * 65], 4)
    one_line(e)


# ----------------------------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("preset", ["llama-3.1-8b", "llama-3.2-1b", "test"])
def test_rope_frequencies_equal_transformers_llama3(preset):
    from transformers.modeling_rope_utils import _compute_llama3_parameters
    args = ARGS if preset == "test" else PRESETS[preset]
    cfg = LlamaConfig(hidden_size=args.dim, num_attention_heads=args.n_heads, rope_theta=args.rope_theta,
                      rope_scaling={"rope_type": "llama3", "factor": args.rope_scale_factor,
                                    "low_freq_factor": args.rope_low_freq_factor,
                                    "high_freq_factor": args.rope_high_freq_factor,
                                    "original_max_position_embeddings": args.rope_original_context})
    reference, attention_factor = _compute_llama3_parameters(cfg, "cpu")
    ours = rope_frequencies(args)
    assert ours.dtype == torch.float32 and attention_factor == 1.0
    # Within a few float32 ulps (rtol 1e-6): the same formula written in another order may round differently.
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0)
    # The case is only meaningful if all three bands occur: kept, divided by the factor, and smoothed.
    plain = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    kept = torch.isclose(ours, plain, rtol=1e-6, atol=0)
    slowed = torch.isclose(ours, plain / args.rope_scale_factor, rtol=1e-6, atol=0)
    assert kept.any() and slowed.any() and (~kept & ~slowed).any()


def test_apply_rope_equals_meta_complex_multiply():
    """Meta's apply_rotary_emb: view adjacent pairs as complex numbers, multiply by polar(1, t * freq)."""
    x = torch.randn(2, 50, 4, 32, dtype=torch.float64).float()                                  # [B, T, H, Dh]
    freqs = rope_frequencies(ARGS)                                                              # [Dh/2]
    angles = torch.outer(torch.arange(100, 150).float(), freqs)                                 # [T, Dh/2]
    freqs_cis = torch.polar(torch.ones_like(angles), angles)                                    # [T, Dh/2]
    expected = torch.view_as_real(torch.view_as_complex(x.reshape(2, 50, 4, 16, 2))
                                  * freqs_cis[None, :, None]).flatten(3)                        # [B, T, H, Dh]
    table = torch.stack([angles.cos(), angles.sin()], -1)                                       # [T, Dh/2, 2]
    torch.testing.assert_close(apply_rope(x, table), expected, atol=1e-6, rtol=0)


def test_bf16_model_keeps_rope_in_float32():
    model = random_model().to(torch.bfloat16)
    tokens = torch.randint(0, ARGS.vocab_size, (1, 300))
    with torch.no_grad():
        logits = model(tokens)
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all()
    assert model.rope.table.dtype == torch.float32
    assert not any("rope" in k for k in model.state_dict())     # never saved, never cast with the weights
    # In bf16 the angle t * freq of position 300 would be off by up to ~1 rad: the float32 table is exact.
    torch.testing.assert_close(model.rope.table[300, :, 0], torch.cos(300 * rope_frequencies(ARGS)))
    # RoPE's inputs are bf16 but the rotation happens in float32 before a single rounding.
    q = torch.randn(1, 300, 4, 32).bfloat16()
    expected = apply_rope(q.float(), model.rope.table[:300]).bfloat16()
    assert torch.equal(apply_rope(q, model.rope.table[:300]), expected)


# ----------------------------------------------------------------------------------------------------------------
# Meta-device build and presets


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_meta_device_build_then_init_weights(tie):
    args = replace(PRESETS["tiny"], tie_embeddings=tie)
    with torch.device("meta"):
        model = Transformer(args)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert torch.allclose(model.norm.weight, torch.ones(args.dim))
    std = model.layers[0].attention.wq.weight.std().item()
    assert 0.018 < std < 0.022
    logits = model(torch.randint(0, args.vocab_size, (2, 64)))
    assert logits.isfinite().all()
    # Fresh random init: loss near ln V (logits of std ~1 add ~0.5), far from the ~100 of uninitialised memory.
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.randint(0, args.vocab_size, (128,)))
    assert abs(loss.item() - math.log(args.vocab_size)) < 1.0


def test_presets():
    with torch.device("meta"):
        llama8b, llama1b = Transformer(PRESETS["llama-3.1-8b"]), Transformer(PRESETS["llama-3.2-1b"])
    assert llama8b.num_params() == 8_030_261_248            
    assert PRESETS["llama-3.1-8b"].ffn_hidden == 14336
    assert not PRESETS["llama-3.1-8b"].tie_embeddings and llama8b.output.weight is not llama8b.tok_embeddings.weight
    assert llama1b.num_params() == 1_235_814_400              # tied: the 128256 x 2048 matrix counted once
    assert PRESETS["llama-3.2-1b"].ffn_hidden == 8192 and PRESETS["llama-3.2-1b"].rope_scale_factor == 32.0
    assert llama1b.output.weight is llama1b.tok_embeddings.weight
    tiny = PRESETS["tiny"]
    assert tiny.vocab_size == 612 and tiny.n_heads != tiny.n_kv_heads
