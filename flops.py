"""
What a GenTron costs: parameters (Table 1; the closed form `param_formula` is pinned against `count_params`)
and forward FLOPs per sample (`flops_per_sample`, pinned against PyTorch's FLOP counter), the numerator of
the MFU that bench.py and the training scripts print.
"""


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def param_formula(cfg):
    """Closed-form parameter count of GenTron(cfg); tests check it against count_params."""
    d, m, p = cfg.width, cfg.mlp_width, cfg.patch
    lin = lambda i, o: i * o + o  # a Linear with bias
    block = lin(d, 3 * d) + lin(d, d) + lin(d, m) + lin(m, d) + lin(d, 6 * d)  # attn, MLP, adaLN
    if cfg.conditioning == "cross_attn":
        block += 2 * d + lin(d, d) + lin(d, 2 * d) + lin(d, d)  # norm2, q, kv, proj
    if cfg.temporal:
        block += 2 * d + lin(d, 3 * d) + lin(d, d)  # norm, qkv, proj
    if cfg.qk_norm:  # query and key RMSNorm gains (Dh each) in every attention of the block
        block += (1 + (cfg.conditioning == "cross_attn") + cfg.temporal) * 2 * (d // cfg.heads)
    total = cfg.depth * block
    total += cfg.in_channels * p * p * d + d  # patch embedding
    total += lin(256, d) + lin(d, d)  # timestep MLP
    if cfg.pooled_text:
        total += lin(cfg.pooled_dim, d) + lin(d, d)
    if cfg.conditioning == "cross_attn":
        total += lin(cfg.text_dim, d)
    total += lin(d, 2 * d) + lin(d, p * p * cfg.in_channels)  # final layer
    return total


def flops_per_sample(cfg, text_len=120, frames=1, resolution=None, caption=True):
    """Forward FLOPs (2 x multiply-adds) of one sample: an image, or a clip of `frames` frames.
    Token-wise layers count per token; adaLN, embedders and text projections once per sample.
    caption=False leaves out the caption's share (GenTron.encode_text: pooled-text MLP, text projection,
    cross-attention keys and values), which a sampling step reuses instead of computing."""
    d, m, p = cfg.width, cfg.mlp_width, cfg.patch
    side = (resolution or cfg.input_size) // p
    n, L = side * side, text_len
    per_frame = 4 * n * d * d + 2 * n * n * d  # self-attention: qkv + proj, QK^T + AV
    per_frame += 2 * n * d * m  # MLP
    per_clip = 6 * d * d  # adaLN
    if cfg.conditioning == "cross_attn":
        per_frame += 2 * n * d * d + 2 * n * L * d  # q + proj, QK^T + AV
        if caption:
            per_clip += 2 * L * d * d  # kv projection, once per clip
    if cfg.temporal:
        per_frame += 4 * n * d * d + 2 * n * frames * d  # qkv + proj, attention over T frames
    macs = frames * cfg.depth * per_frame + cfg.depth * per_clip
    macs += 2 * frames * n * d * p * p * cfg.in_channels + 2 * d * d  # patch embed, final linear, adaLN
    macs += 256 * d + d * d  # timestep MLP
    if cfg.pooled_text and caption:
        macs += cfg.pooled_dim * d + d * d
    if cfg.conditioning == "cross_attn" and caption:
        macs += L * cfg.text_dim * d  # text projection
    return 2 * macs
