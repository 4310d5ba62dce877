"""Assignment 3: the merge module, the world model's state, and the diversity measures."""
MLP, MERGE, WSC, WS = ("cola.py:MergeMLP.forward", "cola.py:MergeModule.forward",
                       "cola.py:CoLA.world_state_from_code", "cola.py:CoLA.world_state")
EMBED, COS, DIST = "eval.py:embed", "eval.py:mean_pairwise_cosine", "eval.py:distinct_n"

CORRECT = {
    MLP: """
        se = torch.cat((s, e), dim=s.dim() - 1)
        gate, up = self.gate_proj(se), self.up_proj(se)
        return self.down_proj(gate * torch.sigmoid(gate) * up)
    """,
    MERGE: """
        out = h
        for mlp in self.layers:
            out = mlp(out, e) + out
        return out
    """,
    WSC: """
        if base_grad not in ("merge", "subtracted"):
            raise ValueError(f"unknown base_grad {base_grad!r}")
        norm_s2 = self.base.norm(self.merge(h, e.to(dtype=self.codebook.weight.dtype)))
        if base_grad == "merge":
            h = h.detach()
        else:
            norm_s2 = norm_s2.detach()
        return norm_s2 - h
    """,
    WS: """
        if not a.is_floating_point():
            check_actions(a, self.args.n_actions, "world_logits")
            a = F.one_hot(a, self.args.n_actions)
            e = F.embedding(a.argmax(-1), self.codebook.weight.t())
        else:
            e = a.to(self.codebook.weight.dtype) @ self.codebook.weight.t()
        return self.world_state_from_code(h, e, base_grad)
    """,
    EMBED: """
        dev = base.tok_embeddings.weight.device
        rows = []
        for start in range(0, len(seqs), chunk):
            group = seqs[start:start + chunk]
            width = 1 + max(map(len, group))
            x = torch.tensor([[bos] + s + [0] * (width - 1 - len(s)) for s in group], device=dev)
            h = base.hidden(x).float()
            for j, s in enumerate(group):
                rows.append(h[j, 1:1 + len(s)].mean(0))
        return torch.stack(rows)
    """,
    COS: """
        P, M, _ = emb.shape
        if M < 2:
            raise ValueError("need at least two members per group")
        i, j = torch.triu_indices(M, M, offset=1)
        sims = F.cosine_similarity(emb[:, i].double(), emb[:, j].double(), dim=-1)     # [P, pairs]
        return sims.mean(-1).to(emb.dtype)
    """,
    DIST: """
        seen, total = set(), 0
        for t in texts:
            words = t.split()
            for i in range(len(words) - n + 1):
                seen.add(" ".join(words[i:i + n]))
                total += 1
        return len(seen) / total if total else 0.0
    """,
}

MUTANTS = {
    # [e; s]: the concatenation in the wrong order
    "mlp_concat_order": (MLP, """
        x = torch.cat([e, s], dim=-1)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
    """),
    # the gate and the up projection swapped
    "mlp_gate_up_swapped": (MLP, """
        x = torch.cat([s, e], dim=-1)
        return self.down_proj(F.silu(self.up_proj(x)) * self.gate_proj(x))
    """),
    # GELU instead of SiLU
    "mlp_gelu": (MLP, """
        x = torch.cat([s, e], dim=-1)
        return self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))
    """),
    # no residual: s_i = MLP(s_{i-1}, e)
    "merge_no_residual": (MERGE, """
        s = h
        for layer in self.layers:
            s = layer(s, e)
        return s
    """),
    # every layer reads h, not the previous s
    "merge_every_layer_reads_h": (MERGE, """
        s = h
        for layer in self.layers:
            s = s + layer(h, e)
        return s
    """),
    # no Norm_f on s_2
    "wsc_no_norm": (WSC, """
        s = self.merge(h, e.to(self.codebook.weight.dtype))
        if base_grad == "merge":
            return s - h.detach()
        if base_grad == "subtracted":
            return s.detach() - h
        raise ValueError(base_grad)
    """),
    # the two gradient paths swapped
    "wsc_sides_swapped": (WSC, """
        s = self.merge(h, e.to(self.codebook.weight.dtype))
        if base_grad == "merge":
            return self.base.norm(s).detach() - h
        if base_grad == "subtracted":
            return self.base.norm(s) - h.detach()
        raise ValueError(base_grad)
    """),
    # nothing detached: the gradient goes through both sides
    "wsc_no_stop_gradient": (WSC, """
        if base_grad not in ("merge", "subtracted"):
            raise ValueError(base_grad)
        return self.base.norm(self.merge(h, e.to(self.codebook.weight.dtype))) - h
    """),
    # an unknown base_grad silently takes the merge path
    "wsc_no_value_error": (WSC, """
        s = self.merge(h, e.to(self.codebook.weight.dtype))
        if base_grad == "subtracted":
            return self.base.norm(s).detach() - h
        return self.base.norm(s) - h.detach()
    """),
    # float actions turned into ids: the straight-through gradient to a is lost
    "ws_float_actions_argmax": (WS, """
        if a.is_floating_point():
            a = a.argmax(-1)
        check_actions(a, self.args.n_actions, "world_logits")
        e = F.embedding(a, self.codebook.weight.t())
        return self.world_state_from_code(h, e, base_grad)
    """),
    # float actions detached before the codebook
    "ws_float_actions_detached": (WS, """
        if a.is_floating_point():
            e = self.codebook(a.detach().to(self.codebook.weight.dtype))
        else:
            check_actions(a, self.args.n_actions, "world_logits")
            e = F.embedding(a, self.codebook.weight.t())
        return self.world_state_from_code(h, e, base_grad)
    """),
    # BOS included in the mean
    "embed_includes_bos": (EMBED, """
        device = base.tok_embeddings.weight.device
        out = []
        for i in range(0, len(seqs), chunk):
            part = seqs[i:i + chunk]
            L = max(len(s) for s in part)
            x = torch.full((len(part), L + 1), bos, dtype=torch.long, device=device)
            keep = torch.zeros(len(part), L + 1, dtype=torch.bool, device=device)
            for j, s in enumerate(part):
                x[j, 1:1 + len(s)] = torch.tensor(s, dtype=torch.long)
                keep[j, :1 + len(s)] = True
            h = base.hidden(x).float()
            w = keep.float()[..., None]
            out.append((h * w).sum(1) / w.sum(1).clamp_min(1))
        return torch.cat(out)
    """),
    # the padding positions averaged in too
    "embed_mean_over_padding": (EMBED, """
        device = base.tok_embeddings.weight.device
        out = []
        for i in range(0, len(seqs), chunk):
            part = seqs[i:i + chunk]
            L = max(len(s) for s in part)
            x = torch.full((len(part), L + 1), bos, dtype=torch.long, device=device)
            for j, s in enumerate(part):
                x[j, 1:1 + len(s)] = torch.tensor(s, dtype=torch.long)
            out.append(base.hidden(x).float()[:, 1:].mean(1))
        return torch.cat(out)
    """),
    # the diagonal (each embedding with itself, cosine 1) counted in the mean
    "cos_includes_diagonal": (COS, """
        P, M, _ = emb.shape
        if M < 2:
            raise ValueError("M < 2")
        u = F.normalize(emb.double(), dim=-1)
        return (u @ u.transpose(1, 2)).mean((1, 2)).to(emb.dtype)
    """),
    # both orders of each pair summed, divided by the number of unordered pairs
    "cos_pairs_counted_twice": (COS, """
        P, M, _ = emb.shape
        if M < 2:
            raise ValueError("M < 2")
        u = F.normalize(emb.double(), dim=-1)
        sim = u @ u.transpose(1, 2)
        off = ~torch.eye(M, dtype=torch.bool)
        return (sim[:, off].sum(-1) / (M * (M - 1) / 2)).to(emb.dtype)
    """),
    # dot products, not cosines: no normalisation
    "cos_not_normalised": (COS, """
        P, M, _ = emb.shape
        if M < 2:
            raise ValueError("M < 2")
        sim = emb.double() @ emb.double().transpose(1, 2)
        off = ~torch.eye(M, dtype=torch.bool)
        return (sim[:, off].sum(-1) / (M * (M - 1))).to(emb.dtype)
    """),
    # characters instead of words
    "distinct_characters": (DIST, """
        grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0
    """),
    # the texts joined first: n-grams across the boundary between two texts
    "distinct_across_texts": (DIST, """
        ws = " ".join(texts).split()
        grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0
    """),
    # split on single spaces only
    "distinct_split_on_space": (DIST, """
        grams = [tuple(ws[i:i + n]) for t in texts for ws in [t.split(" ")] for i in range(len(ws) - n + 1)]
        return len(set(grams)) / len(grams) if grams else 0.0
    """),
}
