"""Assignment 8: the Double-DQN target, PUCT, the edge value, the backup and MCTS-Q's TD test."""
DQN, PUCT, EDGE, BACKUP, TD = ("qnet.py:double_dqn_targets", "mcts.py:puct", "mcts.py:edge_value", "mcts.py:backup",
                               "mcts.py:td_error")

CORRECT = {
    DQN: """
        B, T, _ = q_online.shape
        y = rewards.detach().float().clone()
        for t in range(T - 1):
            a = q_online[:, t + 1].detach().argmax(-1, keepdim=True)              # chosen by the online net
            v = q_target[:, t + 1].detach().float().gather(-1, a).squeeze(-1)      # scored by the target net
            y[:, t] += gamma * v * valid[:, t + 1].float()
        return y
    """,
    PUCT: """
        N_parent = n.N if n.parent is None else n.parent.N
        explore = c * n.prior * N_parent ** 0.5 / (1 + n.N)
        return n.V + explore
    """,
    EDGE: """
        return gamma * c.V + c.R - n.R
    """,
    BACKUP: """
        leaf.N = 1
        leaf.V = leaf.R
        node = leaf
        while node.parent is not None:
            node = node.parent
            node.N = node.N + 1
            w = [ch.N for ch in node.children]
            q = [edge_value(node, ch, gamma) for ch in node.children]
            node.V = sum(wi * qi for wi, qi in zip(w, q)) / sum(w)
    """,
    TD: """
        delta = q_sa - gamma * q_next_max
        return delta * delta
    """,
}

REF_DQN = """
    q_online, q_target = q_online.detach().float(), q_target.detach().float()
    a_star = {pick}.argmax(-1)
    boot = {score}.gather(-1, a_star[..., None])[..., 0]
    boot = torch.cat([boot, boot.new_zeros(boot.shape[0], 1)], 1)
    next_valid = {nv}
    return {ret}
"""


def dqn(pick="q_online[:, 1:]", score="q_target[:, 1:]",
        nv="torch.cat([valid[:, 1:], valid.new_zeros(valid.shape[0], 1)], 1)",
        ret="rewards.float() + gamma * boot * next_valid.float()"):
    return DQN, REF_DQN.format(pick=pick, score=score, nv=nv, ret=ret)


REF_BACKUP = """
    leaf.N, leaf.V = {leafN}, {leafV}
    n = leaf.parent
    while n is not None:
        n.N += 1
        n.V = {value}
        n = n.parent
"""


def backup(leafN="1", leafV="leaf.R",
           value="sum(c.N * edge_value(n, c, gamma) for c in n.children) / sum(c.N for c in n.children)"):
    return BACKUP, REF_BACKUP.format(leafN=leafN, leafV=leafV, value=value)


MUTANTS = {
    # the online net both picks and scores: vanilla DQN on the online net
    "dqn_online_scores": dqn(score="q_online[:, 1:]"),
    # vanilla DQN: max of the target net
    "dqn_target_max": (DQN, """
        q_target = q_target.detach().float()
        boot = torch.cat([q_target[:, 1:].max(-1).values, q_target.new_zeros(q_target.shape[0], 1)], 1)
        next_valid = torch.cat([valid[:, 1:], valid.new_zeros(valid.shape[0], 1)], 1)
        return rewards.float() + gamma * boot * next_valid.float()
    """),
    # the target and online roles swapped
    "dqn_roles_swapped": dqn(pick="q_target[:, 1:]", score="q_online[:, 1:]"),
    # bootstrapped from s_t, not s_{t+1}
    "dqn_no_shift": (DQN, """
        q_online, q_target = q_online.detach().float(), q_target.detach().float()
        a_star = q_online.argmax(-1)
        boot = q_target.gather(-1, a_star[..., None])[..., 0]
        next_valid = torch.cat([valid[:, 1:], valid.new_zeros(valid.shape[0], 1)], 1)
        return rewards.float() + gamma * boot * next_valid.float()
    """),
    # the terminal test reads valid_t, not valid_{t+1}
    "dqn_valid_of_current_step": dqn(nv="valid"),
    # no terminal test: bootstraps past the last action
    "dqn_no_terminal": dqn(nv="torch.ones_like(valid)"),
    # gamma discounts the reward too
    "dqn_gamma_on_reward": dqn(ret="gamma * (rewards.float() + boot * next_valid.float())"),
    # the exploration term without the + 1: N_n in the denominator
    "puct_no_plus_one": (PUCT, """
        parent_N = n.parent.N if n.parent is not None else n.N
        return n.V + c * n.prior * math.sqrt(parent_N) / max(n.N, 1)
    """),
    # the node's own N under the root, not its parent's
    "puct_own_N": (PUCT, """
        return n.V + c * n.prior * math.sqrt(n.N) / (n.N + 1)
    """),
    # N_parent without the square root
    "puct_no_sqrt": (PUCT, """
        parent_N = n.parent.N if n.parent is not None else n.N
        return n.V + c * n.prior * parent_N / (n.N + 1)
    """),
    # the root's N_parent taken as 1
    "puct_root_parent_one": (PUCT, """
        parent_N = n.parent.N if n.parent is not None else 1
        return n.V + c * n.prior * math.sqrt(parent_N) / (n.N + 1)
    """),
    # the prior left out
    "puct_no_prior": (PUCT, """
        parent_N = n.parent.N if n.parent is not None else n.N
        return n.V + c * math.sqrt(parent_N) / (n.N + 1)
    """),
    # the reward difference reversed: R_n - R_c
    "edge_reward_reversed": (EDGE, "return (n.R - c.R) + gamma * c.V"),
    # gamma discounts the reward difference too
    "edge_gamma_on_both": (EDGE, "return gamma * ((c.R - n.R) + c.V)"),
    # no discount
    "edge_no_gamma": (EDGE, "return (c.R - n.R) + c.V"),
    # the child's cumulative reward, not the step's
    "edge_cumulative_reward": (EDGE, "return c.R + gamma * c.V"),
    # a new leaf's value starts at 0, not R
    "backup_leaf_value_zero": backup(leafV="0.0"),
    # the leaf's visit left uncounted (N = 0): every weight one short
    "backup_leaf_not_counted": backup(leafN="0"),
    # the plain mean over the children, not weighted by N_c
    "backup_unweighted_mean": backup(value="sum(edge_value(n, c, gamma) for c in n.children) / len(n.children)"),
    # the best child (max), not the visit-weighted mean
    "backup_max_child": backup(value="max(edge_value(n, c, gamma) for c in n.children)"),
    # negamax: the sign flipped at each level (a two-player habit)
    "backup_negamax": backup(value="-sum(c.N * edge_value(n, c, gamma) for c in n.children) / sum(c.N for c in n.children)"),
    # stops below the root
    "backup_stops_before_root": (BACKUP, """
        leaf.N, leaf.V = 1, leaf.R
        n = leaf.parent
        while n is not None and n.parent is not None:
            n.N += 1
            n.V = sum(c.N * edge_value(n, c, gamma) for c in n.children) / sum(c.N for c in n.children)
            n = n.parent
    """),
    # |delta|, not delta squared
    "td_absolute": (TD, "return abs(q_sa - gamma * q_next_max)"),
    # no discount
    "td_no_gamma": (TD, "return (q_sa - q_next_max) ** 2"),
    # the sign inside: Q + gamma max Q'
    "td_plus": (TD, "return (q_sa + gamma * q_next_max) ** 2"),
}
