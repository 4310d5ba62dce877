"""Assignment 4: Stage A's loss, codebook usage, and the VQ ablation."""
PRE, USE, NEAR, VQ = "train.py:pretrain_loss", "idm.py:codebook_usage", "cola.py:nearest_code", "train.py:vq_pretrain_loss"

CORRECT = {
    PRE: """
        tokens, mask = b.tokens, b.mask
        with torch.no_grad():
            states = model.hidden(tokens)
        logits = model.idm_logits(states)[:, 1:]                     # a_t read at t + 1
        noise = row_uniforms(b.ids, logits.shape[1:], seed, logits.device)
        a_st, y, k = gumbel_softmax_st(logits, tau, u=noise)
        ce = model.base.output.loss(model.world_state(states[:, :-1], a_st), tokens[:, 1:], mask[:, 1:])
        reg = beta * (y * (y + 1e-8).log()).sum(-1).mean()
        stats = codebook_stats(k, model.args.n_actions)
        return ce + reg, {"ce": ce.detach(), "reg": reg.detach(), "alive": stats["alive"], "top": stats["top_share"]}
    """,
    USE: """
        counts = torch.bincount(k.flatten().long(), minlength=K).double()
        p = counts / max(counts.sum().item(), 1)
        nz = p[p > 0]
        return {"alive": int((counts > 0).sum().item()), "top_share": float(p.max()),
                "perplexity": math.exp(-(nz * nz.log()).sum().item())}
    """,
    NEAR: """
        d2 = ((z_e.unsqueeze(-1) - C) ** 2).sum(-2)                 # [B, T, K]
        return d2.argmin(-1)
    """,
    VQ: """
        with torch.no_grad():
            h = model.hidden(b.tokens)
        z_e = model.idm_logits(h)[:, 1:].float()
        codes = model.codebook.weight.float().t()                   # [K, D], row k = e_k
        k = nearest_code(z_e, codes.t())
        e = F.embedding(k, codes)
        z_q = e.detach() + z_e - z_e.detach()                      # value e, gradient to z_e
        ce = model.base.output.loss(model.world_state_from_code(h[:, :-1], z_q), b.tokens[:, 1:], b.mask[:, 1:])
        codebook_term = ((e - z_e.detach()) ** 2).mean()
        commit_term = ((z_e - e.detach()) ** 2).mean()
        vq = codebook_term + commitment * commit_term
        usage = codebook_stats(k, model.args.n_actions)
        return ce + vq, {"ce": ce.detach(), "vq": vq.detach(), "alive": usage["alive"], "top": usage["top_share"]}
    """,
}

REF_PRE = """
    x = b.tokens
    {nograd}
        h = model.hidden(x)
    z = model.idm_logits(h){look}
    u = row_uniforms(b.ids, z.shape[1:], seed, z.device)
    a_st, y, k = gumbel_softmax_st(z, tau, {u})
    s2 = model.world_state(h[:, :-1], {act})
    ce = model.base.output.loss(s2, x[:, 1:], {mask})
    reg = entropy_regulariser(y, beta)
    usage = codebook_stats(k, model.args.n_actions)
    return {total}, {{"ce": ce.detach(), "reg": reg.detach(), "alive": usage["alive"], "top": usage["top_share"]}}
"""


def pre(nograd="with torch.no_grad():", look="[:, 1:]", u="u=u", act="a_st", mask="b.mask[:, 1:]", total="ce + reg"):
    return PRE, REF_PRE.format(nograd=nograd, look=look, u=u, act=act, mask=mask, total=total)


REF_VQ = """
    x = b.tokens
    with torch.no_grad():
        h = model.hidden(x)
    z_e = model.idm_logits(h){look}.float()
    C = model.codebook.weight.float()
    k = nearest_code(z_e, C)
    e = F.embedding(k, C.t())
    z_q = {zq}
    s2 = model.world_state_from_code(h[:, :-1], z_q)
    ce = model.base.output.loss(s2, x[:, 1:], b.mask[:, 1:])
    vq = {vq}
    usage = codebook_stats(k, model.args.n_actions)
    return ce + vq, {{"ce": ce.detach(), "vq": vq.detach(), "alive": usage["alive"], "top": usage["top_share"]}}
"""


def vq(look="[:, 1:]", zq="z_e + (e - z_e).detach()",
       vq="F.mse_loss(e, z_e.detach()) + commitment * F.mse_loss(z_e, e.detach())"):
    return VQ, REF_VQ.format(look=look, zq=zq, vq=vq)


MUTANTS = {
    # no look-ahead: a_t read from the IDM at t, which has not seen x_{t+1}
    "pre_no_lookahead": pre(look="[:, :-1]"),
    # the hard action k in the world model: no straight-through path, the IDM learns only from the regulariser
    "pre_hard_action": pre(act="k"),
    # the soft sample y in the world model: not one-hot forward
    "pre_soft_action": pre(act="y"),
    # the regulariser subtracted: maximises collapse
    "pre_regulariser_sign": pre(total="ce - reg"),
    # fresh noise instead of each row's seeded noise
    "pre_unseeded_noise": pre(u="generator=torch.Generator().manual_seed(seed)"),
    # h computed with gradient: the frozen base's blocks receive gradient
    "pre_base_not_frozen": pre(nograd="if True:"),
    # every target counted, prompt and padding included
    "pre_mask_ignored": pre(mask="torch.ones_like(b.mask[:, 1:])"),
    # the count of the top code, not its share
    "usage_top_count": (USE, """
        s = codebook_stats(k, K)
        return {"alive": int(s["alive"]), "top_share": float(s["top_share"]) * k.numel(),
                "perplexity": float(s["perplexity"])}
    """),
    # perplexity as 2 ** (entropy in nats)
    "usage_perplexity_base_2": (USE, """
        s = codebook_stats(k, K)
        return {"alive": int(s["alive"]), "top_share": float(s["top_share"]),
                "perplexity": 2 ** math.log(float(s["perplexity"]))}
    """),
    # alive counted over the K codes' share > 1/K (more than uniform), not >= 1 use
    "usage_alive_above_uniform": (USE, """
        counts = torch.bincount(k.flatten(), minlength=K).double()
        p = counts / counts.sum()
        s = codebook_stats(k, K)
        return {"alive": int((p > 1 / K).sum()), "top_share": float(s["top_share"]),
                "perplexity": float(s["perplexity"])}
    """),
    # argmax of the distance
    "near_argmax": (NEAR, """
        dist = z_e.pow(2).sum(-1, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(0)
        return dist.argmax(-1)
    """),
    # the largest dot product: ||C_k||^2 dropped
    "near_dot_product": (NEAR, """
        return (z_e @ C).argmax(-1)
    """),
    # ||C_k||^2 summed over the wrong axis of C: one number per dimension, broadcast as if per code
    "near_code_norm_axis": (NEAR, """
        dist = z_e.pow(2).sum(-1, keepdim=True) - 2 * z_e @ C + C.pow(2).sum(1, keepdim=True).t()[..., :C.shape[1]]
        return dist.argmin(-1)
    """),
    # no straight-through: the CE never reaches the encoder
    "vq_no_straight_through": vq(zq="e"),
    # the codebook and commitment terms swapped
    "vq_terms_swapped": vq(vq="commitment * F.mse_loss(e, z_e.detach()) + F.mse_loss(z_e, e.detach())"),
    # neither term detached
    "vq_no_stop_gradients": vq(vq="(1 + commitment) * F.mse_loss(z_e, e)"),
    # no look-ahead
    "vq_no_lookahead": vq(look="[:, :-1]"),
}
