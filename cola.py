"""CoLA assembled: base Llama + IDM + codebook + merge module (language world model) + policy (PAPER.md §2; the
training stages of Algorithms 1 and 2 and the RL of Algorithm 4 call these methods).

    h_t   = Norm_f(base(x_{1:t}))                         base.hidden, frozen outside FTA
    z_t   = f_inverse(h)_{t+1}                            idm_logits (look-ahead: read at position t+1, idm.py)
    e_t   = C a_t                                         codebook, Linear(K -> d), column k of C
    s_0   = h_t; s_i = s_{i-1} + W_down^i(silu(W_gate^i [s_{i-1}; e_t]) * W_up^i [s_{i-1}; e_t]),  i = 1, 2
    logits_t = W_lm(Norm_f(s_2) - h_t)                    world_logits (base state subtracted, as released)
    pi(a_t | x_{1:t}) = softmax(policy(h)_t)              policy_logits
Generation: h_t -> a_t ~ pi -> x_{t+1} = argmax p_WM(. | h_t, a_t) -> append; two KV caches (base, policy).

Checkpoints use the official release layout (infra/checkpoint.py reads and writes it). A plain Llama directory (HF or
Meta) loads too: base from the file, new modules random.

Run it:
    python cola.py --ckpt runs/cola/final --prompt "def " --mode policy               # sample actions from pi
    python cola.py --ckpt runs/cola/final --prompt "def " --mode fixed --action 5     # one action throughout
    python cola.py --ckpt /path/to/Llama-3.1-CoLA-10B --prompt "The" --mode random --device cuda --dtype bfloat16
    python cola.py --ckpt /path/to/Llama-3.1-8B --prompt "Hi" --mode random           # plain Llama: random modules
    python -m pytest -q tests/test_cola.py                                             # tests

Deviations from the paper / official code:
  - one-step look-ahead on T+1 tokens (the base runs on x_{1:T+1}; actions are z[:, 1:]) instead of the official
    shift-left of T logits, where the last position keeps its own look-ahead-free logits;
  - which side of Norm_f(s_2) - h_t carries the gradient to a trainable base is a choice (`base_grad`): the release
    detaches h_t in its training path (Stage A, FTA-I: "merge", our default) and Norm_f(s_2) in its greedy-policy
    path, which its FTA-P trains through ("subtracted"); the values are the same;
  - batched generation uses Meta's shared-position scheme (no padding in attention) instead of HF left padding;
  - config.json also stores cola_merge_hidden (when not the base's SwiGLU size), and our exports the training
    history (infra/checkpoint.py);
  - new-module init (idm.py): output projections use the stack's own depth; merge Linears, down_proj included,
    use N(0, 2/(5d)) because they are not decoder blocks.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from idm import IDM, idm_labels, new_module_std
from infra import checkpoint
from model import PRESETS, ModelArgs, Transformer, check_sampling_flags, fit_new_tokens, new_tokens, prompt_buffer
import policy
from policy import Policy
from tokenizer import Tokenizer, check_vocab

# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclass
class CoLAArgs:
    """The new modules on top of the base (defaults: the official Llama-3.1-CoLA release at 8B)."""
    n_actions: int = 64                  # K, latent action codebook size (official num_code)
    n_idm_layers: int = 4                # Llama blocks in f_inverse (official num_action_layer)
    n_merge_layers: int = 2              # residual SwiGLU MLPs of the world model (official num_dyna_layer)
    n_policy_layers: int = 8             # Llama blocks in pi (official num_policy_layer)
    merge_hidden: int | None = None      # F of W_gate/W_up/W_down; None: the base's SwiGLU size (14336 at 8B)

    def __post_init__(self):
        if self.n_actions < 2 or min(self.n_idm_layers, self.n_merge_layers, self.n_policy_layers) < 0:
            raise ValueError(f"CoLAArgs: need n_actions >= 2 and layer counts >= 0, got {self}")


# Pair with model.PRESETS of the same name.
COLA_PRESETS: dict[str, CoLAArgs] = {
    "tiny": CoLAArgs(n_idm_layers=2, n_merge_layers=2, n_policy_layers=2),
    "llama-3.1-8b": CoLAArgs(),
}

MODES = ("policy", "greedy", "fixed", "random", "forced")

def action_chooser(mode: str, K: int, action=None, forced_actions=None, temperature: float = 1.0,
                   top_k: int | None = 40, top_p: float = 1.0, generator=None):
    """The choose(logits, n) callable of a generation mode (policy.py): policy, greedy, fixed, random or forced."""
    if mode == "policy":
        return policy.sampler(temperature, top_k, top_p, generator)
    if mode == "greedy":
        return policy.greedy()
    if mode == "fixed":
        return policy.fixed(action, K)
    if mode == "random":
        return policy.uniform(generator)
    if mode == "forced":
        return policy.forced(forced_actions)
    raise ValueError(f"generate: mode {mode!r} is not one of {', '.join(MODES)}")


def check_actions(actions: torch.Tensor, K: int, where: str):
    """One-line ValueError unless every action index lies in [0, K)."""
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= K):
        bad = actions[(actions < 0) | (actions >= K)].flatten()[0]
        raise ValueError(f"{where}: action index {int(bad)} is outside [0, {K}) (K = n_actions = {K})")


# ----------------------------------------------------------------------------------------------------------------
# Merge module: the language world model's only new parameters besides the codebook


class MergeMLP(nn.Module):
    """W_down(silu(W_gate [s; e]) * W_up [s; e]): 2d -> F -> d, no bias, no norm (official LlamaMergeMLP)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(2 * dim, hidden, bias=False)                          # W_gate: 2d -> F
        self.up_proj = nn.Linear(2 * dim, hidden, bias=False)                            # W_up:   2d -> F
        self.down_proj = nn.Linear(hidden, dim, bias=False)                              # W_down: F -> d

    def forward(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        x = torch.cat([s, e], dim=-1)                                                    # [B, T, 2D] [s; e]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))              # [B, T, F] -> [B, T, D]


class MergeModule(nn.Module):
    """s_0 = h; s_i = s_{i-1} + MergeMLP_i(s_{i-1}, e), i = 1..n. No attention: all context comes through h."""

    def __init__(self, dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(MergeMLP(dim, hidden) for _ in range(n_layers))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        s = h                                                                            # [B, T, D] s_0 = h_t
        for layer in self.layers:
            s = s + layer(s, e)                                                          # [B, T, D] Eq: s_i
        return s

    def init_weights(self, std: float):
        for layer in self.layers:
            for lin in (layer.gate_proj, layer.up_proj, layer.down_proj):
                nn.init.normal_(lin.weight, std=std)


# ----------------------------------------------------------------------------------------------------------------
# The model


class CoLA(nn.Module):
    def __init__(self, base_args: ModelArgs, args: CoLAArgs):
        super().__init__()
        self.base_args, self.args = base_args, args
        self.init_args = (base_args, args)   # the constructor's arguments: a sharded run builds it again on meta
        d, K = base_args.dim, args.n_actions
        self.base = Transformer(base_args)                                               # Llama: h_t, Norm_f, W_lm
        self.idm = IDM(base_args, args.n_idm_layers, K)                                  # f_inverse
        self.codebook = nn.Linear(K, d, bias=False)                                      # C: e_t = C a_t, weight [D, K]
        self.merge = MergeModule(d, args.merge_hidden or base_args.ffn_hidden, args.n_merge_layers)
        self.policy = Policy(base_args, args.n_policy_layers, K)                         # pi
        self.initialised_from_llama = False    # from_pretrained on a plain Llama sets it: new modules are random

    # -- initialisation ------------------------------------------------------------------------------------------
    def init_weights(self):
        """Everything from scratch: the base's own rule, then the new modules' (PAPER.md §2, "Init")."""
        self.base.init_weights()
        self.init_new_modules()

    def init_new_modules(self):
        """IDM, codebook, merge, policy: Linear N(0, 2/(5d)), block output projections smaller (idm.py)."""
        std = new_module_std(self.base_args.dim)
        self.idm.init_weights()
        nn.init.normal_(self.codebook.weight, std=std)
        self.merge.init_weights(std)
        self.policy.init_weights()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Disjoint named parameter lists covering the model; a training phase trains some of them (the codebook
        gets weight decay 0, PAPER.md §3)."""
        return {"base": list(self.base.parameters()), "idm": list(self.idm.parameters()),
                "codebook": [self.codebook.weight], "merge": list(self.merge.parameters()),
                "policy": list(self.policy.parameters())}

    def blocks(self) -> list[nn.Module]:
        """The Llama blocks of base, IDM and policy: activation checkpointing and FSDP wrap each of them."""
        return list(self.base.layers) + list(self.idm.layers) + list(self.policy.layers)

    def num_params(self) -> dict[str, int]:
        counts = {k: sum(p.numel() for p in ps) for k, ps in self.param_groups().items()}
        return {**counts, "total": sum(counts.values())}

    # -- the pieces, each one plain call ------------------------------------------------------------------------
    def hidden(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """h = Norm_f(last block output): tokens [B, T] -> [B, T, D]. Wrap in no_grad while the base is frozen."""
        return self.base.hidden(tokens, start_pos)

    def idm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """z = f_inverse(h): h [B, T+1, D] -> z [B, T+1, K]; step t's action is z[:, t+1] (use z[:, 1:])."""
        rope = self.base.rope(0, h.shape[1], h.device)                                   # [T+1, Dh/2, 2]
        return self.idm(h, rope)                                                         # [B, T+1, K]

    @torch.no_grad()
    def idm_labels(self, h: torch.Tensor) -> torch.Tensor:
        """Stage B targets k*_t = argmax z_{t+1} (no Gumbel noise): states h [B, T+1, D] -> [B, T] long."""
        return idm_labels(self.idm_logits(h)[:, 1:])                                     # [B, T]

    def world_state_from_code(self, h: torch.Tensor, e: torch.Tensor, base_grad: str = "merge") -> torch.Tensor:
        """The vector W_lm multiplies, Norm_f(s_2) - h_t, from states h [B, T, D] and action codes e [B, T, D]
        (e_t = C a_t) -> [B, T, D]. Training losses project it with the chunked lm_head_ce (infra/ce.py), so the
        [B, T, V] logits never exist at once.

        The value is the same either way; base_grad says which side of the difference carries gradient to a
        trainable base (FTA): "merge", Norm_f(s_2) - sg(h_t), the release's training path (the base learns through
        the world model's input s_0 = h_t); "subtracted", sg(Norm_f(s_2)) - h_t, the release's greedy-policy path
        that its FTA-P trains through (the base learns only through the subtracted state).
        """
        s = self.merge(h, e.to(self.codebook.weight.dtype))                              # [B, T, D] s_2
        if base_grad == "merge":
            return self.base.norm(s) - h.detach()                                        # [B, T, D]
        if base_grad == "subtracted":
            return self.base.norm(s).detach() - h                                        # [B, T, D]
        raise ValueError(f"world_logits: base_grad must be 'merge' or 'subtracted', got {base_grad!r}")

    def world_state(self, h: torch.Tensor, a: torch.Tensor, base_grad: str = "merge") -> torch.Tensor:
        """h [B, T, D] (states x_{1:t}) and actions a -> Norm_f(s_2) - h_t [B, T, D]. Eq: e_t = C a_t, where a is
        either action ids [B, T] long (C's column a_t) or one-hot / straight-through vectors [B, T, K] float (a~_t:
        the gradient flows into a, Stage A's path to the IDM)."""
        if a.is_floating_point():
            e = self.codebook(a.to(self.codebook.weight.dtype))                          # [B, T, D] e_t = C a~_t
        else:
            check_actions(a, self.args.n_actions, "world_logits")
            e = F.embedding(a, self.codebook.weight.t())                                 # [B, T, D] e_t = C[:, a_t]
        return self.world_state_from_code(h, e, base_grad)                               # [B, T, D]

    def world_logits(self, h: torch.Tensor, a: torch.Tensor, base_grad: str = "merge") -> torch.Tensor:
        """p_WM logits. Eq: logits = W_lm(Norm_f(s_2) - h_t): h [B, T, D], a as in world_state -> [B, T, V]."""
        return self.base.output(self.world_state(h, a, base_grad))                       # [B, T, V]

    def policy_logits(self, h: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """pi logits: h [B, T, D] at positions start_pos.. -> [B, T, K] (uses the policy's KV cache if set)."""
        rope = self.base.rope(start_pos, h.shape[1], h.device)                           # [T, Dh/2, 2]
        return self.policy(h, rope, start_pos)                                           # [B, T, K]

    # -- generation ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, mode: str = "policy", action: int | None = None,
                 forced_actions=None, temperature: float = 1.0, top_k: int | None = 40, top_p: float = 1.0,
                 eos: int | list[int] | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None, choose=None) -> dict:
        """CoLA decoding (PAPER.md §2): per step a_t = choose(pi logits), then x_{t+1} = argmax p_WM(. | h_t, a_t).

        choose(logits [B, K], n [B]) -> a [B] (policy.py), or built from mode: "policy" a_t ~ pi (temperature,
        top_k, top_p); "greedy" argmax pi; "fixed" a_t = action; "random" uniform over K; "forced" a_t =
        forced_actions[b, n] for the n-th new token of row b (forced_actions [B, N]; at most N new tokens).
        Returns dict(tokens, actions, logprobs), lists per prompt: the new tokens (cut after the first eos), the
        action behind each one, and log pi(a_t | x_{1:t}) of that action under the raw policy logits (temperature
        1, no top-k), whatever the choice.
        Rows share positions (model.Transformer.generate's scheme): decoding starts at the shortest prompt and a
        row still inside its prompt keeps its prompt token and records no action.
        """
        K, device = self.args.n_actions, self.base.tok_embeddings.weight.device
        B = len(prompts)
        if choose is None:
            if mode == "forced":
                if forced_actions is None:
                    raise ValueError("generate: mode 'forced' needs forced_actions [B, N]")
                forced_actions = torch.as_tensor(forced_actions, dtype=torch.long, device=device)   # [B, N]
                if forced_actions.dim() != 2 or forced_actions.shape[0] != B or forced_actions.shape[1] == 0:
                    raise ValueError(f"generate: forced_actions must have shape [{B}, N >= 1], got "
                                     f"{tuple(forced_actions.shape)}")
                check_actions(forced_actions, K, "generate (forced)")
                max_new_tokens = min(max_new_tokens, forced_actions.shape[1])
            choose = action_chooser(mode, K, action, forced_actions, temperature, top_k, top_p, generator)
        tokens, lens_t, stop = prompt_buffer(prompts, max_new_tokens, self.base_args.max_seq_len, eos, device)
        total = tokens.shape[1]                                                          # tokens [B, L]
        in_prompt = tokens >= 0                                                          # [B, L]
        acts = torch.full((B, total), -1, dtype=torch.long, device=device)              # [B, L] action behind x_t
        logps = torch.zeros((B, total), dtype=torch.float32, device=device)             # [B, L]
        done = torch.zeros(B, dtype=torch.bool, device=device)                           # [B]
        if use_cache:
            self.base.setup_cache(B, total)
            self.policy.setup_cache(B, total, self.codebook.weight.dtype, device)
        try:
            prev = 0
            for cur in range(int(lens_t.min()), total):
                # states x_{1:cur} -> h_t (t = cur - 1) and pi(. | x_{1:t})
                if use_cache:
                    h = self.hidden(tokens[:, prev:cur], prev)                           # [B, cur-prev, D]
                    pi_logits = self.policy_logits(h, prev)[:, -1].float()               # [B, K]
                else:
                    h = self.hidden(tokens[:, :cur])                                     # [B, cur, D]
                    pi_logits = self.policy_logits(h)[:, -1].float()                     # [B, K]
                a = choose(pi_logits, (cur - lens_t).clamp(min=0))                     # [B] a_t
                nxt = self.world_logits(h[:, -1:], a[:, None])[:, 0].float().argmax(-1)  # [B] x_{t+1}, greedy
                new = ~in_prompt[:, cur]                                                 # [B] rows past their prompt
                tokens[:, cur] = torch.where(new, nxt, tokens[:, cur])
                acts[:, cur] = torch.where(new, a, -1)
                logps[:, cur] = F.log_softmax(pi_logits, -1).gather(-1, a[:, None])[:, 0]   # [B] log pi(a_t|x_{1:t})
                done |= new & torch.isin(nxt, stop)
                prev = cur
                if bool(done.all()):
                    break
        finally:
            if use_cache:
                self.base.clear_cache()
                self.policy.clear_cache()
        out = {"tokens": [], "actions": [], "logprobs": []}
        for i, (new, n0) in enumerate(new_tokens(tokens, lens_t, max_new_tokens, stop)):
            out["tokens"].append(new)
            out["actions"].append(acts[i, n0:n0 + len(new)].tolist())
            out["logprobs"].append(logps[i, n0:n0 + len(new)].tolist())
        return out

    # -- checkpoints (the official release layout; infra/checkpoint.py reads and writes it) -------------------------
    def save_pretrained(self, path, max_shard_bytes: int = 5 * 2**30):
        """The official release layout: config.json + (sharded) safetensors, each file written atomically."""
        checkpoint.save_cola(self, path, max_shard_bytes)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", cola_args: CoLAArgs | None = None,
                        max_seq_len: int | None = None) -> "CoLA":
        """A CoLA checkpoint (official layout), or CoLA started from a plain Llama directory (HF or Meta): then the
        base is loaded and IDM, codebook, merge and policy are freshly initialised (cola_args, else the preset that
        matches the base's shape). Built on the meta device and filled by assignment: every tensor is read once."""
        path = Path(path)
        base_args, state, rest = checkpoint.load_llama_checkpoint(path, ModelArgs, dtype)
        rest = {k: v for k, v in rest.items() if not k.endswith("rotary_emb.inv_freq")}
        if max_seq_len is not None:
            base_args.max_seq_len = max_seq_len
        cfg = checkpoint.read_json(path / "config.json") if checkpoint.detect_layout(path) == "hf" else {}
        is_cola = "num_code" in cfg
        if is_cola:
            cola_args = checkpoint.cola_args_from_config(cfg, cola_args, path / "config.json", CoLAArgs)
        elif rest:
            raise ValueError(f"{path}: unexpected tensor {next(iter(rest))!r}; config.json has no num_code, so "
                             f"this is not a CoLA checkpoint")
        elif cola_args is None:
            cola_args = default_cola_args(base_args)
        with torch.device("meta"):
            model = cls(base_args, cola_args)
        checkpoint.load_base_state(model.base, state, str(path))
        if is_cola:
            checkpoint.load_new_modules(model, rest, str(path))
        else:                                      # a plain Llama: the new modules start fresh (global torch RNG)
            new = (model.idm, model.codebook, model.merge, model.policy)
            for m in new:
                m.to_empty(device="cpu")
            model.init_new_modules()
            for m in new:
                m.to(dtype)
        model.initialised_from_llama = not is_cola
        return model.to(device)


class VQCoLA(CoLA):
    """The VQ ablation's CoLA (PAPER.md §5, the quantiser ablation): the IDM ends in Linear(d -> d), an encoder output
    z_e in code space, not K logits; the action is the nearest codebook column."""

    def __init__(self, base_args: ModelArgs, args):
        super().__init__(base_args, args)
        self.idm.head = nn.Linear(base_args.dim, base_args.dim, bias=False)


def nearest_code(z_e: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """VQ lookup: k = argmin_k ||z_e - C_k||^2 for z_e [B, T, D] and codes C [D, K] (column k is e_k) -> k [B, T]."""
    dist = z_e.pow(2).sum(-1, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(0)                  # [B, T, K]
    return dist.argmin(-1)                                                                   # [B, T]


def default_cola_args(base_args: ModelArgs) -> CoLAArgs:
    """COLA_PRESETS entry whose model.PRESETS twin has this base's shape; else the paper's CoLAArgs()."""
    shape = lambda a: (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size)   # noqa: E731
    for name, a in PRESETS.items():
        if name in COLA_PRESETS and shape(a) == shape(base_args):
            return CoLAArgs(**asdict(COLA_PRESETS[name]))
    return CoLAArgs()


# ----------------------------------------------------------------------------------------------------------------
# The one checked loader behind every script's --init / --ckpt / --embedder / --judge

def load(path, kind: str, flag: str = "--ckpt", device="cpu", dtype=torch.float32, cls=None,
         preset: str | None = None, hint: str = ""):
    """The model in a checkpoint directory, checked before any tensor is read.

    kind "llama": a plain Llama (HF or Meta layout) -> Transformer; "cola": a CoLA export -> CoLA; "llama->cola":
    either, as a CoLA (a plain Llama gets fresh IDM, codebook, merge and policy). cls: the class to build instead
    (VQCoLA). preset: the model.PRESETS name whose (dim, n_layers) the checkpoint must have. Every failure ends the
    run with one line naming the flag, the path and what was expected (hint: what to pass instead)."""
    found = checkpoint.kind_of(path, flag)
    allowed = {"llama": ("llama",), "cola": ("cola",), "llama->cola": ("llama", "cola")}[kind]
    if found not in allowed:
        raise SystemExit(f"{flag} {path} is {checkpoint.WHAT[found]}, expected {' or '.join(checkpoint.WHAT[k] for k in allowed)}"
                         + (f": {hint}" if hint else ""))
    if preset is not None:
        shape, want = checkpoint.shape_of(Path(path)), PRESETS[preset]
        if shape is not None and shape != (want.dim, want.n_layers):
            raise SystemExit(f"{flag} {path}: a model of dim {shape[0]} with {shape[1]} layers, but --preset "
                             f"{preset} has dim {want.dim} with {want.n_layers} layers")
    cls = cls or (Transformer if kind == "llama" else CoLA)
    try:
        return cls.from_pretrained(path, dtype=dtype, device=device)
    except (ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e)
        raise SystemExit(f"{flag} {msg}" if msg.startswith(str(path)) else f"{flag} {path}: {msg}") from None


LEVELS = {"latent": "cola", "token": "llama"}    # what each level of RL and search acts with


def load_level(path, level: str, flag: str, device="cpu", preset: str | None = None, hint: str = "", tok=None):
    """The model a level acts with, checked by `load`: a CoLA export for latent actions, a plain Llama for tokens
    (rl.py, qnet.py, mcts.py, search_eval.py). hint: what to pass instead (default: which export each level needs).
    With tok, the tokenizer must have exactly the model's V tokens (tokenizer.check_vocab)."""
    default = {"latent": "latent actions need a CoLA checkpoint (fta-i, fta-p or bc export)",
               "token": "the token level needs a plain Llama (e.g. the sft export, or an FTA run's final-llama/)"}
    model = load(path, LEVELS[level], flag, device, preset=preset, hint=hint or default[level])
    if tok is not None:
        check_vocab(tok, (model.base_args if level == "latent" else model.args).vocab_size, f"{flag} {path}")
    return model


# ----------------------------------------------------------------------------------------------------------------
# Command line: load a checkpoint, generate under latent actions, print text and actions side by side


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate with CoLA: latent actions choose, the world model writes.")
    p.add_argument("--ckpt", required=True, help="CoLA checkpoint (official layout), or a plain Llama directory "
                   "(HF or Meta): then the CoLA modules are freshly initialised")
    p.add_argument("--cola-preset", default=None, choices=sorted(COLA_PRESETS),
                   help="module sizes when --ckpt is a plain Llama (default: matched by base size)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: found in --ckpt, else bytes)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--mode", default="policy", choices=["policy", "greedy", "fixed", "random"])
    p.add_argument("--action", type=int, default=None, help="the action for --mode fixed")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="policy temperature (paper: 1); 0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.mode == "fixed" and a.action is None:
        raise SystemExit("--mode fixed needs --action N")
    if a.mode != "fixed" and a.action is not None:
        raise SystemExit(f"--action {a.action} is only used with --mode fixed (this is --mode {a.mode})")
    if a.top_k < 1:
        raise SystemExit(f"--top-k {a.top_k}: expected an integer >= 1")
    check_sampling_flags(a)
    torch.manual_seed(a.seed)   # fresh modules of a plain Llama are initialised from the global RNG
    tok = Tokenizer.find(a.ckpt, a.tokenizer)
    try:
        model = CoLA.from_pretrained(a.ckpt, dtype=getattr(torch, a.dtype), device=a.device,
                                     cola_args=COLA_PRESETS[a.cola_preset] if a.cola_preset else None)
        check_vocab(tok, model.base_args.vocab_size, f"--ckpt {a.ckpt}")
        if a.action is not None and not 0 <= a.action < model.args.n_actions:
            raise SystemExit(f"--action {a.action}: expected 0 <= action < {model.args.n_actions} (the checkpoint's "
                             f"number of actions K)")
        if model.initialised_from_llama:
            print(f"note: {a.ckpt} is a plain Llama; IDM, codebook, merge and policy are random ({model.args})")
        gen = torch.Generator(device=a.device).manual_seed(a.seed)
        prompts = [tok.encode(s, bos=True, eos=False) for s in a.prompt]
        n_new = fit_new_tokens(prompts, a.max_new_tokens, model.base_args.max_seq_len)
        out = model.generate(prompts, n_new, mode=a.mode, action=a.action, temperature=a.temperature,
                             top_k=a.top_k, top_p=a.top_p, eos=tok.stop_tokens, generator=gen)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    for s, toks, acts, lps in zip(a.prompt, out["tokens"], out["actions"], out["logprobs"]):
        print(s + tok.decode([t for t in toks if t not in tok.stop_tokens]))
        print(f"{'step':>4} {'action':>6} {'log pi':>7} {'id':>6}  token")
        for i, (t, act, lp) in enumerate(zip(toks, acts, lps)):
            print(f"{i:>4} {act:>6} {lp:>7.2f} {t:>6}  {tok.decode([t])!r}")
        print("-" * 80)


if __name__ == "__main__":
    main()
