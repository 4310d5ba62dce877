"""Checkpoint files: the Hugging Face and Meta Llama-3.1 layouts, and the official CoLA release's layout.

model.py and cola.py hold the architecture; this module reads and writes it and imports neither: their
`from_pretrained` / `save_pretrained` methods call the functions here and pass in their argument classes
(model.ModelArgs, cola.CoLAArgs). `cola.load` is the one checked loader the scripts use.

  Llama, Hugging Face   config.json + model.safetensors (or model-NNNNN-of-NNNNN.safetensors + an index);
                        q/k rows permuted per head (HF's rotate_half RoPE), names model.layers.N.self_attn.q_proj...
  Llama, Meta           params.json + consolidated.00.pth (+ tokenizer.model); our own names (wq, w1, ...)
  CoLA, official        the HF Llama layout plus model.action_layers.N.* (IDM blocks), model.action_norm,
                        model.action_head, model.action_code_book, model.action_merge_layers.N.{gate,up,down}_proj,
                        model.policy_layers.N.*, model.policy_norm, model.policy_head; config.json adds num_code,
                        num_action_layer, num_dyna_layer, num_policy_layer and v = 1 (class IntentionForCausalLM)

Every file is written under a temporary name and renamed into place (infra/files.py's `atomic_write`), so a crash
never leaves a half-written file under its final name. Tensors are read once and assigned into a model built on the
meta device (no second copy); every read checks presence and shape, and errors name the file and the tensor as the
file spells it.

Deviations from the official code:
  - config.json of a CoLA export also carries `cola_merge_hidden` (when the merge MLPs are not the base's SwiGLU
    size), `train_stage` (the stage that wrote it) and `train_history` (each training stage's resolved flags);
  - Meta checkpoints split across several consolidated.NN.pth files (70B/405B) are not supported.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from infra.files import atomic_write

# ----------------------------------------------------------------------------------------------------------------
# Llama layouts. Our parameter names are Meta's; Hugging Face names are translated at the boundary.


HF_NAMES = {  # Meta suffix -> HF suffix inside layer N
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta -> HF row order inside each head: interleaved pairs (r0,r1),(r2,r3).. -> [r0,r2,..,r1,r3,..]."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF -> Meta: the inverse of permute_qk, so RoPE's adjacent pairs line up with our apply_rope."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def block_to_hf(prefix_meta: str, prefix_hf: str, state: dict, args) -> dict:
    """Rename (and q/k permute) the tensors of Llama blocks; used for the base and for CoLA's IDM/policy."""
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix_meta):
            continue
        n, suffix = k[len(prefix_meta):].split(".", 1)
        if suffix == "attention.wq.weight":
            v = permute_qk(v, args.n_heads)
        elif suffix == "attention.wk.weight":
            v = permute_qk(v, args.n_kv_heads)
        out[f"{prefix_hf}{n}.{HF_NAMES[suffix]}"] = v
    return out


def block_from_hf(prefix_hf: str, prefix_meta: str, state: dict, args) -> dict:
    """Inverse of block_to_hf."""
    inverse = {v: k for k, v in HF_NAMES.items()}
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix_hf) or k.endswith("rotary_emb.inv_freq"):
            continue
        n, suffix = k[len(prefix_hf):].split(".", 1)
        if suffix not in inverse:
            raise ValueError(f"unexpected tensor {k!r} (not part of a Llama block)")
        suffix = inverse[suffix]
        if suffix == "attention.wq.weight":
            v = unpermute_qk(v, args.n_heads)
        elif suffix == "attention.wk.weight":
            v = unpermute_qk(v, args.n_kv_heads)
        out[f"{prefix_meta}{n}.{suffix}"] = v
    return out


def meta_to_hf(state: dict, args) -> dict:
    out = {HF_TOP[k]: v for k, v in state.items() if k in HF_TOP}
    if args.tie_embeddings:
        out.pop("lm_head.weight", None)        # transformers drops the tied duplicate too
    out.update(block_to_hf("layers.", "model.layers.", state, args))
    return out


def hf_to_meta(state: dict, args) -> dict:
    top = {v: k for k, v in HF_TOP.items()}
    out = {top[k]: v for k, v in state.items() if k in top}
    out.update(block_from_hf("model.layers.", "layers.", state, args))
    return out


def hf_config(args, **extra) -> dict:
    """config.json for transformers' LlamaForCausalLM (the 3.1 release's field set)."""
    bos = args.vocab_size - 256 if args.vocab_size >= 512 else None   # <|begin_of_text|> of tokenizer.py
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": None if bos is None else bos + 1,
        "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden, "initializer_range": 0.02,
        "max_position_embeddings": args.max_seq_len, "num_attention_heads": args.n_heads,
        "num_hidden_layers": args.n_layers, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "pretraining_tp": 1, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": None, "tie_word_embeddings": args.tie_embeddings, "torch_dtype": "bfloat16",
        "use_cache": True, "vocab_size": args.vocab_size,
    }
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {"factor": args.rope_scale_factor, "low_freq_factor": args.rope_low_freq_factor,
                               "high_freq_factor": args.rope_high_freq_factor,
                               "original_max_position_embeddings": args.rope_original_context,
                               "rope_type": "llama3"}
    cfg.update(extra)
    return cfg


def hf_context(cfg: dict) -> int:
    """max_seq_len of a Hugging Face config.json: its max_position_embeddings, at most 128K (the 3.1 release's)."""
    return min(int(cfg.get("max_position_embeddings", 8192)), 131072)


def args_from_hf_config(cfg: dict, source: str, ModelArgs):
    """model.ModelArgs from a Hugging Face config.json (accepts transformers v4 and v5 rope spellings)."""
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        head_dim = cfg.get("head_dim") or dim // n_heads
        if head_dim != dim // n_heads:
            raise ValueError(f"{source}: head_dim {head_dim} != hidden_size / num_attention_heads")
        args = ModelArgs(dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
                         n_kv_heads=cfg.get("num_key_value_heads", n_heads), vocab_size=cfg["vocab_size"],
                         norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
                         use_scaled_rope=rope.get("rope_type", rope.get("type")) == "llama3",
                         rope_scale_factor=float(rope.get("factor", 8.0)),
                         rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                         rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                         rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
                         max_seq_len=hf_context(cfg),
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         ffn_hidden_dim=int(cfg["intermediate_size"]))
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r} in config.json") from None
    return args


def hf_name(key: str) -> str:
    """Our (Meta) name of a base tensor -> its name in a Hugging Face file, for error messages."""
    if key in HF_TOP:
        return HF_TOP[key]
    if key.startswith("layers."):
        _, n, suffix = key.split(".", 2)
        return f"model.layers.{n}.{HF_NAMES.get(suffix, suffix)}"
    return key


def check_tensors(state: dict, expected: dict, source: str, name=lambda k: k):
    """One-line errors for missing, unexpected or mis-shaped tensors; name() spells a key as the file does."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"{source}: checkpoint is missing tensor {name(missing[0])!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{source}: unexpected tensor {name(extra[0])!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name(k)!r} has shape {tuple(state[k].shape)}, config expects "
                             f"{tuple(shape)}")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_safetensors(path: Path, dtype=None) -> dict[str, torch.Tensor]:
    """Every tensor of a HF directory (single file or sharded with an index), converted to dtype one by one.

    Checks each file's header against its size first, so a truncated download fails with its file name.
    """
    from safetensors import safe_open
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        weight_map, files = None, ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise FileNotFoundError(f"{f}: shard listed in {index.name} is missing")
        check_safetensors_file(f)
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if weight_map is not None and weight_map.get(k) != name:
                    continue
                t = st.get_tensor(k)
                state[k] = t if dtype is None else t.to(dtype)
    if weight_map is not None:
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise ValueError(f"{index}: tensor {absent[0]!r} is not in {weight_map[absent[0]]}")
    return state


def check_safetensors_file(f: Path):
    """Validate the 8-byte header length + JSON header + data size of a .safetensors file."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{f}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ValueError(f"{f}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{f}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{f}: truncated safetensors file ({size} bytes, tensors need {8 + n + end})")


def shape_of(path: Path) -> tuple[int, int] | None:
    """(dim, n_layers) from a checkpoint directory's config.json / params.json, without reading any tensor; None
    when the directory cannot say (loading it then reports what is wrong)."""
    try:
        if detect_layout(path) == "hf":
            c = read_json(path / "config.json")
            return int(c["hidden_size"]), int(c["num_hidden_layers"])
        p = read_json(path / "params.json")
        return int(p["dim"]), int(p["n_layers"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None


def context_of(path: Path) -> int | None:
    """max_seq_len of a checkpoint directory's model from its config.json / params.json (ModelArgs' default 8192
    when params.json has none), without reading any tensor; None when the directory cannot say."""
    try:
        if detect_layout(path) == "hf":
            return hf_context(read_json(path / "config.json"))
        return int(read_json(path / "params.json").get("max_seq_len", 8192))
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError):
        return None


WHAT = {"llama": "a plain Llama", "cola": "a CoLA checkpoint", "qnet": "a Q-network (mcts.py reads it as --qnet)"}


def kind_of(path, flag: str = "--ckpt") -> str:
    """What a checkpoint directory holds, read from its config.json / params.json alone (no tensor): "llama",
    "cola" (config.json has num_code) or "qnet" (q_level). Not a checkpoint directory (missing, a file, no or
    unreadable config, a run directory): one line naming the flag. cola.load and the scripts check with it."""
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"{flag} {path}: " + ("a file, not a checkpoint directory" if path.exists() else
                                               "directory not found"))
    for name in ("config.json", "params.json"):
        f = path / name
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (OSError, ValueError) as e:
                raise SystemExit(f"{flag} {f}: not readable JSON ({str(e).splitlines()[0]})") from None
            if not isinstance(cfg, dict):
                raise SystemExit(f"{flag} {f}: expected a JSON object")
            size = "hidden_size" if name == "config.json" else "dim"
            if size not in cfg:
                run = " (a run directory? its model is in final/)" if (path / "final").is_dir() else ""
                raise SystemExit(f"{flag} {f} describes no model (no {size}){run}")
            return "qnet" if "q_level" in cfg else "cola" if "num_code" in cfg else "llama"
    raise SystemExit(f"{flag} {path}: no config.json or params.json (not a checkpoint directory)")


def detect_layout(path: Path) -> str:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: checkpoint directory not found")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    raise ValueError(f"{path}: neither a Hugging Face checkpoint (config.json + *.safetensors) nor a Meta one "
                     f"(params.json + consolidated.00.pth)")


def load_llama_checkpoint(path: Path, ModelArgs, dtype=None) -> tuple:
    """(ModelArgs, base state dict with Meta names, other tensors) from a HF or Meta directory (ModelArgs: the class,
    model.ModelArgs).

    Tensors are converted to dtype one at a time. "Other tensors" are HF tensors that are not part of the Llama
    (a CoLA checkpoint's action_* / policy_* modules); a plain Llama has none.
    """
    layout = detect_layout(path)
    if layout == "hf":
        args = args_from_hf_config(read_json(path / "config.json"), str(path / "config.json"), ModelArgs)
        hf = read_safetensors(path, dtype)
        rest = {k: v for k, v in hf.items() if k not in HF_TOP.values() and not k.startswith("model.layers.")}
        return args, hf_to_meta(hf, args), rest
    params = read_json(path / "params.json")
    args = ModelArgs.from_dict({"ffn_dim_multiplier": None, "multiple_of": 256, "use_scaled_rope": False,
                                **params})
    shards = sorted(path.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"{path}: params.json found but no consolidated.00.pth")
    if len(shards) > 1:
        raise ValueError(f"{path}: {len(shards)} model-parallel shards; only single-file checkpoints "
                         f"(consolidated.00.pth: 1B, 3B, 8B) are supported")
    try:
        state = torch.load(shards[0], map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"{shards[0]}: cannot read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    state.pop("rope.freqs", None)    # Llama-2-era files carried it
    if args.tie_embeddings is False and "output.weight" in state and \
            state["output.weight"].data_ptr() == state["tok_embeddings.weight"].data_ptr():
        args.tie_embeddings = True
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return args, state, {}


def save_hf_checkpoint(path, config: dict, tensors: dict, max_shard_bytes: int = 5 * 2**30):
    """safetensors (sharded above max_shard_bytes, with an index) + config.json, each file written atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nbytes
    shards.append(cur)
    dtypes = {str(v.dtype).removeprefix("torch.") for v in tensors.values()}
    config = {**config, "torch_dtype": dtypes.pop() if len(dtypes) == 1 else "float32"}
    if len(shards) == 1:
        atomic_write(path / "model.safetensors", lambda t: save_file(shards[0], str(t), {"format": "pt"}))
        (path / "model.safetensors.index.json").unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(path / name, lambda t, s=shard: save_file(s, str(t), {"format": "pt"}))
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(path / "model.safetensors.index.json", lambda t: t.write_text(json.dumps(index, indent=2)))
        (path / "model.safetensors").unlink(missing_ok=True)
    atomic_write(path / "config.json", lambda t: t.write_text(json.dumps(config, indent=2)))


def load_base_state(model, state: dict, source: str):
    """Check every tensor's presence and shape against the model (a Transformer), then assign (no second copy)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.args.tie_embeddings:
        expected.pop("output.weight", None)
        state.pop("output.weight", None)
    layout = detect_layout(Path(source)) if Path(source).is_dir() else "meta"
    check_tensors(state, expected, source, hf_name if layout == "hf" else (lambda k: k))
    model.load_state_dict(state, strict=False, assign=True)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight


def save_llama(model, path, max_shard_bytes: int = 5 * 2**30):
    """The Hugging Face layout (config.json + safetensors), loadable by transformers and by us."""
    save_hf_checkpoint(path, hf_config(model.args), meta_to_hf(model.state_dict(), model.args), max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------------
# The official CoLA layout (IntentionForCausalLM wrapping IntentionModel_v1)

# Our single tensors -> official names (blocks and merge layers are renamed by prefix).
OFFICIAL_NAMES = {"idm.norm.weight": "model.action_norm.weight", "idm.head.weight": "model.action_head.weight",
                  "codebook.weight": "model.action_code_book.weight",
                  "policy.norm.weight": "model.policy_norm.weight", "policy.head.weight": "model.policy_head.weight"}
OFFICIAL_STACKS = [  # (our prefix, official prefix, config.json key, CoLAArgs field)
    ("idm.layers.", "model.action_layers.", "num_action_layer", "n_idm_layers"),
    ("merge.layers.", "model.action_merge_layers.", "num_dyna_layer", "n_merge_layers"),
    ("policy.layers.", "model.policy_layers.", "num_policy_layer", "n_policy_layers"),
]


def new_modules_to_hf(state: dict, base_args) -> dict:
    """Our IDM / codebook / merge / policy tensors -> official names (q/k permuted like HF Llama blocks)."""
    out = {}
    for ours, theirs, _, _ in OFFICIAL_STACKS:
        if ours == "merge.layers.":   # plain MLPs: same suffixes, no permutation
            out.update({theirs + k[len(ours):]: v for k, v in state.items() if k.startswith(ours)})
        else:
            out.update(block_to_hf(ours, theirs, state, base_args))
    out.update({theirs: state[ours] for ours, theirs in OFFICIAL_NAMES.items()})
    return out


def new_modules_from_hf(rest: dict, base_args) -> dict:
    """Inverse of new_modules_to_hf (official names -> ours, q/k un-permuted)."""
    out = {}
    for ours, theirs, _, _ in OFFICIAL_STACKS:
        if ours == "merge.layers.":
            out.update({ours + k[len(theirs):]: v for k, v in rest.items() if k.startswith(theirs)})
        else:
            out.update(block_from_hf(theirs, ours, rest, base_args))
    out.update({ours: rest[theirs] for ours, theirs in OFFICIAL_NAMES.items()})
    return out


def cola_config_json(model) -> dict:
    """config.json of the release: the base's HF Llama config plus the CoLA module sizes."""
    a = model.args
    extra = {"architectures": ["IntentionForCausalLM"], "v": 1, "num_code": a.n_actions,
             "num_action_layer": a.n_idm_layers, "num_dyna_layer": a.n_merge_layers,
             "num_policy_layer": a.n_policy_layers}
    if a.merge_hidden is not None and a.merge_hidden != model.base_args.ffn_hidden:
        extra["cola_merge_hidden"] = a.merge_hidden
    return hf_config(model.base_args, **extra)


def save_cola(model, path, max_shard_bytes: int = 5 * 2**30):
    """The official release layout: config.json + (sharded) safetensors, each file written atomically."""
    state = model.state_dict()
    base = {k[len("base."):]: v for k, v in state.items() if k.startswith("base.")}
    tensors = {**meta_to_hf(base, model.base_args), **new_modules_to_hf(state, model.base_args)}
    save_hf_checkpoint(path, cola_config_json(model), tensors, max_shard_bytes)


def load_new_modules(model, rest: dict, source: str):
    """Check the official action_* / policy_* tensors against the config, then assign them."""
    K = model.args.n_actions
    for name, axis in (("model.action_head.weight", 0), ("model.policy_head.weight", 0),
                       ("model.action_code_book.weight", 1)):
        if name in rest and rest[name].dim() == 2 and rest[name].shape[axis] != K:
            raise ValueError(f"{source}: tensor {name!r} of shape {tuple(rest[name].shape)} holds "
                             f"{rest[name].shape[axis]} actions but config.json num_code is {K}")
    for _, theirs, key, field in OFFICIAL_STACKS:
        want = getattr(model.args, field)
        found = len({k[len(theirs):].split(".", 1)[0] for k in rest if k.startswith(theirs)})
        if found != want:
            raise ValueError(f"{source}: config.json says {key} {want} but the checkpoint holds {found} "
                             f"{theirs}N blocks" + (" (module missing)" if found == 0 else ""))
    expected = {k: v.shape for k, v in new_modules_to_hf(model.state_dict(), model.base_args).items()}
    check_tensors(rest, expected, source)
    model.load_state_dict(new_modules_from_hf(rest, model.base_args), strict=False, assign=True)


def cola_args_from_config(cfg: dict, given, source, CoLAArgs):
    """cola.CoLAArgs from an official config.json (num_code, num_action_layer, num_dyna_layer, num_policy_layer);
    `given`, if not None, must agree with it."""
    try:
        args = CoLAArgs(n_actions=int(cfg["num_code"]), n_idm_layers=int(cfg["num_action_layer"]),
                        n_merge_layers=int(cfg["num_dyna_layer"]), n_policy_layers=int(cfg["num_policy_layer"]),
                        merge_hidden=cfg.get("cola_merge_hidden"))
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r} of a CoLA config") from None
    keys = {"n_actions": "num_code", "n_idm_layers": "num_action_layer", "n_merge_layers": "num_dyna_layer",
            "n_policy_layers": "num_policy_layer", "merge_hidden": "cola_merge_hidden"}
    for field, key in keys.items():
        if given is not None and getattr(given, field) != getattr(args, field):
            raise ValueError(f"{source}: cola_args.{field} {getattr(given, field)} disagrees with config.json "
                             f"{key} {getattr(args, field)}")
    return args
