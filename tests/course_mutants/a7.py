"""Assignment 7: GRPO, ReMax and the KL estimators."""
ALP, ADV, K1, K3, AGG, GRPO, REMAX = ("policy.py:action_log_probs", "rl.py:grpo_advantages", "rl.py:k1", "rl.py:k3",
                                      "rl.py:aggregate", "rl.py:grpo_loss", "rl.py:remax_loss")

CORRECT = {
    ALP: """
        lp = logits.float() - torch.logsumexp(logits.float(), dim=-1, keepdim=True)
        keep = torch.ones_like(actions, dtype=torch.bool) if mask is None else mask.bool()
        idx = actions.long().masked_fill(~keep, 0)
        return (lp.gather(-1, idx[..., None])[..., 0] * keep).masked_fill(~keep, 0.0)
    """,
    ADV: """
        groups = R.reshape(-1, G)
        mu = groups.mean(dim=1, keepdim=True)
        sd = ((groups - mu) ** 2).sum(dim=1, keepdim=True).div(G - 1).sqrt()
        return ((groups - mu) / (sd + 1e-4)).reshape(-1)
    """,
    K1: """
        return -(ref_logp - logp)
    """,
    K3: """
        log_r = ref_logp - logp
        return log_r.exp() - 1 - log_r
    """,
    AGG: """
        w = mask.to(per_token.dtype)
        if how == "sequence":
            per_seq = (per_token * w).sum(-1) / torch.clamp(w.sum(-1), min=1.0)
            return per_seq.sum() / per_token.shape[0]
        denom = w.sum().clamp(min=1.0) if n_tokens is None else torch.tensor(max(float(n_tokens), 1.0))
        return (per_token * w).sum() / denom
    """,
    GRPO: """
        eps = cfg.clip_eps
        ratio = (logp - old_logp).exp()
        adv = A.unsqueeze(1)
        unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv
        loss_tok = -torch.where(unclipped < clipped, unclipped, clipped)
        if cfg.kl_placement == "loss":
            loss_tok = loss_tok + cfg.kl_coef * k3(logp, ref_logp)
        outside = ((ratio > 1 + eps) | (ratio < 1 - eps)).float()
        stats = {"clip_frac": ((outside * mask).sum() / mask.sum().clamp(min=1)).item(),
                 "ratio_max": ratio.masked_select(mask.bool()).max().item()}
        return aggregate(loss_tok, mask, cfg.aggregate, n_tokens), stats
    """,
    REMAX: """
        loss_tok = -(logp * A.unsqueeze(-1))
        if cfg.kl_placement == "loss":
            loss_tok = loss_tok + k3(logp, ref_logp) * cfg.kl_coef
        return aggregate(loss_tok, mask, cfg.aggregate, n_tokens=n_tokens), {}
    """,
}

REF_GRPO = """
    rho = {rho}
    A = A[:, None]
    surrogate = {sur}
    per_token = -surrogate
    if {when}:
        per_token = per_token {kl}
    return aggregate(per_token, mask, cfg.aggregate, n_tokens), {{"clip_frac": aggregate(
        {clipped}, mask, "token").item(), "ratio_max": rho[mask].max().item()}}
"""


def grpo(rho="torch.exp(logp - old_logp)",
         sur="torch.minimum(rho * A, rho.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)",
         when='cfg.kl_placement == "loss"', kl="+ cfg.kl_coef * k3(logp, ref_logp)",
         clipped="((rho - 1).abs() > cfg.clip_eps).float()"):
    return GRPO, REF_GRPO.format(rho=rho, sur=sur, when=when, kl=kl, clipped=clipped)


REF_REMAX = """
    per_token = {pg}
    if cfg.kl_placement == "loss":
        per_token = per_token + {kl}
    return aggregate(per_token, mask, {how}, n_tokens), {{}}
"""


def remax(pg="-A[:, None] * logp", kl="cfg.kl_coef * k3(logp, ref_logp)", how="cfg.aggregate"):
    return REMAX, REF_REMAX.format(pg=pg, kl=kl, how=how)


REF_AGG = """
    m = mask.float()
    if how == "sequence":
        return {seq}
    return {tok}
"""


def agg(seq="((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()",
        tok="(per_token * m).sum() / (m.sum().clamp(min=1) if n_tokens is None else max(n_tokens, 1.0))"):
    return AGG, REF_AGG.format(seq=seq, tok=tok)


def adv(body):
    return ADV, "r = R.view(-1, G)\nreturn " + body


MUTANTS = {
    # probabilities, not log-probabilities
    "alp_probabilities": (ALP, """
        p = F.softmax(logits.float(), dim=-1)
        out = p.gather(-1, actions.long().clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return out if mask is None else torch.where(mask.bool(), out, 0.0)
    """),
    # masked positions keep their (padding-clamped) log-prob instead of 0
    "alp_mask_not_zeroed": (ALP, """
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, actions.long().clamp_min(0).unsqueeze(-1)).squeeze(-1)
    """),
    # the mask ignored: padding -1 indexes the last action (or fails)
    "alp_mask_ignored": (ALP, """
        logp = F.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, (actions.long() % logits.shape[-1]).unsqueeze(-1)).squeeze(-1)
    """),
    # the population std (ddof 0)
    "adv_population_std": adv("((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + 1e-4)).view(-1)"),
    # no epsilon: a group of equal rewards divides 0 by 0
    "adv_no_eps": adv("((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)).view(-1)"),
    # the epsilon inside the square root: sqrt(var + 1e-4)
    "adv_eps_inside_sqrt": adv("((r - r.mean(1, keepdim=True)) / (r.var(1, keepdim=True) + 1e-4).sqrt()).view(-1)"),
    # normalised over the whole batch, not per group
    "adv_batch_normalised": adv("((R - R.mean()) / (R.std() + 1e-4))"),
    # groups read down the columns: samples of one prompt strided, not contiguous
    "adv_groups_strided": (ADV, """
        r = R.view(G, -1)
        return ((r - r.mean(0, keepdim=True)) / (r.std(0, keepdim=True) + 1e-4)).reshape(-1)
    """),
    # only centred, not scaled
    "adv_not_scaled": adv("(r - r.mean(1, keepdim=True)).view(-1)"),
    # k1 reversed: log pi_ref - log pi
    "k1_reversed": (K1, "return ref_logp - logp"),
    # k1 as an absolute value
    "k1_abs": (K1, "return (logp - ref_logp).abs()"),
    # the ratio inverted: r = pi / pi_ref
    "k3_ratio_inverted": (K3, "d = logp - ref_logp\nreturn torch.exp(d) - d - 1"),
    # k2 (half the squared log-ratio) instead of k3
    "k3_is_k2": (K3, "return 0.5 * (logp - ref_logp) ** 2"),
    # the -1 left out
    "k3_no_minus_one": (K3, "d = ref_logp - logp\nreturn torch.exp(d) - d"),
    # an empty response divides by 0 (nan) instead of counting 0
    "agg_sequence_empty_nan": agg(seq="((per_token * m).sum(1) / m.sum(1)).nan_to_num(1.0).mean()"),
    # the mean over non-empty responses only
    "agg_sequence_skips_empty": agg(seq="((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / (m.sum(1) > 0).sum()"),
    # n_tokens ignored
    "agg_token_ignores_n_tokens": agg(tok="(per_token * m).sum() / m.sum().clamp(min=1)"),
    # n_tokens used without the floor of 1
    "agg_token_no_floor": agg(tok="(per_token * m).sum() / (m.sum().clamp(min=1) if n_tokens is None else n_tokens)"),
    # the token mean over every position, padding included
    "agg_token_over_all_positions": agg(tok="(per_token * m).sum() / (m.numel() if n_tokens is None else max(n_tokens, 1.0))"),
    # max instead of min: the pessimistic bound turned optimistic
    "grpo_max_not_min": grpo(sur="torch.maximum(rho * A, rho.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * A)"),
    # no clipping: the plain importance-weighted surrogate
    "grpo_no_clip": grpo(sur="rho * A"),
    # the ratio inverted: pi_old / pi
    "grpo_ratio_inverted": grpo(rho="torch.exp(old_logp - logp)"),
    # the ratio's gradient stopped: logp detached inside rho
    "grpo_ratio_detached": grpo(rho="torch.exp(logp.detach() - old_logp)"),
    # the clip applied to A instead of rho
    "grpo_clip_on_advantage": grpo(sur="torch.minimum(rho * A, rho * A.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps))"),
    # k1 in the loss instead of k3
    "grpo_kl_k1": grpo(kl="+ cfg.kl_coef * k1(logp, ref_logp)"),
    # the KL term added whatever the placement
    "grpo_kl_always": grpo(when="True"),
    # the KL term subtracted
    "grpo_kl_sign": grpo(kl="- cfg.kl_coef * k3(logp, ref_logp)"),
    # clip_frac counts only ratios above 1 + eps
    "grpo_clip_frac_one_sided": grpo(clipped="(rho - 1 > cfg.clip_eps).float()"),
    # +A log pi: gradient ascent on the loss
    "remax_sign": remax(pg="A[:, None] * logp"),
    # exp(log pi) = pi in place of log pi
    "remax_probability": remax(pg="-A[:, None] * logp.exp()"),
    # k1 in the loss instead of k3
    "remax_kl_k1": remax(kl="cfg.kl_coef * k1(logp, ref_logp)"),
    # always the sequence mean, whatever cfg.aggregate
    "remax_always_sequence": remax(how='"sequence"'),
}
