"""Properties of model.py that the paper states (Sec. 3.2-3.3), checked numerically on CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flops import count_params, flops_per_sample, param_formula
from model import GenTron, make_config

TEXT_DIM, POOLED_DIM, L = 24, 16, 7


def build(size="tiny", seed=0, randomize=True, **kw):
    """A small model; `randomize` replaces the zero inits by random weights, like a trained model."""
    torch.manual_seed(seed)
    kw = {"in_channels": 3, "text_dim": TEXT_DIM, "pooled_dim": POOLED_DIM, **kw}
    model = GenTron(make_config(size, **kw)).eval()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(b=2, frames=None, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 3, size, size) if frames is None else (b, frames, 3, size, size)
    mask = torch.ones(b, L, dtype=torch.bool)
    mask[0, 4:] = False  # first caption is shorter: 3 padded tokens
    return dict(
        x=torch.randn(shape, generator=g),
        t=torch.randint(0, 1000, (b,), generator=g),
        text=torch.randn(b, L, TEXT_DIM, generator=g),
        text_mask=mask,
        pooled=torch.randn(b, POOLED_DIM, generator=g),
    )


@pytest.mark.parametrize("size", ["tiny", "S", "B"])
@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
def test_shapes_image_and_video(size, conditioning):
    # widths and heads of each size; depth 1 keeps S and B fast on CPU (depth does not change shapes)
    model = build(size, conditioning=conditioning, temporal=True, randomize=False, depth=1)
    img = inputs(b=2)
    assert model(**img).shape == img["x"].shape  # a (B, C, H, W) image batch
    vid = inputs(b=1, frames=3)
    out = model(**vid, motion_free=torch.tensor([False]))
    assert out.shape == vid["x"].shape == (1, 3, 3, 16, 16)  # (B, T, C, H, W)


def test_widths_the_embeddings_cannot_split_are_refused():
    make_config("tiny", width=64, heads=4)  # 4 heads of 16, 64 % 4 == 0: fine
    with pytest.raises(ValueError, match="multiple of 4"):  # 5 heads of 26: even, but 130 = 2 x 65 row/column halves
        make_config("tiny", width=130, heads=5, mlp_width=520)
    with pytest.raises(ValueError, match="heads of even width"):
        make_config("tiny", width=60, heads=4)


def test_video_needs_temporal_model():
    with pytest.raises(ValueError, match="temporal=True"):
        build(randomize=False)(**inputs(frames=2))


@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
def test_every_block_is_identity_at_init(conditioning):
    # adaLN-zero (DiT): gates start at 0; the ungated cross-attention and temporal outputs are zero-init.
    model = build(conditioning=conditioning, temporal=True, randomize=False)
    x = torch.randn(2 * 3, 64, model.cfg.width)  # (B T, N, D)
    c = torch.randn(2, model.cfg.width)
    text = torch.randn(2, L, model.cfg.width)
    for block in model.blocks:
        out = block(x, c, text, torch.ones(2, L, dtype=torch.bool), 3, torch.tensor([0, 1]).bool())
        assert torch.equal(out, x)
    # ... and with the zero final layer the untrained network predicts eps = 0
    assert model(**inputs()).abs().max() == 0


def test_t2v_from_t2i_checkpoint_matches_t2i_per_frame():
    # Sec. 3.3.1: with zero-init TempSelfAttn output, the new T2V model equals its T2I parent on every frame.
    t2i = build(seed=0)
    t2v = build(seed=5, temporal=True, randomize=False)
    new_keys = t2v.load_t2i_weights(t2i.state_dict())
    assert new_keys and all(".temporal." in k for k in new_keys)
    assert len(new_keys) == 6 * t2v.cfg.depth  # norm w/b, qkv w/b, proj w/b per block
    vid = inputs(b=2, frames=4)
    out = t2v(**vid, motion_free=torch.tensor([False, False]))
    for f in range(4):
        frame = {**vid, "x": vid["x"][:, f]}
        torch.testing.assert_close(out[:, f], t2i(**frame), rtol=0, atol=1e-6)
    assert out.abs().max() > 0.1  # the check compares real (randomised) outputs, not zeros


def test_t2i_checkpoint_with_wrong_shared_keys_is_refused():
    t2v = build(temporal=True, randomize=False)
    sd = build().state_dict()
    del sd["blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match="missing 1 shared"):
        t2v.load_t2i_weights(sd)


def test_motion_free_mask_makes_frames_independent():
    # Sec. 3.3.2: the identity temporal mask confines attention to each frame. Random (trained-like)
    # weights everywhere, including the temporal output projection.
    model = build(temporal=True)
    vid = inputs(b=2, frames=6)
    bumped = {**vid, "x": vid["x"].clone()}
    bumped["x"][:, 0] += 1.0  # perturb frame 0 of both clips
    both_free = torch.tensor([True, True])
    a, b = model(**vid, motion_free=both_free), model(**bumped, motion_free=both_free)
    assert torch.equal(a[:, 1:], b[:, 1:])  # every other frame exactly unchanged
    assert (a[:, 0] - b[:, 0]).abs().max() > 1e-3  # frame 0 itself did change
    no_mask_a, no_mask_b = model(**vid), model(**bumped)
    assert (no_mask_a[:, 5] - no_mask_b[:, 5]).abs().max() > 1e-3  # with motion, frame 5 sees frame 0
    # per-sample flags: clip 0 motion-free (independent frames), clip 1 with motion (coupled)
    flags = torch.tensor([True, False])
    a, b = model(**vid, motion_free=flags), model(**bumped, motion_free=flags)
    assert torch.equal(a[0, 1:], b[0, 1:])
    assert (a[1, 5] - b[1, 5]).abs().max() > 1e-3
    # the flag of one sample does not change another's output
    torch.testing.assert_close(a[1], model(**vid, motion_free=torch.tensor([False, False]))[1])


def test_motion_free_clip_is_the_image_model_frame_by_frame():
    """Sec. 3.3.2: the identity mask "suffices to disable temporal modeling". So a motion-free clip must be its
    frames run one at a time through the same T2V model (T = 1: the image path), frame position included:
    a clip of one image repeated gives that image's output on every frame. Random weights everywhere."""
    model = build(temporal=True)
    vid = inputs(b=2, frames=4)
    vid["x"][1] = vid["x"][1, :1]  # clip 1: one image repeated 4 times
    out = model(**vid, motion_free=torch.tensor([True, True]))
    for f in range(4):
        alone = model(**{**vid, "x": vid["x"][:, f : f + 1]}, motion_free=torch.tensor([True, True]))
        torch.testing.assert_close(out[:, f : f + 1], alone, rtol=1e-5, atol=1e-5)
        image = model(**{**vid, "x": vid["x"][:, f]})  # (B, C, H, W): the image path
        torch.testing.assert_close(out[:, f], image, rtol=1e-5, atol=1e-5)
    assert (out[1] - out[1, :1]).abs().max() < 1e-5  # the repeated image: the same output on every frame
    moving = model(**vid, motion_free=torch.tensor([False, False]))
    assert (moving[1] - moving[1, :1]).abs().max() > 1e-3  # with motion the frames differ (position, attention)


def test_temporal_sublayer_is_eq_3_to_5_written_out():
    """Eq. 3-5 by hand, one clip and one patch position at a time: the frames' tokens at that position, LayerNorm'd,
    plus the sin-cos frame position (none for a motion-free clip), attend over the T frames (softmax over all of
    them, or over itself alone when motion-free, Sec. 3.3.2) and the output projection is added to the stream.
    The block adds TemporalAttention's output to its input (Eq. 4)."""
    from model import sincos_1d
    model = build(temporal=True)  # random weights, including the zero-init output projection
    layer, T, n = model.blocks[0].temporal, 4, 5
    d, heads = layer.norm.normalized_shape[0], layer.attn.heads
    x = torch.randn(2 * T, n, d, generator=torch.Generator().manual_seed(3))  # (B T, N, D), 2 clips
    free = torch.tensor([False, True])
    with torch.no_grad():
        got = x + layer(x, T, free)
        want = torch.empty_like(x)
        pos = sincos_1d(torch.arange(T), d)
        for b in range(2):
            for j in range(n):
                seq = x[b * T:(b + 1) * T, j]  # (T, D): Eq. 3
                hh = F.layer_norm(seq, (d,), layer.norm.weight, layer.norm.bias, layer.norm.eps) + (0 if free[b] else pos)
                q, k, v = layer.attn.qkv(hh).view(T, 3, heads, d // heads).unbind(1)  # (T, h, Dh) each
                logits = torch.einsum("thc,shc->hts", q, k) / (d // heads) ** 0.5
                if free[b]:
                    logits = logits.masked_fill(~torch.eye(T, dtype=torch.bool), float("-inf"))
                o = torch.einsum("hts,shc->thc", logits.softmax(-1), v).reshape(T, d)
                want[b * T:(b + 1) * T, j] = seq + layer.attn.proj(o)  # Eq. 4, then back in place: Eq. 5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - x).abs().max() > 1e-2  # the branch is not zero


def test_unpatchify_is_dits_patch_layout():
    """The final linear layer gives each token p * p * C values, which DiT's unpatchify places as (p, q, C): output
    channel c of pixel (i, j) inside a patch is feature (i p + j) C + c. With the layer's weight zeroed and its bias
    set to 0, 1, 2, ... every patch shows that layout."""
    model = build()
    p, c = model.cfg.patch, model.cfg.in_channels
    with torch.no_grad():
        model.final_layer.linear.weight.zero_()
        model.final_layer.linear.bias.copy_(torch.arange(p * p * c, dtype=torch.float32))
        out = model(**inputs())  # (B, C, H, W)
    i, j, ch = torch.meshgrid(torch.arange(out.shape[2]) % p, torch.arange(out.shape[3]) % p, torch.arange(c),
                              indexing="ij")
    assert torch.equal(out[0], ((i * p + j) * c + ch).permute(2, 0, 1).float())


def test_padded_text_tokens_are_ignored():
    model = build()
    a = inputs()
    b = {**a, "text": a["text"].clone()}
    b["text"][0, 4:] = 100 * torch.randn(3, TEXT_DIM)  # change only the padded tokens of caption 0
    out_a, out_b = model(**a), model(**b)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-6)
    b["text"][0, 0] += 1.0  # a real token does matter
    assert (model(**b)[0] - out_a[0]).abs().max() > 1e-3


def test_pooled_text_reaches_adaln():
    for cond in ["cross_attn", "adaln"]:
        model = build(conditioning=cond)
        a = inputs()
        b = {**a, "pooled": a["pooled"] + 1}
        assert (model(**a) - model(**b)).abs().max() > 1e-3
    # and the Sec. 3.2.1 ablation switch removes it
    model = build(pooled_text=False)
    a = inputs()
    assert torch.equal(model(**a), model(**{**a, "pooled": a["pooled"] + 1}))


@pytest.mark.parametrize("size,params", [("XL", 830_310_928), ("G", 2_946_571_280)])
def test_param_counts_on_meta_device(size, params):
    # CLIP-L + T5-XXL text (4864 channels), 4-channel latents, cross-attention (Table 1 rows).
    with torch.device("meta"):
        model = GenTron(make_config(size))
    assert count_params(model) == param_formula(model.cfg) == params


@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
@pytest.mark.parametrize("frames", [None, 4])
def test_flop_formula_matches_flop_counter(conditioning, frames):
    # The closed form used for MFU against PyTorch's own count of every matmul, conv and attention.
    model = build(conditioning=conditioning, temporal=frames is not None, randomize=False)
    batch = inputs(b=2, frames=frames)
    kw = {} if frames is None else {"motion_free": None}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math SDPA is counted
        model(**batch, **kw)
    expected = 2 * flops_per_sample(model.cfg, text_len=L, frames=frames or 1, resolution=16)
    assert counter.get_total_flops() == expected


def test_resolution_change_needs_no_rebuild():
    # Multi-stage training (Sec. 4.1, 256 -> 512 px): sin-cos positions are computed for any grid.
    model = build()
    assert model(**inputs(size=32)).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
@pytest.mark.parametrize("temporal", [False, True])
def test_qk_norm_param_formula_and_identity_at_init(conditioning, temporal):
    # QK-norm adds one Dh-wide gain for the queries and one for the keys in every attention layer, and
    # changes no initial output: every block is still the identity (zero-init gates and projections).
    kw = dict(conditioning=conditioning, temporal=temporal, randomize=False)
    model, plain = build(qk_norm=True, **kw), build(**kw)
    attentions = 1 + (conditioning == "cross_attn") + temporal
    dh = model.cfg.width // model.cfg.heads
    gains = model.cfg.depth * attentions * 2 * dh
    assert count_params(model) == param_formula(model.cfg) == count_params(plain) + gains
    x = torch.randn(2, 64, model.cfg.width)
    c = torch.randn(2, model.cfg.width)
    text, mask = torch.randn(2, L, model.cfg.width), torch.ones(2, L, dtype=torch.bool)
    for block in model.blocks:
        assert torch.equal(block(x, c, text, mask), x)


def test_attention_logit_max_and_the_qk_norm_bound():
    # The failure QK-norm prevents (docs/deviations.md): attention logits q.k / sqrt(Dh) that grow with
    # the weights. Scaling block 0's QKV projection 10x scales its logits 100x; with per-head RMSNorm (unit
    # gains) |q.k| / sqrt(Dh) <= |q| |k| / sqrt(Dh) = sqrt(Dh) in every attention layer, whatever the weights.
    from evaluate import attention_logit_max

    batch = {**inputs(b=2, frames=3), "motion_free": torch.tensor([False, True])}
    for qk_norm in (False, True):
        model = build(temporal=True, randomize=False, qk_norm=qk_norm)
        before = attention_logit_max(model, **batch)
        assert {k: len(v) for k, v in before.items()} == {"self": 2, "cross": 2, "temporal": 2}  # tiny: 2 blocks
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(10), model.blocks[0].attn.qkv.bias.mul_(10)
        after = attention_logit_max(model, **batch)
        dh = model.cfg.width // model.cfg.heads
        if qk_norm:
            assert max(max(v) for v in (*before.values(), *after.values())) <= dh**0.5 + 1e-4
        else:
            assert after["self"][0] == pytest.approx(100 * before["self"][0], rel=1e-4)
            assert after["self"][0] > 10 * dh**0.5


def test_attention_logit_max_ignores_padded_text():
    # Padded caption tokens are masked out of cross-attention, so huge features there change nothing
    from evaluate import attention_logit_max

    model, batch = build(), inputs(b=2)  # caption 0 has 3 padded tokens
    text = batch["text"].clone()
    text[0, 4:] = 1e3
    assert attention_logit_max(model, **batch) == attention_logit_max(model, **{**batch, "text": text})
    text[0, 3] = 1e3  # a real token: now it shows
    assert max(attention_logit_max(model, **{**batch, "text": text})["cross"]) > 10 * max(
        attention_logit_max(model, **batch)["cross"])


@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
def test_block_and_final_layer_are_dits_adaln_written_out(conditioning):
    """Fig. 2: with the adaLN projection fixed to known values (zero weight, chosen bias), a block computes
    x + g1 * attn(LN(x) (1 + s1) + b1) [+ cross_attn(LN'(x), text)] then + g2 * mlp(LN(x) (1 + s2) + b2), the six
    vectors in DiT's order (shift, scale, gate of attention, then of the MLP); the final layer
    linear(LN(x) (1 + scale) + shift). Written out here by name, so a swapped shift/scale or gate fails."""
    model = build(conditioning=conditioning)
    block, final, d = model.blocks[0], model.final_layer, model.cfg.width
    g = torch.Generator().manual_seed(5)
    shift1, scale1, gate1, shift2, scale2, gate2 = (torch.randn(d, generator=g) for _ in range(6))
    with torch.no_grad():
        block.adaLN_modulation[1].weight.zero_()
        block.adaLN_modulation[1].bias.copy_(torch.cat([shift1, scale1, gate1, shift2, scale2, gate2]))
        final.adaLN_modulation[1].weight.zero_()
        final.adaLN_modulation[1].bias.copy_(torch.cat([shift2, scale1]))
    x, c = torch.randn(2, 9, d, generator=g), torch.randn(2, d, generator=g)
    text, mask = torch.randn(2, L, d, generator=g), torch.ones(2, L, dtype=torch.bool)
    ln = lambda v: F.layer_norm(v, (d,), eps=1e-6)
    with torch.no_grad():
        ref = x + gate1 * block.attn(ln(x) * (1 + scale1) + shift1)
        if conditioning == "cross_attn":
            ref = ref + block.cross_attn(block.norm2(ref), text, mask)
        ref = ref + gate2 * block.mlp(ln(ref) * (1 + scale2) + shift2)
        out = block(x, c, text, mask) if conditioning == "cross_attn" else block(x, c)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final(x, c), final.linear(ln(x) * (1 + scale1) + shift2), rtol=1e-5, atol=1e-5)


def test_the_timestep_conditions_the_output():
    """The time embedding reaches every block through adaLN: the same input at two timesteps gives clearly
    different predictions (a random-weight model; at init adaLN-zero makes every output 0)."""
    model = build()
    a, b = inputs(), inputs()
    b["t"] = (a["t"] + 300) % 1000
    with torch.no_grad():
        ya, yb = model(**a), model(**b)
    assert (ya - yb).abs().max() > 1e-2 * ya.abs().max()
