"""Assignment 5: Stage B, cloning the IDM into a policy."""
LAB, POL, BC, MET = "cola.py:CoLA.idm_labels", "cola.py:CoLA.policy_logits", "train.py:bc_loss", "eval.py:cola_metrics"

CORRECT = {
    LAB: """
        z = self.idm_logits(h)                                     # [B, T+1, K]
        return torch.argmax(z[:, 1:], dim=-1)
    """,
    POL: """
        T = h.size(1)
        return self.policy(h, self.base.rope(start_pos, T, h.device), start_pos)
    """,
    BC: """
        with torch.no_grad():
            states = model.hidden(b.tokens)
            labels = model.idm_labels(states)
        logits = model.policy_logits(states[:, :-1])
        counted = b.mask[:, 1:]
        loss = masked_ce(logits, labels, counted)
        n = counted.sum().clamp(min=1)
        acc = ((logits.argmax(-1) == labels) & counted).sum() / n
        return loss, {"ce": loss.detach(), "acc": acc}
    """,
    MET: """
        tokens, m = b.tokens, b.mask[:, 1:]
        states = model.hidden(tokens)
        ctx, targets = states[:, :-1], tokens[:, 1:]
        labels = model.idm_labels(states)
        greedy = model.policy_logits(ctx).argmax(-1)
        head = model.base.output
        ce = lambda s: head.loss(s, targets, m).item()          # noqa: E731
        return {"lm": ce(ctx), "wm_idm": ce(model.world_state(ctx, labels)),
                "wm_policy": ce(model.world_state(ctx, greedy)),
                "policy_acc": float(((greedy == labels) & m).sum()) / max(int(m.sum()), 1)}
    """,
}

REF_BC = """
    x, m = b.tokens, b.mask[:, 1:]
    {nograd}
        h = model.hidden(x)
        k_star = {labels}
    pi_logits = model.policy_logits({ctx})
    loss = masked_ce(pi_logits, k_star, {lossmask})
    hit = (pi_logits.argmax(-1) == k_star).float()
    acc = {acc}
    return loss, {{"ce": loss.detach(), "acc": acc}}
"""


def bc(nograd="with torch.no_grad():", labels="model.idm_labels(h)", ctx="h[:, :-1]", lossmask="m",
       acc="(hit * m).sum() / m.sum().clamp(min=1)"):
    return BC, REF_BC.format(nograd=nograd, labels=labels, ctx=ctx, lossmask=lossmask, acc=acc)


REF_MET = """
    x, m = b.tokens, b.mask[:, 1:]
    h = model.hidden(x)
    k = {k}
    a = {a}
    W = model.base.output
    return {{"lm": W.loss({lm}, x[:, 1:], m).item(),
            "wm_idm": W.loss(model.world_state(h[:, :-1], k), x[:, 1:], m).item(),
            "wm_policy": W.loss(model.world_state(h[:, :-1], {apol}), x[:, 1:], {mpol}).item(),
            "policy_acc": {acc}}}
"""


def met(k="model.idm_labels(h)", a="model.policy_logits(h[:, :-1]).argmax(-1)", lm="h[:, :-1]", apol="a",
        mpol="m", acc="((a == k).float() * m).sum().item() / max(m.sum().item(), 1)"):
    return MET, REF_MET.format(k=k, a=a, lm=lm, apol=apol, mpol=mpol, acc=acc)


MUTANTS = {
    # no look-ahead: labels read at t, not t + 1
    "labels_no_lookahead": (LAB, """
        return idm_labels(self.idm_logits(h)[:, :-1])
    """),
    # labels sampled with Gumbel noise instead of the argmax
    "labels_sampled": (LAB, """
        from idm import gumbel_softmax_st
        return gumbel_softmax_st(self.idm_logits(h)[:, 1:], 1.0)[2]
    """),
    # two tokens ahead: z[:, 2:], the last position repeated
    "labels_two_ahead": (LAB, """
        z = self.idm_logits(h)
        return torch.cat([z[:, 2:], z[:, -1:]], 1).argmax(-1)
    """),
    # the RoPE table always from position 0: a cached step (start_pos > 0) rotates at the wrong positions
    "policy_rope_from_zero": (POL, """
        rope = self.base.rope(0, h.shape[1], h.device)
        return self.policy(h, rope, start_pos)
    """),
    # start_pos not passed on: the policy's KV cache is written at 0 every step
    "policy_start_pos_dropped": (POL, """
        rope = self.base.rope(start_pos, h.shape[1], h.device)
        return self.policy(h, rope)
    """),
    # the labels computed at t (no look-ahead) inside the loss
    "bc_no_lookahead": bc(labels="model.idm_logits(h)[:, :-1].argmax(-1)"),
    # the policy sees h[:, 1:]: one token of the future
    "bc_policy_sees_next_token": bc(ctx="h[:, 1:]"),
    # every target counted in the loss
    "bc_loss_mask_ignored": bc(lossmask="torch.ones_like(m)"),
    # the mask not shifted: the prompt's last token counted, the response's last not
    "bc_mask_not_shifted": bc(lossmask="b.mask[:, :-1]"),
    # accuracy over every position
    "bc_acc_unmasked": bc(acc="hit.mean()"),
    # h and the labels with gradient: the base trains through the policy's input
    "bc_base_not_frozen": bc(nograd="if True:"),
    # the "lm" CE read one position late (h[:, 1:])
    "metrics_lm_misaligned": met(lm="h[:, 1:]"),
    # wm_policy under the IDM's labels (copy-paste)
    "metrics_wm_policy_uses_labels": met(apol="k"),
    # policy accuracy over every position
    "metrics_acc_unmasked": met(acc="(a == k).float().mean().item()"),
    # labels without look-ahead in the metrics
    "metrics_labels_no_lookahead": met(k="model.idm_logits(h)[:, :-1].argmax(-1)"),
    # wm_policy over every target
    "metrics_wm_policy_unmasked": met(mpol="torch.ones_like(m)"),
    # the policy's action sampled, not greedy
    "metrics_policy_sampled": met(a="torch.distributions.Categorical(logits=model.policy_logits(h[:, :-1])).sample()"),
}
