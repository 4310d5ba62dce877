"""mcts.py: tree search over CoLA's latent actions (the paper's Algorithm 3, PAPER.md §5), MCTS-Q, and the same
search over tokens as the baseline. The Q-network and its training are in qnet.py; the evaluation of every method at
matched forward-token budgets in search_eval.py; what a search keeps and reuses in infra/treecache.py.

With the paper's symbols:
  MCTS        a node is a text prefix. Its children are the policy's top-b actions (b 5 at the root, 4 below), each
              followed by the world model's greedy token x = argmax p_WM(. | x_{1:t}, a). A new child's value is the
              reward R of a greedy CoLA rollout from it (argmax pi, argmax p_WM, to the end), scored by the checker.
              Backup: Q(n, c) = (R_c - R_n) + gamma V_c; V_n = sum_c N_c Q(n, c) / sum_c N_c; a leaf has V = R.
              Selection: PUCT score V_n + c p_n sqrt(N_parent) / (N_n + 1), c = 0.7, over all open nodes (below).
              N rounds, one new child each. Answer: the node (with its rollout) of highest reward, a terminal node
              first on ties: "the best terminal node, else the best rollout".
  MCTS-Q      when a new child's TD error (Q(s, a) - gamma max_a' Q(s', a'))^2 (s the parent's prefix, s' the
              child's; the reward inside an episode is 0) is below 0.01, the Q-function is trusted there and the
              child is extended by up to k = 64 tokens of plain (greedy) CoLA generation at once.
  token MCTS  the same search on a plain Llama: children are the LM's top-b tokens (prior = their probability),
              rollouts are greedy token decoding. With a token-level Q-network it becomes token MCTS-Q.
  Cost        every forward is counted (infra/treecache.Cost): token positions through each Llama trunk (the base of
              CoLA / the LM, and the Q-network's) are the budget; CoLA's policy positions and merge + W_lm rows are
              reported beside.

Selection rule: the release's global best-first scan (every node that still has an untried candidate competes on
its own PUCT score) is the default; `--select descent` is the textbook root-to-leaf PUCT walk. Why best-first: a
descent fills every node on its path (b = 4-5 children) before it goes below it, so where pi spreads over several
tokens 64 rounds stay ~3 tokens deep; the global scan can keep extending the one deep prefix whose rollout scored
well, which is where Countdown's answer is written. It is also what the authors ran (docs/rl-and-search.md).
A round is one expansion, free ones included: a child on its parent's greedy rollout costs no forward token once
rollouts are reused, so search_eval.py ends searches by forward-token budget, not by rounds.

Run it (CPU, tiny preset; checkpoints from `python train.py --stage fta-i` / `--stage sft`, Q-networks from qnet.py):
    python mcts.py --ckpt runs/fta-i/final --task countdown-2 --n-rounds 64 --show-tree
    python mcts.py --ckpt runs/fta-i/final --qnet runs/q-latent/final --task countdown-2        # MCTS-Q
    python mcts.py --ckpt runs/sft/final --task countdown-2                                     # token-level MCTS
    python mcts.py --ckpt DIR --data test.jsonl --index 3 [--chat]     # problem 3 of a math file (tasks.py)
    python mcts.py --help                                                                       # every flag
    python -m pytest -q tests/test_mcts.py

Deviations from the paper / official code:
  - Tasks: Countdown (the tiny preset's countdown-2) instead of MATH-500; its checker needs no hidden answer, so the
    search may score rollouts with it (a math problem from --data is scored against its gold answer: an oracle), and every method stops once a completion scores 1.0 (--no-stop-at-success
    turns that off; it changes cost, not success);
  - children are deduplicated by token: two of the top-b actions whose greedy tokens coincide make one child (the
    same text prefix), whose prior is the sum of their probabilities and whose action is the more probable one;
    a node can then have fewer than b children; the prior p is pi's probability of the action(s);
  - MCTS-Q's extension is greedy CoLA generation (argmax pi), the node's own greedy rollout, so the search stays
    deterministic and the extension costs nothing when rollouts are reused; the paper says "plain generation";
  - the release's own tree rules are flags, off by default because every search number in docs/rl-and-search.md
    was measured without them (turning them on is a re-measurement): --fill (a round gives the selected node all
    its b children, so the release's T = 64 rounds are up to 64 x b children; by default one child per round),
    --answer release (the terminal node of highest V when its R is at least the best R; by default the highest R,
    a terminal node first on ties), --stop-at-eos (stop at the first child that ends the response);
  - an extended node keeps the prior of its first action (the release: the mean probability over the node's
    actions): the extension's later actions are argmax pi, whose probabilities the search does not keep.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import cola
import data
from infra import checkpoint, parallel
from infra.treecache import Engine, NodeCache, TreeCache
from infra.trainer import SEED, arg, one_line_errors, parse_config
from model import clip_new_tokens
from qnet import QNetwork, check_qnet
import tasks
from tokenizer import Tokenizer

SELECTS = ("best-first", "descent")
ANSWERS = ("best-rollout", "release")

# ----------------------------------------------------------------------------------------------------------------
# The tree: nodes, PUCT, the backup, selection, the TD error (Algorithm 3)


@dataclass(eq=False)
class Node:
    """A text prefix: its parent's prefix + seg (the root's seg is the prompt), and the statistics of Algorithm 3."""
    seg: list[int]                       # tokens this node adds (1; more after an MCTS-Q extension; root: the prompt)
    parent: "Node | None" = None
    action: int = -1                     # the latent action (or token) that made it
    prior: float = 1.0                   # p: pi's (or the LM's) probability of that step
    pos0: int = 0                        # position of seg[0]
    index: int = 0                       # creation order (ties go to the older node)
    children: list = field(default_factory=list)
    cands: list | None = None            # [(token, action, prior)]: the top-b candidates, best first
    N: int = 0                           # visits: 1 + the nodes below
    V: float = 0.0                       # value (backup below)
    R: float = 0.0                       # reward of its greedy rollout (of itself when terminal)
    terminal: bool = False
    extended: int = 0                    # MCTS-Q: tokens the extension added to seg
    td: float | None = None              # MCTS-Q: (Q(s, a) - gamma max Q(s', .))^2 when tested
    tail: list[int] = field(default_factory=list)   # the greedy rollout's tokens after the prefix
    cache: NodeCache = field(default_factory=NodeCache)   # K/V and outputs kept for reuse (infra/treecache.py)

    @property
    def pos1(self) -> int:
        return self.pos0 + len(self.seg)

    @property
    def full(self) -> bool:
        return self.cands is not None and len(self.children) >= len(self.cands)

    def path(self) -> list["Node"]:
        n, out = self, []
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def response(self) -> list[int]:
        """The tokens after the prompt, up to this node (the root's seg is the prompt)."""
        return [t for n in self.path()[1:] for t in n.seg]


def puct(n: Node, c: float) -> float:
    """Eq: V_n + c p_n sqrt(N_parent) / (N_n + 1) (the root: p = 1, N_parent = its own N)."""
    parent_N = n.parent.N if n.parent is not None else n.N
    return n.V + c * n.prior * math.sqrt(parent_N) / (n.N + 1)


def edge_value(n: Node, c: Node, gamma: float) -> float:
    """Eq: Q(n, c) = (R_c - R_n) + gamma V_c."""
    return (c.R - n.R) + gamma * c.V


def backup(leaf: Node, gamma: float):
    """A new leaf: N = 1, V = R. Every ancestor: N += 1 and V_n = sum_c N_c Q(n, c) / sum_c N_c."""
    leaf.N, leaf.V = 1, leaf.R
    n = leaf.parent
    while n is not None:
        n.N += 1
        n.V = sum(c.N * edge_value(n, c, gamma) for c in n.children) / sum(c.N for c in n.children)
        n = n.parent


def exhausted(n: Node) -> bool:
    """Nothing left to expand below n: every node under it is terminal or full. Iterative: a latent tree is often one
    long chain (thousands of nodes at --max-new-tokens ~1000), deeper than Python's recursion limit."""
    stack = [n]
    while stack:
        m = stack.pop()
        if m.terminal:
            continue
        if not m.full:
            return False
        stack.extend(m.children)
    return True


def select_best_first(nodes: list[Node], c: float) -> Node | None:
    """The release's rule: of all open nodes (not terminal, an untried candidate left), the best PUCT score."""
    open_ = [n for n in nodes if not n.terminal and not n.full]
    return max(open_, key=lambda n: (puct(n, c), -n.index)) if open_ else None


def select_descent(root: Node, c: float) -> Node | None:
    """Root-to-leaf PUCT: from the root, the best-scoring child with something left below, until an open node."""
    n = root
    while not exhausted(n):
        if not n.full:
            return n
        n = max((k for k in n.children if not exhausted(k)), key=lambda k: (puct(k, c), -k.index))
    return None


def td_error(q_sa: float, q_next_max: float, gamma: float) -> float:
    """Eq: delta = (Q(s, a) - gamma max_a' Q(s', a'))^2, the reward inside an episode being 0."""
    return (q_sa - gamma * q_next_max) ** 2


@dataclass
class SearchArgs:
    """MCTS over latent actions (Algorithm 3), MCTS-Q with --qnet, token-level MCTS on a plain Llama --ckpt."""
    ckpt: str = arg("", "CoLA checkpoint (latent search) or a plain Llama (token-level search)")
    qnet: str = arg("", "a qnet.py export of the same level: MCTS becomes MCTS-Q")
    task: str = arg("countdown-2", "countdown, arith, countdown-2 or countdown-3 (tasks.py)")
    problem: str = arg("", "a problem as JSON with tasks.Problem's fields (kind, prompt, answer, meta); default: "
                           "held-out problem --index")
    index: int = arg(0, "which held-out problem (val split of the rl stream of --seed), or with --data which "
                        "problem of the file (0: its first)", ">= 0, < 10000")
    data: str = arg("", "math problems (.jsonl: MATH, GSM8K or prompt/answer layout): search problem --index of it "
                        "instead of a --task problem")
    chat: bool = arg(False, "render the prompt with the Llama-3.1 chat template (as rl.py --chat)")
    n_rounds: int = arg(64, "N, rounds (one new child each, or b with --fill; paper: 64)", ">= 1")
    budget: int = arg(0, "also stop once this many forward tokens are spent (0: no limit)", ">= 0")
    b_root: int = arg(5, "b at the root: children per node (release: larger at the root)", ">= 1")
    b: int = arg(4, "b below the root", ">= 1")
    c_puct: float = arg(0.7, "c of PUCT (paper: 0.7)", ">= 0")
    gamma: float = arg(0.99, "gamma of the backup and of the TD test (paper: 0.99)", "> 0, <= 1")
    td_threshold: float = arg(0.01, "MCTS-Q: extend a node when its TD error is below this (paper: 0.01)", "> 0")
    extend_tokens: int = arg(64, "k, MCTS-Q: tokens of plain generation a trusted node is extended by (paper: 64)",
                             ">= 1")
    select: str = arg("best-first", "best-first (the release: global scan of every open node) or descent "
                                    "(root-to-leaf PUCT)")
    fill: bool = arg(False, "a round gives the selected node all its untried children, each evaluated and backed up "
                            "(the release); off: one new child per round")
    answer: str = arg("best-rollout", "best-rollout: the node of highest R, terminal first on ties; release: the "
                                      "terminal node of highest V when its R is at least the best R, else the best "
                                      "rollout")
    stop_at_eos: bool = arg(False, "stop the search at the first new child whose token ends the response (the "
                                   "release)")
    max_new_tokens: int = arg(160, "longest response, tokens", ">= 1")
    stop_at_success: bool = arg(True, "stop once a completion scores 1.0 (the checker's full reward)")
    kv_reuse: bool = arg(True, "keep each node's K/V and last state (off: every node reruns its whole prefix)")
    rollout_reuse: bool = arg(True, "a child on its parent's greedy rollout inherits the rest of it")
    show_tree: bool = arg(False, "print the tree: actions, tokens, visits, values, rewards")
    tokenizer: str = arg("", "tokenizer file (default: found in --ckpt, else the embedded one)")
    device: str = arg("", "cpu or cuda (default: cuda if available)")
    seed: int = arg(0, "seed of the held-out problems", SEED)


@dataclass
class Answer:
    node: Node
    tokens: list[int]                    # the whole response: node.response() + node.tail
    text: str
    reward: float


class Search:
    """One tree for one problem (Algorithm 3). run() -> Answer; .nodes, .trace [(forward tokens so far, R, FLOPs so
    far)] per evaluated node (anytime: the answer within a budget B is the best R with cost <= B), .stats."""

    def __init__(self, engine: Engine, tok: Tokenizer, problem: tasks.Problem, prompt: list[int], cfg: SearchArgs):
        self.e, self.tok, self.problem, self.cfg = engine, tok, problem, cfg
        self.stops = set(tok.stop_tokens)
        self.limit = min(len(prompt) + cfg.max_new_tokens, engine.max_len)
        self.cache = TreeCache(engine, self.limit, self.stops, cfg.kv_reuse, cfg.rollout_reuse)
        self.root = Node(seg=list(prompt))
        self.nodes = [self.root]
        self.trace: list[tuple[int, float, int]] = []
        self.stats = {"rounds": 0, "rollouts": 0, "inherited": 0, "td_tests": 0, "td_fired": 0, "extended_tokens": 0}

    # -- the loop ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, n_rounds: int | None = None, budget: int | None = None) -> Answer:
        n_rounds = self.cfg.n_rounds if n_rounds is None else n_rounds
        budget = budget if budget is not None else (self.cfg.budget or None)
        self.e.setup(1)
        try:
            self.evaluate(self.root)
            backup(self.root, self.cfg.gamma)
            self.mark(self.root)
            for _ in range(n_rounds):
                if self.done(budget):
                    break
                n = (select_best_first(self.nodes, self.cfg.c_puct) if self.cfg.select == "best-first"
                     else select_descent(self.root, self.cfg.c_puct))
                if n is None:
                    self.stats["stopped"] = "exhausted"      # every node is terminal or has all its children
                    break
                while True:                                  # one child, or (--fill) every untried child of n
                    c = self.expand(n)
                    self.evaluate(c)
                    self.td_test(c)
                    backup(c, self.cfg.gamma)
                    self.mark(c)
                    eos = self.cfg.stop_at_eos and c.seg[0] in self.stops
                    if eos or not self.cfg.fill or n.full or self.done(budget):
                        break
                self.stats["rounds"] += 1
                if eos:
                    self.stats["stopped"] = "eos"
                    break
            else:                                            # the rounds ran out, unless the last one ended it anyway
                if not self.done(budget):
                    self.stats["stopped"] = "rounds"
        finally:
            self.e.clear()
        return self.answer()

    def done(self, budget: int | None) -> bool:
        """Whether the budget is spent or (--stop-at-success) a completion scored 1.0; records which in stats."""
        if budget is not None and self.e.cost.total >= budget:
            self.stats["stopped"] = "budget"
        elif self.cfg.stop_at_success and max(t[1] for t in self.trace) >= 1.0:
            self.stats["stopped"] = "success"
        else:
            return False
        return True

    def mark(self, n: Node):
        """The trace's entry for a node just evaluated: what the search has run so far, and the node's R."""
        self.trace.append((self.e.cost.total, n.R, self.e.cost.flops(self.e.rates)))

    def answer(self) -> Answer:
        """The best terminal node, else the best rollout: highest R, terminal first, then the older node. --answer
        release: the terminal node of highest V (then the older) when its R is at least the best R."""
        best = max(self.nodes, key=lambda n: (n.R, n.terminal, -n.index))
        terminal = [n for n in self.nodes if n.terminal]
        if self.cfg.answer == "release" and terminal:
            valued = max(terminal, key=lambda n: (n.V, -n.index))
            best = valued if valued.R >= best.R else best
        tokens = best.response() + best.tail
        return Answer(best, tokens, self.text(tokens), best.R)

    def text(self, tokens: list[int]) -> str:
        return self.tok.decode([t for t in tokens if t not in self.stops])

    # -- expansion -----------------------------------------------------------------------------------------------
    def candidates(self, n: Node) -> list[tuple[int, int, float]]:
        """The top-b actions of pi at n, each with the world model's greedy token; actions whose tokens coincide
        make one candidate (prior summed). Token level: the LM's top-b tokens."""
        h, logits = self.cache.state(n)                                                  # [D], [A]
        p = logits.softmax(-1)                                                           # [A]
        b = self.cfg.b_root if n.parent is None else self.cfg.b
        top = p.topk(min(b, p.shape[0]))                                                 # [b]
        toks = self.e.next_token(h[None].expand(len(top.indices), -1), top.indices).tolist()   # [b]
        merged: dict[int, list] = {}
        for t, a, q in zip(toks, top.indices.tolist(), top.values.tolist()):
            if t in merged:
                merged[t][1] += q
            else:
                merged[t] = [a, q]
        return sorted(((t, a, q) for t, (a, q) in merged.items()), key=lambda x: -x[2])

    def expand(self, n: Node) -> Node:
        """n's next untried candidate as a new child."""
        if n.cands is None:
            n.cands = self.candidates(n)
        t, a, q = n.cands[len(n.children)]
        c = Node(seg=[t], parent=n, action=a, prior=q, pos0=n.pos1, index=len(self.nodes))
        c.terminal = t in self.stops or c.pos1 >= self.limit
        n.children.append(c)
        self.nodes.append(c)
        return c

    # -- evaluation: the greedy rollout's reward -----------------------------------------------------------------
    def reward(self, tokens: list[int]) -> float:
        return tasks.score(self.problem, self.text(tokens))

    def evaluate(self, c: Node):
        """R_c: the node's own text when terminal; else the checker's reward of its greedy rollout (inherited from
        the parent's when the node lies on it: greedy decoding depends only on the prefix)."""
        if c.terminal:
            c.R, c.tail = self.reward(c.response()), []
            return
        c.tail, inherited = self.cache.rollout(c)
        c.R = c.parent.R if inherited else self.reward(c.response() + c.tail)
        self.stats["inherited" if inherited else "rollouts"] += 1

    # -- MCTS-Q --------------------------------------------------------------------------------------------------
    def td_test(self, c: Node):
        """MCTS-Q: delta = (Q(s, a) - gamma max Q(s', .))^2 for the new child; delta < threshold: Q is trusted there,
        and the child is extended by up to k tokens of its greedy rollout (a terminal node when the rollout ends
        within them)."""
        if self.e.qnet is None or c.terminal:
            return
        q_s, q_next = self.cache.state(c.parent, "q"), self.cache.state(c, "q")         # [A] Q(s, .), Q(s', .)
        c.td = td_error(q_s[c.action].item(), q_next.max().item(), self.cfg.gamma)
        self.stats["td_tests"] += 1
        if c.td >= self.cfg.td_threshold:
            return
        self.stats["td_fired"] += 1
        k, tail = min(self.cfg.extend_tokens, len(c.tail)), c.tail
        c.seg, c.tail, c.extended = c.seg + tail[:k], tail[k:], k
        self.stats["extended_tokens"] += k
        c.terminal = k == len(tail) or c.pos1 >= self.limit
        self.cache.extend(c, k, ended=k == len(tail))

    # -- printing ------------------------------------------------------------------------------------------------
    def show(self, max_chars: int = 60) -> str:
        """The tree as text: per node its action, its tokens, N, V, R, the prior and its rollout's start."""
        lines, stack = [], [(self.root, 0)]
        while stack:                                 # depth first, children in order (iterative, as exhausted)
            n, depth = stack.pop()
            pad = "  " * depth
            if n.parent is None:
                head = f"root ({len(n.seg)} prompt tokens)"
            else:
                what = f"a={n.action}" if self.e.level == "latent" else "token"
                head = f"{what} p={n.prior:.2f} {self.text(n.seg)!r}"
                if n.extended:
                    head += f" (MCTS-Q: +{n.extended} tokens, td {n.td:.4f})"
                elif n.td is not None:
                    head += f" (td {n.td:.4f})"
            end = "terminal" if n.terminal else f"rollout {self.text(n.tail)[:max_chars]!r}"
            lines.append(f"{pad}#{n.index} {head}  N={n.N} V={n.V:.3f} R={n.R:.2f}  {end}")
            stack.extend((k, depth + 1) for k in reversed(n.children))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# One problem, printed


def parse_search_args(argv: list[str]) -> SearchArgs:
    cfg, given = parse_config(SearchArgs, argv, "mcts.py", {})
    for name, needs in (("td_threshold", "qnet"), ("extend_tokens", "qnet"), ("index", "")):   # else ignored
        if name in given and (not cfg.qnet if needs else cfg.problem):
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag} is for MCTS-Q; it needs --qnet DIR" if needs else
                             f"{flag} picks a held-out problem; --problem gives one already: pass only one of them")
    for flag in ("task", "problem"):
        if flag in given and cfg.data:
            raise SystemExit(f"--{flag} and --data: pass one (--data --index N searches the file's problem N)")
    for name, value, allowed in (("task", cfg.task, tasks.TASKS), ("select", cfg.select, SELECTS),
                                 ("answer", cfg.answer, ANSWERS)):
        if value not in allowed:
            raise SystemExit(f"--{name} {value!r}: expected one of {', '.join(allowed)}")
    if not cfg.ckpt:
        raise SystemExit("--ckpt: required (a CoLA export for latent search, a plain Llama for token search)")
    if not Path(cfg.ckpt).is_dir():
        raise SystemExit(f"--ckpt {cfg.ckpt}: directory not found")
    cfg.max_new_tokens = clip_new_tokens(cfg.max_new_tokens, cfg.ckpt, "--ckpt")
    return cfg


def load_problem(cfg) -> tasks.Problem:
    if cfg.data:
        problems = tasks.read_problems(cfg.data, "--data")
        if cfg.index >= len(problems):
            raise SystemExit(f"--index {cfg.index}: --data {cfg.data} has {len(problems)} problems (0 to "
                             f"{len(problems) - 1})")
        return problems[cfg.index]
    if not cfg.problem:
        return tasks.make_problems(cfg.task, cfg.index + 1, cfg.seed, split="val", stream="rl")[cfg.index]
    try:
        d = json.loads(cfg.problem)
        p = tasks.Problem.from_dict(d)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--problem: not a JSON problem with kind, prompt, answer (and meta): {e}") from None
    if p.kind not in tasks.KINDS:
        raise SystemExit(f"--problem: kind {p.kind!r} is not one of {', '.join(tasks.KINDS)}")
    try:
        tasks.score(p, "")                           # the checker reads answer and meta: missing fields fail here
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SystemExit(f"--problem: the {p.kind} checker cannot read it ({type(e).__name__}: {e}); a {p.kind} "
                         f"problem as tasks.make_problems writes it is expected (python data.py sample)") from None
    return p


def encode_prompt(tok: Tokenizer, problem: tasks.Problem, context: int, ckpt: str, chat: bool = False) -> list[int]:
    prompt = data.encode_problem(tok, problem, chat)
    if len(prompt) >= context:
        raise SystemExit(f"prompt of {len(prompt)} tokens leaves no room in the context of {context} tokens of "
                         f"--ckpt {ckpt}; shorten it")
    return prompt


def level_of(path: str, flag: str = "--ckpt") -> str:
    """latent for a CoLA checkpoint, token for a plain Llama (read from its config.json alone)."""
    kind = checkpoint.kind_of(path, flag)
    if kind == "qnet":
        raise SystemExit(f"{flag} {path} is a Q-network, not a model to search with (pass it as --qnet)")
    return "latent" if kind == "cola" else "token"


def search_main(argv: list[str]):
    cfg = parse_search_args(argv)
    problem = load_problem(cfg)                      # a bad --problem / --data fails before anything loads
    device = parallel.device_of(cfg.device)
    level = level_of(cfg.ckpt)
    tok = Tokenizer.find(cfg.ckpt, cfg.tokenizer or None)
    model = cola.load_level(cfg.ckpt, level, "--ckpt", device, tok=tok).eval().requires_grad_(False)
    qnet = None
    if cfg.qnet:
        qnet = QNetwork.from_pretrained(cfg.qnet, device)
        check_qnet(qnet, cfg.qnet, level, model, cfg.ckpt)
    engine = Engine(model, level, qnet)
    prompt = encode_prompt(tok, problem, engine.max_len, cfg.ckpt, cfg.chat)
    t0 = time.time()
    search = Search(engine, tok, problem, prompt, cfg)
    ans = search.run()
    wall = time.time() - t0
    name = {"latent": "MCTS-Q" if qnet else "MCTS (latent actions)", "token": "token MCTS-Q" if qnet else
            "token-level MCTS"}[level]
    print(problem.prompt.rstrip())
    if cfg.show_tree:
        print(search.show())
    c = engine.cost
    print(f"{name}: {search.stats['rounds']} rounds, {len(search.nodes)} nodes, forward tokens {c.total} "
          f"(base {c.base}, Q {c.q}; policy positions {c.policy}, world-model rows {c.wm}), {wall:.1f} s; "
          f"rollouts run {search.stats['rollouts']}, inherited {search.stats['inherited']}"
          + (f"; TD tests {search.stats['td_tests']}, fired {search.stats['td_fired']}" if qnet else ""))
    print({"rounds": f"stopped after --n-rounds {cfg.n_rounds}", "budget": f"stopped at --budget {cfg.budget}",
           "success": "stopped at a completion scoring 1.0 (--stop-at-success)",
           "eos": "stopped at the first child that ends the response (--stop-at-eos)",
           "exhausted": f"tree exhausted after {search.stats['rounds']} of --n-rounds {cfg.n_rounds}: every node is "
                        f"terminal or has all its b children"}[search.stats["stopped"]])
    print(f"answer (node #{ans.node.index}{', terminal' if ans.node.terminal else ', with its rollout'}), reward "
          f"{ans.reward}:\n{ans.text}")
    return search, ans


# ----------------------------------------------------------------------------------------------------------------
# Command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["search"]:                       # the subcommand of earlier releases
        argv = argv[1:]
    moved = {"train-q": "python qnet.py", "eval": "python search_eval.py"}
    if argv[:1] and argv[0] in moved:
        raise SystemExit(f"mcts.py {argv[0]} is now its own script: {moved[argv[0]]} [flags]")
    return one_line_errors(search_main, argv)


if __name__ == "__main__":
    main()
