"""Assignment 1: RMSNorm, llama3 RoPE, GQA attention with a KV cache."""
NORM, FREQ, ROPE, CACHE, ATTN = ("model.py:RMSNorm.forward", "model.py:rope_frequencies", "model.py:apply_rope",
                                 "model.py:KVCache.update", "model.py:Attention.forward")

CORRECT = {
    NORM: """
        h = x.to(torch.float32)
        inv = (h * h).mean(dim=-1, keepdim=True).add(self.eps).rsqrt()
        return (h * inv).to(x.dtype) * self.weight
    """,
    FREQ: """
        dh = args.head_dim
        f = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        if not args.use_scaled_rope:
            return f
        lo_wl = args.rope_original_context / args.rope_low_freq_factor     # longer: slowed
        hi_wl = args.rope_original_context / args.rope_high_freq_factor    # shorter: kept
        out = []
        for fj in f.tolist():
            wl = 2 * math.pi / fj
            if wl < hi_wl:
                out.append(fj)
            elif wl > lo_wl:
                out.append(fj / args.rope_scale_factor)
            else:
                s = (args.rope_original_context / wl - args.rope_low_freq_factor) / (
                    args.rope_high_freq_factor - args.rope_low_freq_factor)
                out.append((1 - s) * fj / args.rope_scale_factor + s * fj)
        return torch.tensor(out, dtype=torch.float32)
    """,
    ROPE: """
        xf = x.float()
        x0, x1 = xf[..., 0::2], xf[..., 1::2]                      # [B, T, H, Dh/2]
        c, s = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)
    """,
    CACHE: """
        n, t = k.size(0), k.size(2)
        end = start_pos + t
        if n > self.k.size(0) or end > self.k.size(2):
            raise ValueError("KV cache too small")
        self.k[:n, :, start_pos:end].copy_(k)
        self.v[:n, :, start_pos:end].copy_(v)
        return self.k[:n, :, :end], self.v[:n, :, :end]
    """,
    ATTN: """
        B, T, _ = x.shape
        q = apply_rope(self.wq(x).view(B, T, self.n_heads, self.head_dim), rope).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), rope).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        G = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)     # query head i -> K/V head i // G
        S = k.shape[2]
        pos_q = torch.arange(S - T, S, device=x.device)[:, None]
        allowed = torch.arange(S, device=x.device)[None, :] <= pos_q           # [T, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
    """,
}

REF_ATTN = """
    B, T, _ = x.shape
    q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
    k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
    v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
    {rope}
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if self.cache is not None:
        {cache}
    S = k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    {heads}
    if S == T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif T == 1:
        y = F.scaled_dot_product_attention(q, k, v, {one}enable_gqa=gqa)
    else:
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal={diag})
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return self.wo(y.transpose(1, 2).reshape(B, T, -1))
"""


def attn(rope="q, k = apply_rope(q, rope), apply_rope(k, rope)", cache="k, v = self.cache.update(start_pos, k, v)",
         heads="", one="", diag="S - T"):
    return ATTN, REF_ATTN.format(rope=rope, cache=cache, heads=heads, one=one, diag=diag)


MUTANTS = {
    # eps added to the root instead of inside it: 1 / (sqrt(mean x^2) + eps)
    "rmsnorm_eps_outside_sqrt": (NORM, """
        xf = x.float()
        return (xf / (xf.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)).type_as(x) * self.weight
    """),
    # the mean over the batch axis, not over the D channels
    "rmsnorm_mean_over_axis_0": (NORM, """
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(0, keepdim=True) + self.eps)).type_as(x) * self.weight
    """),
    # the weight multiplied in float32 before the cast (HF's order, not Meta's)
    "rmsnorm_weight_before_cast": (NORM, """
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)
    """),
    # normalised in the input's dtype (bf16), not float32
    "rmsnorm_in_input_dtype": (NORM, """
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
    """),
    # the exponent j / Dh instead of 2j / Dh
    "rope_freq_exponent_missing_2": (FREQ, """
        dh = args.head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(dh // 2).float() / dh))
        if not args.use_scaled_rope:
            return freqs
        factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                                  args.rope_original_context)
        wavelen = 2 * math.pi / freqs
        smooth = (ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > ctx / low, freqs / factor, freqs)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
        return torch.where(medium, smoothed, scaled)
    """),
    # long wavelengths sped up (f * factor) instead of slowed
    "rope_scaling_multiplies": (FREQ, """
        dh = args.head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2)[: dh // 2].float() / dh))
        if not args.use_scaled_rope:
            return freqs
        factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                                  args.rope_original_context)
        wavelen = 2 * math.pi / freqs
        smooth = (ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > ctx / low, freqs * factor, freqs)
        smoothed = (1 - smooth) * freqs / factor + smooth * freqs
        medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
        return torch.where(medium, smoothed, scaled)
    """),
    # the interpolation weights swapped: s on the slowed frequency, 1 - s on the kept one
    "rope_smoothing_swapped": (FREQ, """
        dh = args.head_dim
        freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2)[: dh // 2].float() / dh))
        if not args.use_scaled_rope:
            return freqs
        factor, low, high, ctx = (args.rope_scale_factor, args.rope_low_freq_factor, args.rope_high_freq_factor,
                                  args.rope_original_context)
        wavelen = 2 * math.pi / freqs
        smooth = (ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > ctx / low, freqs / factor, freqs)
        smoothed = smooth * freqs / factor + (1 - smooth) * freqs
        medium = (wavelen >= ctx / high) & (wavelen <= ctx / low)
        return torch.where(medium, smoothed, scaled)
    """),
    # use_scaled_rope ignored: plain RoPE frequencies
    "rope_no_llama3_scaling": (FREQ, """
        dh = args.head_dim
        return 1.0 / (args.rope_theta ** (torch.arange(0, dh, 2)[: dh // 2].float() / dh))
    """),
    # GPT-NeoX pairing: channel j with j + Dh/2 (rotate_half) instead of adjacent pairs (2j, 2j+1)
    "rope_half_split_pairs": (ROPE, """
        xf = x.float()
        half = xf.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        c, s = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.cat([x0 * c - x1 * s, x0 * s + x1 * c], -1).type_as(x)
    """),
    # rotated by -angle: the sin terms' signs swapped
    "rope_sin_sign": (ROPE, """
        xf = x.float()
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        c, s = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        return torch.stack([x0 * c + x1 * s, -x0 * s + x1 * c], -1).flatten(-2).type_as(x)
    """),
    # rotated in the input's dtype: the table rounded to bf16 first
    "rope_in_input_dtype": (ROPE, """
        x0, x1 = x[..., 0::2], x[..., 1::2]
        r = rope.to(x.dtype)
        c, s = r[None, :, None, :, 0], r[None, :, None, :, 1]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
    """),
    # returns only the new keys and values, not every one so far
    "kv_cache_returns_new_only": (CACHE, """
        B, T = k.shape[0], k.shape[2]
        if start_pos + T > self.k.shape[2] or B > self.k.shape[0]:
            raise ValueError("KV cache too small")
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return k, v
    """),
    # returns the whole buffer, unwritten positions (zeros) included
    "kv_cache_returns_whole_buffer": (CACHE, """
        B, T = k.shape[0], k.shape[2]
        if start_pos + T > self.k.shape[2] or B > self.k.shape[0]:
            raise ValueError("KV cache too small")
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return self.k[:B], self.v[:B]
    """),
    # every row of the buffer returned, whatever the batch
    "kv_cache_all_rows": (CACHE, """
        B, T = k.shape[0], k.shape[2]
        if start_pos + T > self.k.shape[2] or B > self.k.shape[0]:
            raise ValueError("KV cache too small")
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return self.k[:, :, :start_pos + T], self.v[:, :, :start_pos + T]
    """),
    # no bounds check: a write past the buffer fails inside torch, not with ValueError
    "kv_cache_no_bounds_check": (CACHE, """
        B, T = k.shape[0], k.shape[2]
        self.k[:B, :, start_pos:start_pos + T] = k
        self.v[:B, :, start_pos:start_pos + T] = v
        return self.k[:B, :, :start_pos + T], self.v[:B, :, :start_pos + T]
    """),
    # K/V heads tiled (head i uses i % Hkv) instead of repeated (i // G)
    "attn_gqa_tiled_heads": attn(heads="if gqa:\n        G = q.shape[1] // k.shape[1]\n        k, v = k.repeat(1, G, 1, 1), v.repeat(1, G, 1, 1)\n        gqa = False"),
    # the chunk's mask one position short: query i sees keys j < S - T + i
    "attn_chunk_mask_off_by_one": attn(diag="S - T - 1"),
    # the chunk's mask one position long: query i also sees key S - T + i + 1
    "attn_chunk_mask_one_ahead": attn(diag="S - T + 1"),
    # one new token given a causal mask: SDPA aligns it top-left, so it sees only the first key
    "attn_one_token_causal": attn(one="is_causal=True, "),
    # RoPE on the queries only
    "attn_rope_on_q_only": attn(rope="q = apply_rope(q, rope)"),
    # the cache written at position 0 every call
    "attn_cache_ignores_start_pos": attn(cache="k, v = self.cache.update(0, k, v)"),
}
