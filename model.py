"""Llama-3.1 from scratch: the base model of CoLA (PAPER.md §2, "Base").

One file, readable top to bottom:
  ModelArgs + presets -> RMSNorm -> rotary embeddings with Llama-3.1 "llama3" scaling -> grouped-query attention
  (SDPA) with a KV cache -> SwiGLU feed-forward -> pre-norm block -> Transformer (hidden state h and logits)
  -> sampling and batched generation. Checkpoint files (Hugging Face safetensors, Meta consolidated.00.pth) are
  read and written by infra/checkpoint.py.

CoLA reads only h_t = Norm_f(last block output)_t (PAPER.md, "Base"), so `Transformer.hidden()` returns it and
`Transformer.forward()` is just `output(hidden())`: nobody computes logits twice.

Run it:
    python model.py --ckpt /path/to/Llama-3.1-8B --prompt "The capital of France is"   # HF or Meta layout
    python model.py --ckpt runs/base/final --prompt "def "                              # our tiny base

Tensor shape legend used in comments throughout the project:
    B batch, T time (sequence), S keys in the cache (start_pos + T), D model dim (d), H query heads,
    Hkv key/value heads, Dh head dim, F feed-forward hidden size, V vocabulary, K latent actions, G group size.

Deviations from Meta's reference llama/model.py (maths identical, checked against transformers in tests/):
  - attention runs on torch.nn.functional.scaled_dot_product_attention (GQA via enable_gqa) instead of
    repeat_kv + explicit softmax; the KV cache is stored head-major [B, Hkv, S, Dh];
  - RoPE's table is stored as real (cos, sin) pairs [L, Dh/2, 2] instead of complex freqs_cis (viewed as complex
    at use, so the rotation is Meta's complex multiply), float32, built on first use, never cast with the weights;
  - the rope scaling factor is read from the checkpoint's config (8 for 3.1, 32 for 3.2) instead of hard-coded;
  - Meta checkpoints split across several consolidated.NN.pth files (70B/405B) are not supported.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from infra import checkpoint, parallel
from infra.ce import lm_head_ce
from infra.trainer import SEED, check_value
from tokenizer import Tokenizer, check_vocab

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelArgs:
    """Meta's field names (llama-models `ModelArgs`, params.json); defaults are Llama-3.1-8B."""
    dim: int = 4096                      # d, hidden size
    n_layers: int = 32                   # number of decoder blocks
    n_heads: int = 32                    # H, query heads
    n_kv_heads: int = 8                  # Hkv, key/value heads (grouped-query attention, G = H / Hkv = 4)
    vocab_size: int = 128256             # V (128000 BPE ranks + 256 special tokens)
    multiple_of: int = 1024              # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5               # RMSNorm epsilon
    rope_theta: float = 500000.0         # RoPE base
    use_scaled_rope: bool = True         # Llama-3.1 "llama3" frequency scaling
    rope_scale_factor: float = 8.0       # 8 for 3.1, 32 for 3.2 (HF config rope_scaling.factor)
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192    # original_max_position_embeddings
    max_seq_len: int = 8192              # longest sequence the rope table and KV cache are built for
    tie_embeddings: bool = False         # Llama-3.2-1B/3B share tok_embeddings and output
    ffn_hidden_dim: int | None = None    # F given explicitly (HF intermediate_size); None: Meta's rule below

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: dim {self.dim} must divide by n_heads {self.n_heads} and n_heads by "
                             f"n_kv_heads {self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """Meta's SwiGLU hidden-size rule: 4d -> 2/3 -> * multiplier -> round up to multiple_of (8B: 14336)."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        """Like Meta's ModelArgs(**params): unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Named presets. "tiny" is the embedded CPU default: the embedded tokenizer (bytes + two-digit numbers) fixes
# V = 612 (tokenizer.py).
PRESETS: dict[str, ModelArgs] = {
    "tiny": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=612, multiple_of=64,
                      ffn_dim_multiplier=1.0, max_seq_len=512),
    "llama-3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256,
                              ffn_dim_multiplier=1.5, rope_scale_factor=32.0, max_seq_len=8192,
                              tie_embeddings=True),
    "llama-3.1-8b": ModelArgs(),
}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class LMHead(nn.Linear):
    """W_lm: h [..., D] -> logits [..., V] (forward), and the training loss straight from h without the logits
    (loss: infra/ce.lm_head_ce, chunked over the positions). The loss reads the weight in its own method, so under
    FSDP it is registered as a forward method (parallel.apply_fsdp), which gathers the sharded W_lm for it."""

    def loss(self, s: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean CE of W_lm s against targets over mask: s [B, T, D], targets and mask [B, T] -> scalar."""
        return lm_head_ce(self, s, targets, mask)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, normalised in float32, cast back before the weight (as Meta)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                           # x [..., D]
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def init_weights(self):
        nn.init.ones_(self.weight)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [Dh/2], float32, with Llama-3.1 "llama3" scaling when use_scaled_rope.

    Long wavelengths (> original context / low_freq_factor) are slowed by the factor, short ones
    (< original context / high_freq_factor) kept, and the band between is interpolated smoothly.
    """
    dh = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2)[: dh // 2].float() / dh))   # [Dh/2]
    if not args.use_scaled_rope:
        return freqs
    factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                              args.rope_original_context)
    wavelen = 2 * math.pi / freqs                                                        # [Dh/2]
    smooth = (ctx / wavelen - low) / (high - low)                                        # [Dh/2]
    scaled = torch.where(wavelen > ctx / low, freqs / factor, freqs)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_table(args: ModelArgs, device=None) -> torch.Tensor:
    """cos/sin for every position: [max_seq_len, Dh/2, 2] float32 (angle_{t,j} = t * freq_j)."""
    freqs = rope_frequencies(args).to(device)                                            # [Dh/2]
    angles = torch.outer(torch.arange(args.max_seq_len, device=device, dtype=torch.float32), freqs)  # [L, Dh/2]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)                             # [L, Dh/2, 2]


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2j, 2j+1) by angle_{t,j}, in float32 (Meta's layout).

    x [B, T, H, Dh], rope [T, Dh/2, 2]. Meta's view_as_complex(x) * freqs_cis: the (cos, sin) pairs of the table
    are read as e^{i angle}, so one complex multiply does (x0 cos - x1 sin, x0 sin + x1 cos). Bit-identical to
    four real multiplies and a stack, and on CPU ~7x faster (a ~5% faster training step at the tiny preset).
    """
    xc = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))            # [B, T, H, Dh/2] complex
    rot = torch.view_as_complex(rope.contiguous())[None, :, None]                       # [1, T, 1, Dh/2] complex
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)                          # [B, T, H, Dh]


class KVCache(nn.Module):
    """Keys (after RoPE) and values of every past position, for incremental decoding (gpt-fast style).

    All rows of a batch share positions (Meta's generation scheme), so one start_pos indexes the whole batch.
    """

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)                                   # [B, Hkv, L, Dh]
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [B, Hkv, T, Dh] at positions start_pos.. -> all keys/values so far [B, Hkv, S, Dh]."""
        B, T = k.shape[0], k.shape[2]
        if start_pos + T > self.k.shape[2] or B > self.k.shape[0]:
            raise ValueError(f"KV cache holds {self.k.shape[0]} x {self.k.shape[2]} positions; asked to write "
                             f"{B} x [{start_pos}, {start_pos + T})")
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]


class Attention(nn.Module):
    """Grouped-query causal self-attention: H query heads share Hkv key/value heads (query head i uses i // G)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape                                                                # x [B, T, D]
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)                           # [B, T, H, Dh]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)                        # [B, T, Hkv, Dh]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)                        # [B, T, Hkv, Dh]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                # [B, H|Hkv, T, Dh]
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)                                    # [B, Hkv, S, Dh]
        S = k.shape[2]
        if q.is_cuda and q.dtype == torch.float32:     # CUDA's float32 kernel (memory-efficient) takes no GQA, and
            G = self.n_heads // self.n_kv_heads         # SDPA would fall back to materialising T x T scores per head:
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)                  # share heads by hand
        gqa = k.shape[1] != q.shape[1]
        if S == T:      # no past: plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:    # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:           # a chunk after a cached prefix: query i (position S-T+i) sees keys j <= S-T+i
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)   # [T, S]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))                              # [B, T, D]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 = gate, w3 = up, w2 = down (HF names)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):                                                                # [B, T, D]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                                  # [B, T, F] -> [B, T, D]


class TransformerBlock(nn.Module):
    """Pre-norm Llama block: h = x + attn(norm(x)); out = h + ffn(norm(h)). Also used by CoLA's IDM and policy."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos)                  # [B, T, D]
        return h + self.feed_forward(self.ffn_norm(h))                                   # [B, T, D]

    def init_weights(self, std: float, out_std: float):
        """Input projections N(0, std^2); the two projections back into the residual stream N(0, out_std^2)."""
        for lin in (self.attention.wq, self.attention.wk, self.attention.wv, self.feed_forward.w1,
                    self.feed_forward.w3):
            nn.init.normal_(lin.weight, std=std)
        for lin in (self.attention.wo, self.feed_forward.w2):
            nn.init.normal_(lin.weight, std=out_std)
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()


def setup_kv_cache(blocks, batch: int, max_len: int, dtype, device):
    """Give every block's attention a fresh KV cache (base, IDM or policy stacks alike)."""
    for block in blocks:
        a = block.attention
        a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, device)


def clear_kv_cache(blocks):
    for block in blocks:
        block.attention.cache = None


class RopeCache:
    """Float32 cos/sin table kept outside the state dict and outside `.to(dtype)`: RoPE is always float32."""

    def __init__(self, args: ModelArgs):
        self.args, self.table = args, None

    def __call__(self, start_pos: int, T: int, device) -> torch.Tensor:
        if start_pos + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than max_seq_len "
                             f"{self.args.max_seq_len} of this model")
        if self.table is None or self.table.device != torch.device(device):
            self.table = rope_table(self.args, device)                                   # [L, Dh/2, 2]
        return self.table[start_pos:start_pos + T]                                       # [T, Dh/2, 2]


# ----------------------------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.init_args = (args,)       # the constructor's arguments: a sharded run builds the same model on meta
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)                                      # Norm_f
        self.output = LMHead(args.dim, args.vocab_size, bias=False)                      # W_lm
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RopeCache(args)

    def init_weights(self):
        """Initialisation for training from scratch (runs after to_empty() on a meta-built model too)."""
        self.rope.table = None
        if self.args.tie_embeddings:   # to_empty() gives each module its own new tensor: tie them again
            self.output.weight = self.tok_embeddings.weight
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        for block in self.layers:
            block.init_weights(std=0.02, out_std=0.02 / math.sqrt(2 * self.args.n_layers))
        self.norm.init_weights()
        if not self.args.tie_embeddings:
            nn.init.normal_(self.output.weight, std=self.args.dim ** -0.5)

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """h = Norm_f(last block output): tokens [B, T] at positions start_pos.. -> h [B, T, D]."""
        x = self.tok_embeddings(tokens)                                                  # [B, T, D]
        rope = self.rope(start_pos, tokens.shape[1], tokens.device)                      # [T, Dh/2, 2]
        for layer in self.layers:
            x = layer(x, rope, start_pos)                                                # [B, T, D]
        return self.norm(x)                                                              # [B, T, D]

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Next-token logits W_lm h: tokens [B, T] -> [B, T, V]."""
        return self.output(self.hidden(tokens, start_pos))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parameter lists that training stages choose from (a plain Llama is one group, its base)."""
        return {"base": list(self.parameters())}

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks: activation checkpointing and FSDP wrap each of them."""
        return list(self.layers)

    # -- KV cache ------------------------------------------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int):
        p = self.tok_embeddings.weight
        setup_kv_cache(self.layers, batch, min(max_len, self.args.max_seq_len), p.dtype, p.device)

    def clear_cache(self):
        clear_kv_cache(self.layers)

    # -- checkpoints (the file layouts live in infra/checkpoint.py) -----------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", max_seq_len: int | None = None):
        """Load an official checkpoint directory, Hugging Face or Meta layout (detected from its files). Built on the
        meta device and filled by assignment: every tensor is read once, never copied twice."""
        path = Path(path)
        args, state, rest = checkpoint.load_llama_checkpoint(path, ModelArgs, dtype)
        if rest:
            raise ValueError(f"{path}: unexpected tensor {next(iter(rest))!r} for a plain Llama (a CoLA "
                             f"checkpoint? load it with cola.py)")
        if max_seq_len is not None:
            args.max_seq_len = max_seq_len
        with torch.device("meta"):
            model = cls(args)
        checkpoint.load_base_state(model, state, str(path))
        return model.to(device)

    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """Write the Hugging Face layout (config.json + safetensors), loadable by transformers and by us."""
        checkpoint.save_llama(self, path, max_shard_bytes)

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos: int | list[int] | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, choose=None) -> list[list[int]]:
        """Batched sampling; returns the new tokens of each prompt (cut after its first eos token).

        Meta's scheme: rows share positions, decoding starts at the shortest prompt and rows whose prompt is
        longer keep their own prompt token until it runs out. No padding ever enters attention.
        choose(logits [B, V] float, n [B]) -> tokens [B], n the index of each row's new token (policy.py has
        choosers); default: `sample` with temperature and top_p.
        """
        tokens, lens_t, stop = prompt_buffer(prompts, max_new_tokens, self.args.max_seq_len, eos,
                                             self.tok_embeddings.weight.device)          # [B, L], [B], [S]
        B, total = tokens.shape
        in_prompt = tokens >= 0                                                          # [B, L]
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)                    # [B]
        if use_cache:
            self.setup_cache(B, total)
        try:
            prev = 0
            for cur in range(int(lens_t.min()), total):
                # Only the last position's logits are needed: W_lm on [B, D], not on the whole prefill [B, T, D].
                if use_cache:
                    h = self.hidden(tokens[:, prev:cur], start_pos=prev)[:, -1]          # [B, D]
                else:
                    h = self.hidden(tokens[:, :cur])[:, -1]                              # [B, D]
                logits = self.output(h)                                                  # [B, V]
                if choose is None:
                    nxt = sample(logits.float(), temperature, top_p, generator=generator)    # [B]
                else:
                    nxt = choose(logits.float(), (cur - lens_t).clamp(min=0))                # [B]
                nxt = torch.where(in_prompt[:, cur], tokens[:, cur], nxt)
                tokens[:, cur] = nxt
                done |= ~in_prompt[:, cur] & torch.isin(nxt, stop)
                prev = cur
                if bool(done.all()):
                    break
        finally:
            if use_cache:
                self.clear_cache()
        return [new for new, _ in new_tokens(tokens, lens_t, max_new_tokens, stop)]


def prompt_buffer(prompts: list[list[int]], max_new_tokens: int, max_seq_len: int, eos, device):
    """What both generate()s decode into (Meta's shared-position scheme): tokens [B, L] holding each prompt and -1
    after it, L = min(max_seq_len, longest prompt + max_new_tokens); the prompt lengths [B]; the stop tokens [S]
    (eos: one id, a list, or None)."""
    lens = [len(p) for p in prompts]
    if not prompts or min(lens) == 0:
        raise ValueError("generate: every prompt needs at least one token")
    if max(lens) > max_seq_len:
        raise ValueError(f"generate: prompt of {max(lens)} tokens is longer than max_seq_len {max_seq_len}")
    total = min(max_seq_len, max(lens) + max_new_tokens)
    tokens = torch.full((len(prompts), total), -1, dtype=torch.long, device=device)      # [B, L]
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    stop = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or [])), dtype=torch.long, device=device)
    return tokens, torch.tensor(lens, device=device), stop


def new_tokens(tokens: torch.Tensor, lens: torch.Tensor, max_new_tokens: int, stop: torch.Tensor) -> list:
    """Per row of a decoded buffer: (its new tokens, at most max_new_tokens, cut after the first stop token; the
    position of the first of them)."""
    stops, out = set(stop.tolist()), []
    for row, n0 in zip(tokens.tolist(), lens.tolist()):
        new = [t for t in row[n0:] if t >= 0][:max_new_tokens]
        cut = next((j + 1 for j, t in enumerate(new) if t in stops), len(new))
        out.append((new[:cut], n0))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Sampling (shared with the CoLA policy)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, N] -> indices [B]. temperature 0 is greedy; then top-k, then Meta's top-p (nucleus)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                                  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)                                                           # [B, N]
    if top_p < 1.0:
        p_sorted, idx = probs.sort(dim=-1, descending=True)                              # [B, N]
        drop = p_sorted.cumsum(-1) - p_sorted > top_p    # mass before a token already exceeds p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        choice = torch.multinomial(p_sorted / p_sorted.sum(-1, keepdim=True), 1, generator=generator)
        return idx.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Command line: load a checkpoint, encode a prompt, print the completion


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample from a Llama-3.1 checkpoint (HF or Meta layout).")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (config.json or params.json inside)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model / tokenizer.json (default: found in "
                   "--ckpt, else the embedded one)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if check_sampling_flags(a) == "cola":
        raise SystemExit(f"--ckpt {a.ckpt} is a CoLA checkpoint: generate with `python cola.py --ckpt {a.ckpt}`, or "
                         f"pass its base alone (an FTA export's final-llama/)")
    tok = Tokenizer.find(a.ckpt, a.tokenizer)
    try:
        model = Transformer.from_pretrained(a.ckpt, dtype=getattr(torch, a.dtype), device=a.device)
    except (ValueError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0]
        raise SystemExit(f"--ckpt {msg}" if msg.startswith(str(a.ckpt)) else f"--ckpt {a.ckpt}: {msg}") from None
    check_vocab(tok, model.args.vocab_size, f"--ckpt {a.ckpt}")
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    prompts = [tok.encode(s, bos=True, eos=False) for s in a.prompt]
    n_new = fit_new_tokens(prompts, a.max_new_tokens, model.args.max_seq_len)
    outs = model.generate(prompts, n_new, a.temperature, a.top_p, eos=tok.stop_tokens, generator=gen)
    for s, o in zip(a.prompt, outs):
        print(s + tok.decode([t for t in o if t not in tok.stop_tokens]))
        print("-" * 80)


def check_sampling_flags(a) -> str:
    """The flags model.py and cola.py share, each mistake one line; -> what --ckpt holds ("llama" or "cola")."""
    if a.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens {a.max_new_tokens}: expected an integer >= 1")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise SystemExit(f"--temperature {a.temperature}: expected a finite number >= 0 (0 = greedy)")
    if not 0 < a.top_p <= 1:
        raise SystemExit(f"--top-p {a.top_p}: expected a number in (0, 1]")
    check_value("seed", a.seed, SEED)
    parallel.device_of(a.device)
    kind = checkpoint.kind_of(a.ckpt, "--ckpt")
    if kind == "qnet":
        raise SystemExit(f"--ckpt {a.ckpt} is a Q-network, not a model to generate with (mcts.py reads it as --qnet)")
    return kind


def fit_new_tokens(prompts: list[list[int]], max_new_tokens: int, context: int) -> int:
    """--max-new-tokens, or what the context leaves after the longest prompt (said on stderr); a prompt that
    fills the context is one line."""
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    room = context - len(prompts[longest])
    if room < 1:
        raise SystemExit(f"--prompt #{longest + 1}: {len(prompts[longest])} tokens leave no room in the model's "
                         f"context of {context} tokens; shorten it")
    if max_new_tokens > room:
        print(f"note: --max-new-tokens {max_new_tokens} exceeds what the context of {context} tokens leaves after the "
              f"longest prompt; generating at most {room}", file=sys.stderr)
    return min(max_new_tokens, room)


def clip_new_tokens(max_new_tokens: int, path, flag: str) -> int:
    """--max-new-tokens of the commands whose prompts come later (rl.py, qnet.py, mcts.py, search_eval.py): at most
    what the context of the model at `path` leaves after a one-token prompt, said once on stderr as fit_new_tokens
    says it. generate() stops at the context anyway, but the flag also sizes the sampling noise [rows,
    max_new_tokens]: 10^9 asked for GBs. Read from config.json before anything runs, so a run's config.json records
    the clipped value and rerunning the same command resumes it."""
    context = checkpoint.context_of(Path(path))
    if context is None or max_new_tokens < context:
        return max_new_tokens
    if os.environ.get("RANK", "0") == "0":                    # once under torchrun too
        print(f"note: --max-new-tokens {max_new_tokens} exceeds the context of {context} tokens of {flag} {path}; "
              f"generating at most {context - 1} (fewer after longer prompts)", file=sys.stderr)
    return context - 1


if __name__ == "__main__":
    main()
