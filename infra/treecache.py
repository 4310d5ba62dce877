"""What a tree search (mcts.py) runs, and what it keeps so that it does not run it twice.

Engine      the model a method runs (CoLA or a plain Llama, optionally a Q-network), its KV caches and the cost
            counter: every forward goes through Engine.run / run_q, which count the token positions they run.
TreeCache   three calls the search makes, computed with as little work as the caches allow:
              state(n)       the output at node n's last position: (h_t [D], pi's logits [K]) for CoLA, (h_t, the
                             LM's logits [V]) for a plain Llama; state(n, "q") the Q-values [A] there (MCTS-Q)
              rollout(c)     the greedy rollout from c to the end (argmax pi, argmax p_WM; tokens: argmax)
              extend(c, k)   MCTS-Q moved the first k tokens of c's rollout into c's own segment
            A node keeps the K/V of its own tokens and its last output: the caches of a prefix are the concatenation
            of its path's pieces, so a new child runs one token, not its whole prefix (kv_reuse). A greedy rollout
            depends only on the prefix, so a child whose token is the next token of its parent's rollout inherits
            the rest of that rollout and its K/V without running anything; MCTS-Q's extension is the same rollout's
            next k tokens, also free (rollout_reuse). Turning either off changes what is counted, never a result.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

LM, Q = "lm", "q"                      # the two stacks of caches: the base's blocks (and pi's for CoLA), the Q trunk's


@dataclass
class Cost:
    """What a method ran. base + q is the count of forward tokens; flops(rates) the multiply-adds of all of it."""
    base: int = 0      # token positions through the base Llama (CoLA) or the LM (token level)
    policy: int = 0    # positions through pi's blocks and head (CoLA: every base position)
    wm: int = 0        # rows through the merge module + W_lm (CoLA: one per candidate action / generated token)
    q: int = 0         # positions through the Q-network's Llama trunk and head (MCTS-Q)
    head: int = 0      # rows through the LM's W_lm (token level: the last position of each forward)
    base_keys: int = 0     # attention scores: sum over the queries run of the keys each one is scored against
    policy_keys: int = 0
    q_keys: int = 0

    @property
    def total(self) -> int:
        return self.base + self.q

    def flops(self, rates: dict) -> int:
        """FLOPs (2 per multiply-add) of every matrix product run: the Linear layers per position or row, and
        attention, 4 x heads x head_dim per (query, key) pair per layer (QK^T, then the weights times V) over the
        whole score matrix, as the kernels compute it. Norms, RoPE, softmax and embedding lookups are not counted
        (a few percent at most)."""
        return sum(getattr(self, k) * rates[k] for k in rates)


def matmul_params(*modules) -> int:
    """Weights of the Linear layers of blocks, heads and merge MLPs (their 2-D parameters): one multiply-add per
    weight per row."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)


def flop_rates(model, level: str, qnet=None) -> dict:
    """FLOPs per unit of each Cost counter for this engine's models (Cost.flops)."""
    lm = model.base if level == "latent" else model
    a = lm.args
    attn = 4 * a.n_heads * a.head_dim                                # per (query, key) pair per layer
    rates = {"base": 2 * matmul_params(*lm.layers), "head": 2 * a.dim * a.vocab_size,
             "base_keys": attn * len(lm.layers)}
    if level == "latent":
        rates |= {"policy": 2 * matmul_params(*model.policy.layers, model.policy.head),
                  "policy_keys": attn * len(model.policy.layers),
                  "wm": 2 * (matmul_params(model.merge) + a.dim * a.vocab_size)}
    if qnet is not None:
        rates |= {"q": 2 * matmul_params(*qnet.trunk.layers, qnet.head), "q_keys": attn * len(qnet.trunk.layers)}
    return rates


class Engine:
    """The model a method runs (CoLA or a plain Llama, optionally a Q-network), with KV caches for `rows` rows of
    max_len positions, and the cost counter. Two stacks of caches: "lm" (the base's blocks, and pi's for CoLA) and
    "q" (the Q trunk's). Every forward goes through run() / run_q(), which count what they run."""

    def __init__(self, model, level: str, qnet=None):
        self.model, self.level, self.qnet = model, level, qnet
        self.lm = model.base if level == "latent" else model
        self.max_len = self.lm.args.max_seq_len
        self.cost, self.rows = Cost(), 0
        self.rates = flop_rates(model, level, qnet)   # FLOPs per unit of each counter (Cost.flops)
        self.loaded = {LM: None, Q: None}              # the node whose path the caches hold now

    # -- caches ------------------------------------------------------------------------------------------------
    def setup(self, rows: int):
        w = self.lm.tok_embeddings.weight
        self.lm.setup_cache(rows, self.max_len)
        if self.level == "latent":
            self.model.policy.setup_cache(rows, self.max_len, self.model.codebook.weight.dtype, w.device)
        if self.qnet is not None:
            self.qnet.trunk.setup_cache(rows, self.max_len)
        self.rows, self.loaded = rows, {LM: None, Q: None}

    def clear(self):
        self.lm.clear_cache()
        if self.level == "latent":
            self.model.policy.clear_cache()
        if self.qnet is not None:
            self.qnet.trunk.clear_cache()
        self.rows = 0

    def blocks(self, stack: str) -> list:
        if stack == Q:
            return list(self.qnet.trunk.layers)
        return list(self.lm.layers) + (list(self.model.policy.layers) if self.level == "latent" else [])

    def save_kv(self, stack: str, p0: int, p1: int, row: int = 0) -> list:
        """[(k, v)] per block of the stack, positions p0..p1-1 of one row: each [1, Hkv, p1-p0, Dh] (a copy)."""
        return [(b.attention.cache.k[row:row + 1, :, p0:p1].clone(), b.attention.cache.v[row:row + 1, :, p0:p1].clone())
                for b in self.blocks(stack)]

    def load_kv(self, stack: str, kv: list, p0: int):
        """Write [(k, v)] per block ([1, Hkv, n, Dh]) at positions p0.. of every row."""
        for b, (k, v) in zip(self.blocks(stack), kv):
            b.attention.cache.k[:self.rows, :, p0:p0 + k.shape[2]] = k
            b.attention.cache.v[:self.rows, :, p0:p0 + v.shape[2]] = v

    def keep_rows(self, idx: torch.Tensor, length: int):
        """Batched sampling: keep only rows idx (in that order) of the lm caches' first `length` positions."""
        for b in self.blocks(LM):
            c = b.attention.cache
            c.k[:len(idx), :, :length] = c.k[idx, :, :length]
            c.v[:len(idx), :, :length] = c.v[idx, :, :length]

    # -- forward passes, counted ---------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] at positions pos.. -> (h [B, D], logits [B, A]) at the last position: pi's logits over K
        actions (CoLA) or the LM's over V tokens."""
        B, T = tokens.shape
        self.cost.base += B * T
        self.cost.base_keys += B * T * (pos + T)
        h = self.lm.hidden(tokens, pos)                                                  # [B, T, D]
        if self.level == "latent":
            self.cost.policy += B * T
            self.cost.policy_keys += B * T * (pos + T)
            return h[:, -1], self.model.policy_logits(h, pos)[:, -1].float()            # [B, D], [B, K]
        self.cost.head += B
        return h[:, -1], self.lm.output(h[:, -1]).float()                                # [B, D], [B, V]

    def run_q(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """tokens [B, T] at positions pos.. -> Q(s, .) [B, A] at the last position."""
        B, T = tokens.shape
        self.cost.q += B * T
        self.cost.q_keys += B * T * (pos + T)
        return self.qnet(tokens, pos)[:, -1].float()                                     # [B, A]

    def next_token(self, h: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """x_{t+1} for each row: CoLA's greedy world-model token argmax p_WM(. | h_t, a_t); a token is itself.
        h [B, D], choice [B] -> [B]."""
        if self.level != "latent":
            return choice
        self.cost.wm += choice.shape[0]
        return self.model.world_logits(h[:, None], choice[:, None])[:, 0].float().argmax(-1)   # [B]


@dataclass(eq=False)
class NodeCache:
    """What a node keeps (mcts.Node.cache). Per stack, K/V of seg[:covered] and the output at the last position once
    covered = len(seg); for its greedy rollout (when rollouts are reused), the K/V and outputs of tail[:-1]."""
    kv: dict = field(default_factory=dict)           # stack -> [(k [1, Hkv, covered, Dh], v)] per block
    out: dict = field(default_factory=dict)          # "lm" -> (h [D], logits [A]); "q" -> Q [A]
    tail_kv: list | None = None                      # K/V of tail[:-1] per block
    tail_out: tuple | None = None                    # (h [L-1, D], logits [L-1, A]) after each of tail[:-1]


class TreeCache:
    """state / rollout / extend for the nodes of one search (module docstring). Nodes are mcts.Node: seg, parent,
    pos0, pos1, path(), tail, cache (a NodeCache)."""

    def __init__(self, engine: Engine, limit: int, stops: set, kv_reuse: bool = True, rollout_reuse: bool = True):
        self.e, self.limit, self.stops = engine, limit, stops
        self.kv_reuse, self.rollout_reuse = kv_reuse, rollout_reuse

    # -- the three calls -----------------------------------------------------------------------------------------
    def state(self, n, stack: str = LM):
        """The output at n's last position (lm: (h [D], logits [A]); q: Q [A]), computed if not cached."""
        if stack not in n.cache.out:
            self.ensure(n, stack)
        return n.cache.out[stack]

    def rollout(self, c) -> tuple[list[int], bool]:
        """(the greedy rollout's tokens after c's prefix, whether they were inherited from c's parent's rollout)."""
        p, m = c.parent, len(c.seg)
        if self.rollout_reuse and p is not None and len(p.tail) > m and p.tail[:m] == c.seg:
            self.inherit(c, p.cache.tail_kv, p.cache.tail_out, m)
            return p.tail[m:], True
        self.prepare(c)
        h, logits = c.cache.out[LM]
        tail, hs, ls = [], [], []
        while True:
            x = int(self.e.next_token(h[None], logits.argmax(-1)[None])[0])             # greedy a_t, then x_{t+1}
            tail.append(x)
            if x in self.stops or c.pos1 + len(tail) >= self.limit:
                break
            h, logits = self.e.run(torch.tensor([[x]], device=h.device), c.pos1 + len(tail) - 1)
            h, logits = h[0], logits[0]
            hs.append(h)
            ls.append(logits)
        if self.kv_reuse and self.rollout_reuse and hs:
            c.cache.tail_kv = self.e.save_kv(LM, c.pos1, c.pos1 + len(hs))
            c.cache.tail_out = (torch.stack(hs), torch.stack(ls))                        # [L-1, D], [L-1, A]
        return tail, False

    def extend(self, c, k: int, ended: bool):
        """c.seg grew by the first k tokens of its rollout (MCTS-Q); ended: the rollout ended inside them."""
        c.cache.out.pop(Q, None)                     # its Q-values were for the shorter prefix
        if ended:
            c.cache.tail_kv = c.cache.tail_out = None
            c.cache.kv.pop(LM, None)
            c.cache.out.pop(LM, None)
            return
        self.inherit(c, c.cache.tail_kv, c.cache.tail_out, k, append=True)
        if self.e.loaded[LM] is c:
            self.e.loaded[LM] = None

    # -- how ------------------------------------------------------------------------------------------------------
    def inherit(self, c, tail_kv, tail_out, m: int, append: bool = False):
        """c's seg (or, append: its last m added tokens) = the first m tokens of a rollout: c's caches become views of
        the rollout's kept K/V and states (nothing is run), and the rest of them are c's rollout caches."""
        if tail_kv is None or not self.kv_reuse:
            c.cache.tail_kv = c.cache.tail_out = None
            if not append:
                c.cache.kv.pop(LM, None)
            c.cache.out.pop(LM, None)
            return
        seg_kv = [(k[:, :, :m], v[:, :, :m]) for k, v in tail_kv]
        if append:                                   # MCTS-Q's extension: the segment grows by the rollout's tokens
            have = c.cache.kv.get(LM)
            if have is None or have[0][0].shape[2] != len(c.seg) - m:
                c.cache.kv.pop(LM, None)
                c.cache.out.pop(LM, None)
                seg_kv = None
            else:
                seg_kv = [(torch.cat([k0, k], 2), torch.cat([v0, v], 2)) for (k0, v0), (k, v) in zip(have, seg_kv)]
        if seg_kv is not None:
            c.cache.kv[LM] = seg_kv
            c.cache.out[LM] = (tail_out[0][m - 1], tail_out[1][m - 1])
        c.cache.tail_kv = [(k[:, :, m:], v[:, :, m:]) for k, v in tail_kv]
        c.cache.tail_out = (tail_out[0][m:], tail_out[1][m:])

    def ensure(self, n, stack: str):
        """Compute n's output for the stack. kv_reuse: the parent's path from the caches, then only n's own tokens
        not run yet; else the whole prefix from position 0. Either way the caches then hold n's path."""
        run = self.e.run if stack == LM else self.e.run_q
        dev = self.e.lm.tok_embeddings.weight.device
        if not self.kv_reuse:
            tokens = [t for m in n.path() for t in m.seg]
            n.cache.out[stack] = self.squeeze(run(torch.tensor([tokens], device=dev), 0))
            self.e.loaded[stack] = n
            return
        have = n.cache.kv.get(stack)
        done = 0 if have is None else have[0][0].shape[2]
        if done >= len(n.seg):                       # K/V complete but no output kept: rerun the last token
            done = len(n.seg) - 1
            have = [(k[:, :, :done], v[:, :, :done]) for k, v in have] if done else None
        if n.parent is not None:
            self.ensure_path(n.parent, stack)
        if done:
            self.e.load_kv(stack, have, n.pos0)
        n.cache.out[stack] = self.squeeze(run(torch.tensor([n.seg[done:]], device=dev), n.pos0 + done))
        new = self.e.save_kv(stack, n.pos0 + done, n.pos1)
        n.cache.kv[stack] = new if have is None else [(torch.cat([k0, k], 2), torch.cat([v0, v], 2))
                                                      for (k0, v0), (k, v) in zip(have, new)]
        self.e.loaded[stack] = n

    @staticmethod
    def squeeze(out):
        return (out[0][0], out[1][0]) if isinstance(out, tuple) else out[0]

    def ensure_path(self, n, stack: str):
        """The caches hold n's whole path (every node on it computed first)."""
        if self.e.loaded[stack] is n:
            return
        for m in n.path():
            kv = m.cache.kv.get(stack)
            if stack not in m.cache.out or kv is None or kv[0][0].shape[2] != len(m.seg):
                self.ensure(m, stack)
        for m in n.path():
            self.e.load_kv(stack, m.cache.kv[stack], m.pos0)
        self.e.loaded[stack] = n

    def prepare(self, c):
        """The caches hold c's prefix and c's output is known: what a rollout from c starts from."""
        if self.kv_reuse:
            if LM not in c.cache.out:
                self.ensure(c, LM)
            self.ensure_path(c, LM)
        else:
            self.ensure(c, LM)                       # the whole prefix, from position 0
