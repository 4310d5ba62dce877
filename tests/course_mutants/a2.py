"""Assignment 2: straight-through Gumbel-softmax and the entropy regulariser."""
GS, ENT = "idm.py:gumbel_softmax_st", "idm.py:entropy_regulariser"

CORRECT = {
    GS: """
        if not tau > 0:
            raise ValueError("tau must be positive")
        logits = z.to(torch.float32)
        if u is None:
            u = torch.rand(logits.shape, generator=generator, device=z.device)
        noise = -(-u.clamp(min=torch.finfo(u.dtype).tiny).log()).log()
        perturbed = logits + noise
        y = torch.softmax(perturbed / tau, dim=-1)
        k = perturbed.argmax(dim=-1)
        hard = torch.zeros_like(y).scatter_(-1, k.unsqueeze(-1), 1.0)
        return (y + (hard - y).detach()).to(z.dtype), y, k
    """,
    ENT: """
        h = -(y * (y + 1e-8).log()).sum(dim=-1)                     # entropy per position
        if mask is not None:
            h = h[mask.bool()]
            if h.numel() == 0:
                return h.sum() * beta
        return -beta * h.mean()
    """,
}

REF_GS = """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    zf = z.float()
    if u is None:
        u = torch.rand(zf.shape, generator=generator, device=z.device)
    g = {g}
    y = F.softmax({y}, dim=-1)
    k = {k}.argmax(-1)
    onehot = F.one_hot(k, zf.shape[-1]).to(y.dtype)
    a_st = {a}
    return a_st.to(z.dtype), y, k
"""
G = "-torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))"


def gs(g=G, y="(zf + g) / tau", k="(zf + g)", a="onehot - y.detach() + y"):
    return GS, REF_GS.format(g=g, y=y, k=k, a=a)


REF_ENT = """
    neg_entropy = {term}.sum(-1)
    if mask is None:
        return {plain}
    m = mask.to(neg_entropy.dtype)
    return {masked}
"""


def ent(term="(y * torch.log(y + 1e-8))", plain="beta * neg_entropy.mean()",
        masked="beta * (neg_entropy * m).sum() / m.sum().clamp_min(1)"):
    return ENT, REF_ENT.format(term=term, plain=plain, masked=masked)


MUTANTS = {
    # the hard one-hot with no straight-through path: no gradient reaches z
    "gs_hard_without_straight_through": gs(a="onehot"),
    # the soft sample returned as the action: not one-hot forward
    "gs_soft_forward": gs(a="y"),
    # sg on the wrong term: onehot - y + sg(y) sends minus the gradient of y
    "gs_detach_wrong_term": gs(a="onehot - y + y.detach()"),
    # k taken from z alone, without the Gumbel noise: always the mode
    "gs_argmax_without_noise": gs(k="zf"),
    # Gumbel noise with the wrong sign: log(-log u)
    "gs_gumbel_sign": gs(g="torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))"),
    # exponential noise -log u instead of Gumbel
    "gs_exponential_noise": gs(g="-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny))"),
    # temperature multiplies instead of dividing
    "gs_tau_multiplies": gs(y="(zf + g) * tau"),
    # temperature on the logits only, not on the noise
    "gs_tau_on_logits_only": gs(y="zf / tau + g"),
    # no check of tau: tau = 0 divides by zero instead of raising ValueError
    "gs_no_tau_check": (GS, """
        zf = z.float()
        if u is None:
            u = torch.rand(zf.shape, generator=generator, device=z.device)
        g = -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))
        y = F.softmax((zf + g) / tau, dim=-1)
        k = (zf + g).argmax(-1)
        return (F.one_hot(k, zf.shape[-1]).to(y.dtype) - y.detach() + y).to(z.dtype), y, k
    """),
    # plus beta times the entropy: rewards collapse
    "ent_sign": ent(plain="-beta * neg_entropy.mean()", masked="-beta * (neg_entropy * m).sum() / m.sum().clamp_min(1)"),
    # y log y without the 1e-8: 0 log 0 = nan at a one-hot row
    "ent_no_eps": ent(term="(y * torch.log(y))"),
    # the mean over the K actions instead of the sum
    "ent_mean_over_actions": ent(term="(y * torch.log(y + 1e-8)).mean(-1, keepdim=True)"),
    # the mask ignored
    "ent_mask_ignored": ent(masked="beta * neg_entropy.mean()"),
    # the masked sum divided by every position, not the counted ones
    "ent_mask_divides_by_all": ent(masked="beta * (neg_entropy * m).sum() / m.numel()"),
    # the sum over positions instead of the mean
    "ent_sum_over_positions": ent(plain="beta * neg_entropy.sum()", masked="beta * (neg_entropy * m).sum()"),
}
