"""Mutation testing of the paper-critical code (dev only; docs/testing.md): does the fast test tier fail on every
plausible wrong implementation? A mutant is a one-token change of one function (an operator, a constant, an index,
a dropped argument); a test that fails on it kills it. mutmut (requirements-mutation.txt) does the work; this script

  - narrows mutmut to the functions that carry the paper (SCOPE below), including those decorated with
    @torch.no_grad(), which mutmut 3 would otherwise skip whole (CoLA.generate, Transformer.generate, idm_labels);
  - runs only the fast tier: tests that neither build the trained tiny chain (conftest's `chain`) nor start a
    training run (the pytest plugin at the bottom, which setup.cfg's [mutmut] section loads);
  - prints killed / non-equivalent mutants per file (EQUIVALENT below lists, with a reason, the mutants that change
    nothing observable), then every survivor's diff.

Run it (one worker; about 11 min on 2 shared CPU cores for the 2159 mutants: 627 s measured, beside another job):
    pip install -r requirements-mutation.txt
    python -m tools.mutation                          # mutate, test, print the table and the survivors
    python -m tools.mutation report                   # the table again, from mutants/ (no run)
    python -m tools.mutation run --max-children 1 'train.x_bc_loss*'   # only these mutants (mutmut's name patterns)
    mutmut show 'idm.x_gumbel_softmax_st__mutmut_24'            # one mutant's diff; `mutmut browse`: all of them
A second run retests only what changed (mutmut's cache in mutants/); rm -rf mutants/ to start over. What mutmut
reads itself (files, test files, lines never mutated) is in setup.cfg's [mutmut] section.
"""
from __future__ import annotations

import ast
import os
import re
import sys
from pathlib import Path

# The functions that carry the paper, per file (Class.method or function). Everything else in these files (CLIs,
# checkpoint I/O, flag checks, the training loop) is not mutated.
SCOPE = {
    "idm.py": [  # f_inverse, direct action assignment, the regulariser (PAPER.md §2-3, Algorithm 1)
        "new_module_std", "ActionStack.__init__", "ActionStack.forward", "ActionStack.init_weights", "IDM.forward",
        "gumbel_softmax_st", "entropy_regulariser", "idm_labels", "codebook_stats", "codebook_usage"],
    "policy.py": [  # pi, its sampler (top-k 40) and the choosers, the RL log-prob
        "Policy.forward", "Policy.setup_cache", "Policy.clear_cache", "sample_actions", "sampler", "greedy", "fixed",
        "uniform", "forced", "seeded_sampler", "action_log_probs"],
    "cola.py": [  # merge module, world-model logits, look-ahead labels, latent generation and its positions
        "action_chooser", "check_actions", "MergeMLP.forward", "MergeModule.forward", "CoLA.hidden", "CoLA.idm_logits",
        "CoLA.idm_labels", "CoLA.world_state_from_code", "CoLA.world_state", "CoLA.world_logits",
        "CoLA.policy_logits", "CoLA.generate", "nearest_code"],
    "train.py": [  # every stage's loss (Algorithms 1 and 2)
        "row_uniforms", "base_loss", "pretrain_loss", "vq_pretrain_loss", "bc_loss", "fta_i_loss", "fta_p_loss"],
    "infra/ce.py": [  # the token cross-entropy, and its chunked form over the vocabulary
        "masked_ce", "ce_chunk_rows", "lm_head_ce", "ChunkedCE.forward", "ChunkedCE.backward"],
    "eval.py": [  # the held-out metrics every stage logs (lm, wm_idm, wm_policy, policy_acc)
        "lm_metrics", "cola_metrics"],
    "rl.py": [  # advantages, KL estimators, aggregation, the GRPO / ReMax losses, the log-probs (Algorithm 4)
        "grpo_advantages", "advantages", "k1", "k3", "aggregate", "grpo_loss", "remax_loss", "log_probs",
        "token_log_probs"],
    "data.py": [  # the batch the RL losses read
        "pack"],
    "model.py": [  # generation: KV cache, positions, the shared sampler
        "KVCache.update", "Attention.forward", "setup_kv_cache", "clear_kv_cache", "RopeCache.__call__",
        "Transformer.hidden", "Transformer.setup_cache", "Transformer.clear_cache", "Transformer.generate", "sample",
        "prompt_buffer", "new_tokens"],
}

# Mutants that change nothing observable: (function, the mutated line (stripped, without its comment), why). Matched
# by content, not by mutant number, so an entry follows its line when the code around it moves, and stops matching
# (it is reported as stale) when the line itself changes. Reasons starting "cpu-only" are counted apart: a run on
# an accelerator would tell them (device arguments).
WHY = {
    "boolmask": "a bool mask promotes to the same float values",
    "promote": "onehot - y + y promotes the int64 one-hot to y's float32: the same values",
    "bias": "bias=None is bias=False",
    "default": "a default no caller uses: every call passes start_pos",
    "nocache": "start_pos only indexes a KV cache, and the IDM never has one (it reads whole sequences)",
    "pad": "the placeholder action of a masked position: any valid index, the result there is 0",
    "int": "the dtype inferred from Python ints is int64 already",
    "dim": "the tensor is 2-D ([B, N] or [B, 1]): dim 1 is dim -1",
    "topkn": "top-k with k = N keeps every entry",
    "topkdim": "topk's default dim is -1",
    "inf": "float() reads '-INF' as -inf too",
    "ucast": "the uniforms are float32 like the CDF (policy.sample_uniforms): the cast does nothing",
    "cdf1": "cdf[:, -1] is 1 up to rounding: u * 1 and u / 1 fall in the same bin unless within rounding of an edge",
    "clamp": "the clamp never binds: u < 1 keeps the index below N",
    "poldef": "only the RL reference uses this default, without a KV cache; start_pos only indexes the cache",
    "never": "positions never reported: each row reports only its own new tokens' actions",
    "float": "float32 is the default dtype",
    "stop": "stop ids are Python ints (int64 inferred); an empty set matches nothing in either dtype",
    "forced": "forced actions are integers: int32 and int64 index the same actions",
    "exit": "the early exit once every row has stopped only saves steps: each row is cut after its eos either way",
    "cache": "the KV cache changes speed, not tokens (tested: cache == recompute)",
    "neg": "any negative fill marks an empty slot (real tokens are >= 0)",
    "slice": "new[:None] and new[:len(new)] are the same list",
    "tau1": "dividing by tau = 1 changes no value: the log-probs are taken in float32 either way",
    "norm": "||z_e||^2 is the same for every code: the argmin does not change",
    "seedseq": "the first word of SeedSequence.generate_state does not depend on how many words are drawn",
    "how": "aggregate treats every value but 'sequence' as 'token'",
    "edge": "|rho - 1| = eps exactly: clipped and unclipped terms coincide there; counting it is a convention",
    "rope": "RoPE attention depends on position differences only, and a rollout never fills the last position",
    "reshard": "reshard acts only on FSDP-sharded modules (torchrun); the fast tier runs one process",
    "nonuc": "top_p >= 1 keeps every token either way",
    "nuc1": "at p = 1 the nucleus drops nothing: the same distribution, drawn in sorted order",
    "sortdim": "sort's default dim is -1",
    "pedge": "differs only when the mass before a token equals p exactly",
    "multi": "torch.multinomial normalises each row itself",
    "scatter": "scatter_add_ reads src only where index has entries: index [c, 1] reads src's first column",
    "gradcast": "autograd casts a gradient returned by backward to its input's dtype (w's), with the same rounding",
    "gqa": "K/V heads repeated by hand are what enable_gqa does: the same attention, only the CUDA kernel differs",
    "cpu": "cpu-only: the device (positional, or .to(None)): the default device is the CPU, where this run tests",
    "cpu-rope": "cpu-only: with one device the table is only rebuilt, with the same values",
    "cpu-cuda": "cpu-only: inside the branch taken only for CUDA float32 (q.is_cuda), never on a CPU",
}
EQUIVALENT: list[tuple[str, str, str]] = [
    # idm.py
    ("entropy_regulariser", "m = mask.to(None)", "boolmask"),
    ("gumbel_softmax_st", "onehot = F.one_hot(k, zf.shape[-1]).to(None)", "promote"),
    ("ActionStack.__init__", "self.head = nn.Linear(args.dim, n_actions, bias=None)", "bias"),
    ("ActionStack.forward",
     "def forward(self, h: torch.Tensor, rope: torch.Tensor, start_pos: int = 1) -> torch.Tensor:", "default"),
    ("IDM.forward", "return super().forward(h, rope, None)", "nocache"),
    ("IDM.forward", "return super().forward(h, rope, )", "nocache"),
    ("IDM.forward", "return super().forward(h, rope, 1)", "nocache"),
    # policy.py
    ("action_log_probs", "safe = torch.where(mask, actions.long(), 1)", "pad"),
    ("fixed",
     "return lambda logits, n: torch.full((logits.shape[0],), action, dtype=None, device=logits.device)", "int"),
    ("fixed", "return lambda logits, n: torch.full((logits.shape[0],), action, device=logits.device)", "int"),
    ("greedy", "return lambda logits, n: logits.argmax(+1)", "dim"),
    ("seeded_sampler", "if top_k is not None and top_k <= logits.shape[-1]:", "topkn"),
    ("seeded_sampler", "if top_k is not None and top_k < logits.shape[+1]:", "dim"),
    ("seeded_sampler", "kth = logits.topk(top_k, ).values[:, -1:]", "topkdim"),
    ("seeded_sampler", "kth = logits.topk(top_k, dim=+1).values[:, -1:]", "dim"),
    ("seeded_sampler", 'logits = logits.masked_fill(logits < kth, float("-INF"))', "inf"),
    ("seeded_sampler", "cdf = logits.softmax(+1).cumsum(-1)", "dim"),
    ("seeded_sampler", "cdf = logits.softmax(-1).cumsum(+1)", "dim"),
    ("seeded_sampler", "u = uniforms.gather(1, n.clamp(max=uniforms.shape[1] - 1)[:, None]).to(None)", "ucast"),
    ("seeded_sampler", "return torch.searchsorted(cdf, u / cdf[:, -1:]).clamp(max=cdf.shape[1] - 1)[:, 0]", "cdf1"),
    ("seeded_sampler", "return torch.searchsorted(cdf, u * cdf[:, -1:]).clamp(max=cdf.shape[1] + 1)[:, 0]", "clamp"),
    ("Policy.forward",
     "def forward(self, h: torch.Tensor, rope: torch.Tensor, start_pos: int = 1) -> torch.Tensor:", "poldef"),
    ("Policy.setup_cache", "setup_kv_cache(self.layers, batch, max_len, dtype, None)", "cpu"),
    # cola.py
    ("CoLA.generate", "acts = torch.full((B, total), -1, dtype=None, device=device)", "int"),
    ("CoLA.generate", "acts = torch.full((B, total), -1, device=device)", "int"),
    ("CoLA.generate", "acts = torch.full((B, total), +1, dtype=torch.long, device=device)", "never"),
    ("CoLA.generate", "acts = torch.full((B, total), -2, dtype=torch.long, device=device)", "never"),
    ("CoLA.generate", "logps = torch.zeros((B, total), dtype=None, device=device)", "float"),
    ("CoLA.generate", "logps = torch.zeros((B, total), device=device)", "float"),
    ("CoLA.generate", "self.policy.setup_cache(B, total, self.codebook.weight.dtype, None)", "cpu"),
    ("CoLA.generate", "nxt = self.world_logits(h[:, -1:], a[:, None])[:, 0].float().argmax(+1)", "dim"),
    ("CoLA.generate", "acts[:, cur] = torch.where(new, a, +1)", "never"),
    ("CoLA.generate", "acts[:, cur] = torch.where(new, a, -2)", "never"),
    ("CoLA.generate", "logps[:, cur] = F.log_softmax(pi_logits, None).gather(-1, a[:, None])[:, 0]", "dim"),
    ("CoLA.generate", "logps[:, cur] = F.log_softmax(pi_logits, ).gather(-1, a[:, None])[:, 0]", "dim"),
    ("CoLA.generate", "logps[:, cur] = F.log_softmax(pi_logits, +1).gather(-1, a[:, None])[:, 0]", "dim"),
    ("CoLA.generate", "logps[:, cur] = F.log_softmax(pi_logits, -1).gather(+1, a[:, None])[:, 0]", "dim"),
    ("CoLA.generate", "forced_actions = torch.as_tensor(forced_actions, dtype=None, device=device)", "forced"),
    ("CoLA.generate", "forced_actions = torch.as_tensor(forced_actions, device=device)", "forced"),
    ("CoLA.generate", "done = new & torch.isin(nxt, stop)", "exit"),
    ("CoLA.generate", "done &= new & torch.isin(nxt, stop)", "exit"),
    ("CoLA.generate", "if bool(None):", "exit"),
    ("CoLA.generate", "eos: int | list[int] | None = None, use_cache: bool = False,", "cache"),
    # train.py
    ("nearest_code", "dist = z_e.pow(2).sum(None, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(0)", "norm"),
    ("nearest_code", "dist = z_e.pow(3).sum(-1, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(0)", "norm"),
    ("pretrain_loss", "u = row_uniforms(b.ids, z.shape[1:], seed, None)", "cpu"),
    ("row_uniforms", "mixed = int(np.random.SeedSequence([seed, int(i)]).generate_state(2)[0])", "seedseq"),
    ("ChunkedCE.forward", "lse = torch.empty(len(s), dtype=None, device=s.device)", "float"),
    ("ChunkedCE.forward", "lse = torch.empty(len(s), device=s.device)", "float"),
    ("ChunkedCE.forward", "total = torch.zeros((), dtype=None, device=s.device)", "float"),
    ("ChunkedCE.forward", "total = torch.zeros((), device=s.device)", "float"),
    ("ChunkedCE.forward", "lse[i:i + chunk] = torch.logsumexp(z, +1)", "dim"),
    ("ChunkedCE.backward",
     "dw = torch.zeros(w.shape, dtype=None, device=w.device) if ctx.needs_input_grad[1] else None", "float"),
    ("ChunkedCE.backward", "dw = torch.zeros(w.shape, device=w.device) if ctx.needs_input_grad[1] else None", "float"),
    ("ChunkedCE.backward", "dz.scatter_add_(1, y[i:i + ctx.chunk, None], -torch.ones_like(dz[:, :2]))", "scatter"),
    ("ChunkedCE.backward", "return ds, None if dw is None else dw.to(None), None, None, None", "gradcast"),
    # rl.py
    ("log_probs", "warm = (lambda z: z) if (tau == 1.0) and False else (lambda z: z.float() / tau)", "tau1"),
    ("grpo_loss",
     '((rho - 1).abs() > cfg.clip_eps).float(), mask, None).item(), "ratio_max": rho[mask].max().item()}', "how"),
    ("grpo_loss",
     '((rho - 1).abs() > cfg.clip_eps).float(), mask, "XXtokenXX").item(), "ratio_max": rho[mask].max().item()}',
     "how"),
    ("grpo_loss",
     '((rho - 1).abs() > cfg.clip_eps).float(), mask, "TOKEN").item(), "ratio_max": rho[mask].max().item()}', "how"),
    ("grpo_loss",
     '((rho - 1).abs() >= cfg.clip_eps).float(), mask, "token").item(), "ratio_max": rho[mask].max().item()}', "edge"),
    ("log_probs", "rope = model.base.rope(1, h.shape[1], h.device)", "rope"),
    ("log_probs", "if with_grad:", "reshard"),
    ("pack", "a = torch.full((len(seqs), L - 1), -1, dtype=None)", "int"),
    ("pack", "a = torch.full((len(seqs), L - 1), -1, )", "int"),
    ("pack", 'a[i, len(p) - 1:len(seqs[i]) - 1] = torch.tensor(r["actions"], dtype=None)', "int"),
    ("pack", 'a[i, len(p) - 1:len(seqs[i]) - 1] = torch.tensor(r["actions"], )', "int"),
    ("pack", 'return {"x": x.to(None), "mask": m.to(device), "actions": a.to(device)}', "cpu"),
    ("pack", 'return {"x": x.to(device), "mask": m.to(None), "actions": a.to(device)}', "cpu"),
    ("pack", 'return {"x": x.to(device), "mask": m.to(device), "actions": a.to(None)}', "cpu"),
    # model.py
    ("sample", "if top_k is not None and top_k <= logits.shape[-1]:", "topkn"),
    ("sample", "if top_k is not None and top_k < logits.shape[+1]:", "dim"),
    ("sample", "kth = logits.topk(top_k, ).values[:, -1:]", "topkdim"),
    ("sample", "kth = logits.topk(top_k, dim=+1).values[:, -1:]", "dim"),
    ("sample", 'logits = logits.masked_fill(logits < kth, float("-INF"))', "inf"),
    ("sample", "probs = logits.softmax(+1)", "dim"),
    ("sample",
     "def sample(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 2.0, top_k: int | None = None,",
     "nonuc"),
    ("sample", "if top_p <= 1.0:", "nuc1"),
    ("sample", "if top_p < 2.0:", "nuc1"),
    ("sample", "p_sorted, idx = probs.sort(descending=True)", "sortdim"),
    ("sample", "p_sorted, idx = probs.sort(dim=+1, descending=True)", "dim"),
    ("sample", "drop = p_sorted.cumsum(+1) - p_sorted > top_p", "dim"),
    ("sample", "drop = p_sorted.cumsum(-1) - p_sorted >= top_p", "pedge"),
    ("sample", "return logits.argmax(+1)", "dim"),
    ("sample",
     "choice = torch.multinomial(p_sorted * p_sorted.sum(-1, keepdim=True), 1, generator=generator)", "multi"),
    ("sample",
     "choice = torch.multinomial(p_sorted / p_sorted.sum(None, keepdim=True), 1, generator=generator)", "multi"),
    ("sample", "choice = torch.multinomial(p_sorted / p_sorted.sum(+1, keepdim=True), 1, generator=generator)", "dim"),
    ("sample", "return idx.gather(+1, choice).squeeze(-1)", "dim"),
    ("sample", "return idx.gather(-1, choice).squeeze(+1)", "dim"),
    ("sample", "return torch.multinomial(probs, 1, generator=generator).squeeze(+1)", "dim"),
    ("setup_kv_cache", "a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, None)", "cpu"),
    ("Attention.forward",
     "def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int = 1) -> torch.Tensor:", "default"),
    ("Attention.forward", "if q.is_cuda or q.dtype == torch.float32:", "gqa"),
    ("Attention.forward", "if q.is_cuda and q.dtype != torch.float32:", "gqa"),
    ("Attention.forward", "G = None", "cpu-cuda"),
    ("Attention.forward", "G = self.n_heads / self.n_kv_heads", "cpu-cuda"),
    ("Attention.forward", "k, v = None", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(None, 1), v.repeat_interleave(G, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, None), v.repeat_interleave(G, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(1), v.repeat_interleave(G, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, ), v.repeat_interleave(G, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 1), v.repeat_interleave(None, 1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, None)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 1), v.repeat_interleave(1)", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, )", "cpu-cuda"),
    ("Attention.forward", "k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 2)", "cpu-cuda"),
    ("RopeCache.__call__", "self.table = rope_table(self.args, None)", "cpu"),
    ("RopeCache.__call__", "self.table = rope_table(self.args, )", "cpu"),
    ("RopeCache.__call__", "if self.table is None or self.table.device == torch.device(device):", "cpu-rope"),
    ("Transformer.generate", "done = ~in_prompt[:, cur] & torch.isin(nxt, stop)", "exit"),
    ("Transformer.generate", "done &= ~in_prompt[:, cur] & torch.isin(nxt, stop)", "exit"),
    ("Transformer.generate", "done |= in_prompt[:, cur] & torch.isin(nxt, stop)", "exit"),
    ("Transformer.generate", "if bool(None):", "exit"),
    ("Transformer.generate",
     "top_p: float = 2.0, eos: int | list[int] | None = None, use_cache: bool = True,", "nonuc"),
    ("Transformer.generate",
     "top_p: float = 1.0, eos: int | list[int] | None = None, use_cache: bool = False,", "cache"),
    ("Transformer.generate", "None)", "cpu"),
    ("CoLA.generate",
     "tokens, lens_t, stop = prompt_buffer(prompts, max_new_tokens, self.base_args.max_seq_len, eos, None)", "cpu"),
    ("prompt_buffer", "tokens = torch.full((len(prompts), total), -1, dtype=None, device=device)", "int"),
    ("prompt_buffer", "tokens = torch.full((len(prompts), total), -1, device=device)", "int"),
    ("prompt_buffer", "tokens = torch.full((len(prompts), total), -2, dtype=torch.long, device=device)", "neg"),
    ("prompt_buffer", "tokens[i, :len(p)] = torch.tensor(p, dtype=None)", "int"),
    ("prompt_buffer", "tokens[i, :len(p)] = torch.tensor(p, )", "int"),
    ("prompt_buffer",
     "stop = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or [])), dtype=None, device=device)", "stop"),
    ("prompt_buffer", "stop = torch.tensor(sorted({eos} if isinstance(eos, int) else set(eos or [])), device=device)",
     "stop"),
    ("new_tokens", "cut = next((j + 1 for j, t in enumerate(new) if t in stops), None)", "slice"),
    ("Transformer.setup_cache",
     "setup_kv_cache(self.layers, batch, min(max_len, self.args.max_seq_len), p.dtype, None)", "cpu"),
]

# Tests that build or read the trained tiny chain, or run training, are not the fast tier (minutes per mutant).
SLOW_FIXTURES = {"chain", "task"}
SLOW_TESTS = {"test_pipeline_smallest_scale", "test_crash_while_writing_checkpoint_keeps_previous",
              "test_nan_loss_stops_and_keeps_last_good_checkpoint"}


# ----------------------------------------------------------------------------------------------------------------
# Narrowing mutmut (3.8.1, pinned in requirements-mutation.txt) to SCOPE


def qualnames(source: str) -> set[str]:
    """Class.method / function of every function at the top level and one class deep."""
    out, defs = set(), (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.parse(source).body:
        if isinstance(node, defs):
            out.add(node.name)
        elif isinstance(node, ast.ClassDef):
            out |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, defs)}
    return out


def check_scope():
    """Every name in SCOPE must exist: a renamed function would silently leave the run."""
    for path, names in SCOPE.items():
        missing = set(names) - qualnames(Path(path).read_text())
        if missing:
            raise SystemExit(f"tools/mutation.py: SCOPE[{path!r}] names {sorted(missing)}, which {path} does not define; "
                             f"update SCOPE")


def install_scope():
    """Patch mutmut's mutant generation: keep only mutations inside SCOPE's functions, and do not skip functions
    whose only decorator is @torch.no_grad() (mutmut skips every decorated function: a decorator may have side
    effects when the function is copied; torch.no_grad has none)."""
    import libcst as cst
    from mutmut.mutation import file_mutation as fm

    def is_no_grad(d: cst.Decorator) -> bool:
        return cst.Module([]).code_for_node(d.decorator) == "torch.no_grad()"

    skip = fm.MutationVisitor._skip_node_and_children

    def skip_node_and_children(self, node):
        if isinstance(node, cst.FunctionDef) and node.decorators and all(map(is_no_grad, node.decorators)):
            node = node.with_changes(decorators=())
        return skip(self, node)

    create = fm.create_mutations

    def create_mutations(filename, code, *args, **kwargs):
        module, mutations, ignored_classes, ignored_functions = create(filename, code, *args, **kwargs)
        keep = set(SCOPE.get(str(Path(filename)), ()))
        names = {id(f): name for name, f in _functions(module)}
        mutations = [m for m in mutations if names.get(id(m.contained_by_top_level_function)) in keep]
        return module, mutations, ignored_classes, ignored_functions

    fm.MutationVisitor._skip_node_and_children = skip_node_and_children
    fm.create_mutations = create_mutations


def _functions(module):
    """(Class.method or function, its FunctionDef) for the functions mutmut mutates: top level and one class deep."""
    import libcst as cst
    for node in module.body:
        if isinstance(node, cst.FunctionDef):
            yield node.name.value, node
        elif isinstance(node, cst.ClassDef) and isinstance(node.body, cst.IndentedBlock):
            for f in node.body.body:
                if isinstance(f, cst.FunctionDef):
                    yield f"{node.name.value}.{f.name.value}", f


def install_also_copy():
    """The modules the tests import but mutmut does not mutate (every other .py at the top, in infra/ and tools/) go
    into mutants/ too, file by file (a folder copied whole would overwrite the mutated files in it)."""
    from mutmut.configuration import config
    cfg = config()
    cfg.also_copy += [p for d in (".", "infra", "tools") for p in sorted(Path(d).glob("*.py"))
                      if p.as_posix() not in SCOPE]
    for d in ("infra", "tools"):                     # mutmut copies files into existing folders only
        (Path("mutants") / d).mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# The report


def diff_lines(name: str, path: str) -> tuple[str, str]:
    """(removed lines, added lines) of a mutant, each stripped of its trailing comment and joined by ' / '."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    diff = get_diff_for_mutant(name, path=path).splitlines()[2:]
    code = lambda x: re.sub(r"\s{2,}#.*$", "", x[1:]).strip()                          # noqa: E731
    return (" / ".join(code(x) for x in diff if x.startswith("-")),
            " / ".join(code(x) for x in diff if x.startswith("+")))


def device_only(minus: str, plus: str) -> bool:
    """The mutant only sets a device= argument to None or drops it: the default device is the CPU, where this run
    tests, so only a run on an accelerator can tell (like WHY["cpu"])."""
    strip = lambda s: re.sub(r"\s", "", re.sub(r"device=[\w.]+(\([\w.]*\))?", "", s)).replace(",)", ")")  # noqa
    return minus != plus and strip(minus) == strip(plus)


def report() -> int:
    """killed / (mutants - equivalent) per file, then every survivor's diff and any stale EQUIVALENT entry."""
    import json
    from mutmut.stats import status_by_exit_code
    equivalent = {(func, line): why for func, line, why in EQUIVALENT}
    used, rows, survivors, complete = set(), [], [], True
    for path in SCOPE:
        meta = Path("mutants") / (path + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        count = dict.fromkeys(("killed", "equivalent", "cpu", "survived", "no tests", "not checked", "other"), 0)
        for name, code in sorted(codes.items()):
            status = status_by_exit_code[code]
            if status in ("killed", "timeout", "not checked"):
                count["killed" if status != "not checked" else status] += 1
                continue
            func = name[len(path.removesuffix(".py").replace("/", ".")) + 1:].split("__mutmut_")[0]
            func = func.replace("xǁ", "").replace("ǁ", ".").removeprefix("x_")
            minus, plus = diff_lines(name, path)
            if status in ("survived", "no tests") and ((func, plus) in equivalent or device_only(minus, plus)):
                cpu = (func, plus) not in equivalent or equivalent[func, plus].startswith("cpu")
                count["cpu" if cpu else "equivalent"] += 1
                used.add((func, plus))
                continue
            count[status if status in count else "other"] += 1
            survivors.append(f"  {status:<10} {name}\n      - {minus}\n      + {plus}")
        complete &= count["not checked"] == 0
        rows.append((path, count, sum(count.values()) - count["equivalent"] - count["cpu"] - count["not checked"]))
    print("\nmutation score: killed / non-equivalent mutants, per file (equivalent: changes nothing observable;"
          "\ncpu-only: changes only the device a tensor is made on, which a CPU cannot see)")
    for path, c, total in rows:
        print(f"  {path:<12} {c['killed']:>4} / {total:<4} {c['killed'] / max(total, 1):6.1%}   equivalent "
              f"{c['equivalent']:>3}   cpu-only {c['cpu']:>3}   survived {c['survived']:>3}   no test "
              f"{c['no tests']:>3}   other {c['other']}   not run {c['not checked']}")
    killed, total = sum(c["killed"] for _, c, _ in rows), sum(t for *_, t in rows)
    print(f"  {'all':<12} {killed:>4} / {total:<4} {killed / max(total, 1):6.1%}")
    if survivors:
        print("\nsurvivors:\n" + "\n".join(survivors))
    stale = [k for k in equivalent if k not in used]
    if stale and rows and complete:
        print("\nEQUIVALENT entries that matched no surviving mutant (the line changed, or a test now kills it):")
        print("\n".join(f"  {func}: {line}" for func, line in stale))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Entry point, and the pytest plugin that selects the fast tier (setup.cfg: pytest_add_cli_args = -p mutation)


def main(argv: list[str]) -> int:
    os.chdir(Path(__file__).resolve().parents[1])
    if argv[:1] == ["report"]:
        return report()
    check_scope()
    # one torch thread: the workers share 2 cores with whatever else runs, and OpenMP threads spin-wait
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    try:
        import mutmut.__main__ as mutmut_cli
    except ImportError:
        raise SystemExit("tools/mutation.py needs mutmut: pip install -r requirements-mutation.txt") from None
    install_scope()
    install_also_copy()
    args = argv or ["run", "--max-children", "1"]
    try:
        mutmut_cli.cli.main(args, prog_name="mutmut", standalone_mode=False)
    except SystemExit as e:
        if e.code:
            return int(e.code) if isinstance(e.code, int) else 1
    return report() if args[0] == "run" else 0


def pytest_collection_modifyitems(config, items):
    slow = [i for i in items if SLOW_FIXTURES & set(i.fixturenames) or i.originalname in SLOW_TESTS]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if i not in slow]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
