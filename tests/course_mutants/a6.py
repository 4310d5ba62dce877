"""Assignment 6: the token loss, its chunked backward, FTA-I and FTA-P."""
MCE, BWD, BASE, FTAI, FTAP = ("infra/ce.py:masked_ce", "infra/ce.py:ChunkedCE.backward", "train.py:base_loss",
                              "train.py:fta_i_loss", "train.py:fta_p_loss")

CORRECT = {
    MCE: """
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)           # [B, T]
        keep = mask.float()
        n = keep.sum()
        return (nll * keep).sum() / torch.where(n > 0, n, torch.ones_like(n))
    """,
    BWD: """
        s, w, y, m, lse, denom = ctx.saved_tensors
        want_s, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ds_parts, dw = [], torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for lo in range(0, s.shape[0], ctx.chunk):
            hi = min(lo + ctx.chunk, s.shape[0])
            p = torch.softmax((s[lo:hi] @ w.t()).float(), dim=-1)
            p[torch.arange(hi - lo, device=p.device), y[lo:hi]] -= 1.0
            dz = (p * (m[lo:hi] * g / denom)[:, None]).to(s.dtype)
            ds_parts.append(dz @ w)
            dw += dz.t() @ s[lo:hi]
        ds = torch.cat(ds_parts) if want_s else None
        return ds, dw.to(w.dtype) if want_w else None, None, None, None
    """,
    BASE: """
        inp, tgt, counted = b.tokens[:, :-1], b.tokens[:, 1:], b.mask[:, 1:]
        ce = model.output.loss(model.hidden(inp), tgt, counted)
        return ce, {"ce": ce.detach()}
    """,
    FTAI: """
        h = model.hidden(b.tokens)
        with torch.no_grad():
            k = model.idm_logits(h.detach())[:, 1:].argmax(-1)
        ce = model.base.output.loss(model.world_state(h[:, :-1], k), b.tokens[:, 1:], b.mask[:, 1:])
        return ce, {"ce": ce.detach()}
    """,
    FTAP: """
        h = model.hidden(b.tokens)
        ctx = h[:, :-1]
        with torch.no_grad():
            greedy = torch.argmax(model.policy_logits(ctx.detach()), dim=-1)
        state = model.world_state(ctx, greedy, base_grad=base_grad)
        ce = model.base.output.loss(state, b.tokens[:, 1:], b.mask[:, 1:])
        return ce, {"ce": ce.detach()}
    """,
}

REF_MCE = """
    ce = F.cross_entropy(logits.flatten(0, 1){f}, targets.flatten(), reduction="none")
    m = mask.flatten().float()
    return {ret}
"""


def mce(f=".float()", ret="(ce * m).sum() / m.sum().clamp(min=1)"):
    return MCE, REF_MCE.format(f=f, ret=ret)


REF_BWD = """
    s, w, y, m, lse, denom = ctx.saved_tensors
    scale = {scale}
    ds = torch.empty_like(s) if ctx.needs_input_grad[0] else None
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if ctx.needs_input_grad[1] else None
    for i in range(0, len(s), ctx.chunk):
        sc = s[i:i + ctx.chunk]
        dz = {softmax}
        {onehot}
        dz = (dz * scale[i:i + ctx.chunk, None]).to(s.dtype)
        if ds is not None:
            ds[i:i + ctx.chunk] = dz @ w
        if dw is not None:
            {dw}
    return ds, None if dw is None else dw.to(w.dtype), None, None, None
"""


def bwd(scale="m * (g / denom)", softmax="torch.exp((sc @ w.t()).float() - lse[i:i + ctx.chunk, None])",
        onehot="dz.scatter_add_(1, y[i:i + ctx.chunk, None], -torch.ones_like(dz[:, :1]))", dw="dw += dz.t() @ sc"):
    return BWD, REF_BWD.format(scale=scale, softmax=softmax, onehot=onehot, dw=dw)


REF_FTA = """
    x = b.tokens
    h = model.hidden(x){hd}
    with torch.no_grad():
        a = {act}
    loss = model.base.output.loss(model.world_state(h[:, :-1], a{side}), x[:, 1:], b.mask[:, 1:])
    return loss, {{"ce": loss.detach()}}
"""


def fta_i(hd="", act="model.idm_labels(h)"):
    return FTAI, REF_FTA.format(hd=hd, act=act, side="")


def fta_p(hd="", act="model.policy_logits(h[:, :-1]).argmax(-1)", side=", base_grad"):
    return FTAP, REF_FTA.format(hd=hd, act=act, side=side)


MUTANTS = {
    # the mean over every position, mask ignored
    "mce_mask_ignored": mce(ret="ce.mean()"),
    # divided by the count without the floor: an empty mask gives 0 / 0 = nan
    "mce_empty_mask_nan": mce(ret="(ce * m).sum() / m.sum()"),
    # divided by the number of positions, not the counted ones
    "mce_divides_by_all": mce(ret="(ce * m).sum() / m.numel()"),
    # the sum, not the mean
    "mce_sum": mce(ret="(ce * m).sum()"),
    # softmax without the log-sum-exp: unnormalised exp(z)
    "bwd_unnormalised_softmax": bwd(softmax="torch.exp((sc @ w.t()).float())"),
    # onehot(y) not subtracted
    "bwd_no_minus_onehot": bwd(onehot="pass"),
    # the mask left out of the scale
    "bwd_mask_ignored": bwd(scale="torch.ones_like(m) * (g / denom)"),
    # the incoming gradient g ignored
    "bwd_ignores_g": bwd(scale="m / denom"),
    # dW overwritten per chunk: only the last chunk's contribution survives
    "bwd_dw_last_chunk_only": bwd(dw="dw[:] = dz.t() @ sc"),
    # the targets not shifted: predicts the current token
    "base_targets_not_shifted": (BASE, """
        x = b.tokens
        loss = model.output.loss(model.hidden(x[:, :-1]), x[:, :-1], b.mask[:, 1:])
        return loss, {"ce": loss.detach()}
    """),
    # the mask not shifted
    "base_mask_not_shifted": (BASE, """
        x = b.tokens
        loss = model.output.loss(model.hidden(x[:, :-1]), x[:, 1:], b.mask[:, :-1])
        return loss, {"ce": loss.detach()}
    """),
    # h detached: the base gets no gradient, nothing is fine-tuned
    "fta_i_base_detached": fta_i(hd=".detach()"),
    # the IDM's straight-through action: gradient flows back through the frozen IDM
    "fta_i_straight_through_idm": (FTAI, """
        x = b.tokens
        h = model.hidden(x)
        z = model.idm_logits(h)[:, 1:]
        y = z.float().softmax(-1)
        a = F.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype) - y.detach() + y
        loss = model.base.output.loss(model.world_state(h[:, :-1], a), x[:, 1:], b.mask[:, 1:])
        return loss, {"ce": loss.detach()}
    """),
    # the policy's actions instead of the IDM's (FTA-P's)
    "fta_i_uses_policy": fta_i(act="model.policy_logits(h[:, :-1]).argmax(-1)"),
    # IDM labels without look-ahead
    "fta_i_no_lookahead": fta_i(act="model.idm_logits(h)[:, :-1].argmax(-1)"),
    # base_grad not passed on: always the merge side
    "fta_p_ignores_base_grad": fta_p(side=""),
    # the policy reads h[:, 1:]: sees the token it predicts
    "fta_p_policy_sees_next": fta_p(act="model.policy_logits(h[:, 1:]).argmax(-1)"),
    # the IDM's labels instead of the policy's actions (FTA-I's)
    "fta_p_uses_idm": fta_p(act="model.idm_labels(h)"),
    # h detached: no gradient reaches the base
    "fta_p_base_detached": fta_p(hd=".detach()"),
}
