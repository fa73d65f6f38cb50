"""fastpath/ against model.py: the fused forwards compute what the readable model computes, outputs and gradients.

Tolerances: fp32 on the CPU, relative to the largest value, 1e-5 (the fused forms add and normalise in another
order; the packed temporal attention sums the same softmax terms with more masked ones). The Triton kernel runs on
the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported: so in a subprocess), and
on CUDA compiled, at the shapes of XL/2."""

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import fastpath.blocks as blocks
import model as readable_model
from fastpath.blocks import linear_gelu, readable, speed_up
from fastpath.sampling import cast_matmul_weights
from flops import flops_per_sample
from model import MLP, GenTron
from test_model import L, TEXT_DIM, build, inputs  # the same small random-weight models and inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def outputs_and_grads(net, batch):
    """The prediction and every parameter's gradient of a training-like loss, in parameter order."""
    net.zero_grad()
    y = net(**batch)
    y.square().mean().backward()
    return [y.detach()] + [p.grad.clone() for p in net.parameters()]


def rel_err(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item() for x, y in zip(a, b))


CASES_FAST = [("cross_attn", None), ("adaln", None), ("cross_attn", 4), ("adaln", 4)]


@pytest.mark.parametrize("conditioning,frames", CASES_FAST)
def test_fused_model_equals_the_readable_model_outputs_and_gradients(conditioning, frames):
    """speed_up swaps classes only: the same parameters and names, and (T2I, T2V with mixed motion-free flags, both
    conditionings) the same prediction and the same gradients of a training step, to 1e-5."""
    net = build(conditioning=conditioning, temporal=frames is not None).train()
    batch = inputs(b=3, frames=frames)
    if frames:
        batch["motion_free"] = torch.tensor([True, False, True])
    names = list(net.state_dict())
    want = outputs_and_grads(net, batch)
    speed_up(net)
    assert type(net.blocks[0]) is blocks.FusedBlock and list(net.state_dict()) == names
    got = outputs_and_grads(net, batch)
    assert len(got) == len(want) and rel_err(got, want) < 1e-5
    readable(net)
    assert type(net.blocks[0]) is readable_model.GenTronBlock and type(net) is GenTron


@pytest.mark.parametrize("frames", [6, 8])
def test_packed_temporal_attention_is_per_clip_attention(frames):
    """FusedTemporalAttention runs `pack` (B N) sequences as one with a block-diagonal mask; it must equal the
    readable layer, which attends over each sequence of T frames alone, with and without the motion-free identity
    mask (Sec. 3.3.2), in a random-weight model."""
    net = build(temporal=True)
    vid = inputs(b=3, frames=frames)
    seqs = 3 * (16 // 2) ** 2  # B N: 3 clips x 64 patch positions
    for flags in (None, torch.tensor([True, False, True])):
        with torch.no_grad():
            alone = net(**vid, motion_free=flags)
            speed_up(net)
            assert net.blocks[0].temporal.pack_size(seqs, frames) == 16  # 16 sequences of T <= 8 in a tile of 128
            packed = net(**vid, motion_free=flags)
            other = net(**vid, motion_free=~flags if flags is not None else torch.ones(3, dtype=torch.bool))
            readable(net)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
        assert (packed - other).abs().max() > 1e-3  # the flags matter


@pytest.mark.parametrize("frames", [None, 3])
def test_sampler_context_keeps_only_the_positions_its_captions_need(frames):
    # A sampler's captions (FusedGenTron.encode_text -> compact_caption): CLIP + T5 pad each to 77 + 120 positions and a
    # prompt fills a few of each part, so its context keeps each caption's real tokens, in order, in as many
    # positions as the longest caption needs, rounded up to 64. The predictions are the full captions' (Fig. 2b).
    model = speed_up(build(temporal=frames is not None))
    b, length = 3, 197
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[0, :12], mask[0, 77:93] = True, True  # a prompt: 12 CLIP tokens, 16 T5 tokens
    mask[1, :2], mask[1, 77] = True, True  # the empty caption (CFG's null): BOS + EOS, EOS
    g = torch.Generator().manual_seed(3)
    mask[2, torch.randperm(length, generator=g)[:45]] = True  # the longest: 45 real tokens anywhere
    x = inputs(b=b, frames=frames)
    x["text"] = torch.randn(b, length, TEXT_DIM, generator=g) * mask[..., None]  # padding rows 0, as text_encoders
    x["text_mask"] = mask
    kw = {} if frames is None else {"motion_free": torch.tensor([False, True, False])}
    caption = {k: x.pop(k) for k in ("text", "text_mask", "pooled")}
    with torch.no_grad():
        context = model.encode_text(**caption)
        assert context.text_mask.shape == (b, 64) and context.kv[0][0].shape[2] == 64
        assert torch.equal(context.text_mask.sum(1), mask.sum(1))  # every real token kept
        kept = context.text_mask[0].nonzero()[:, 0]  # the prompt's own tokens, in their order, at the front
        torch.testing.assert_close(context.text[0, kept], model.text_proj(caption["text"][0, mask[0]]))
        torch.testing.assert_close(model(**x, **kw, context=context), model(**x, **kw, **caption), rtol=0, atol=1e-5)
        mask[2, :70] = True  # a longer caption: two rows of 64; one of 197 real tokens: all 197
        assert model.encode_text(**caption).text.shape[1] == 128
        assert model.encode_text(**caption, keys_values=False).text.shape[1] == length  # training: as given
        mask[2] = True
        assert model.encode_text(**caption).text.shape[1] == length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused GELU runs on CUDA only (run on a GPU machine)")
def test_fused_linear_gelu_is_the_tanh_gelu_on_cuda():
    """Sampling on CUDA runs fc1 + GELU as one cuBLASLt GEMM (blocks.linear_gelu): in fp32 it is the tanh GELU of
    the MLP (not the erf form) to float precision, and under bf16 autocast the MLP agrees with the plain path."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    mlp = speed_up(MLP(256, 1024).cuda())
    x = torch.randn(4, 64, 256, device="cuda")
    with torch.no_grad():
        h = linear_gelu(x, mlp.fc1)
        pre = mlp.fc1(x)
        assert (h - F.gelu(pre, approximate="tanh")).abs().max() < 1e-5
        assert (h - F.gelu(pre)).abs().max() > 1e-4  # the erf GELU differs visibly
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fused = mlp(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = mlp(x)  # grad enabled: the unfused path
    assert fused.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fused.float(), plain.float(), rtol=2e-2, atol=2e-2)


CUDA = [pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
def test_bf16_stored_weights_give_the_same_autocast_outputs(device, conditioning):
    """Sampling stores the Linear and Conv weights in bf16 (cast_matmul_weights): under bf16 autocast, which
    computes those layers in bf16 anyway, the image and video outputs must be bit for bit what the fp32 weights
    give (on CUDA through the fused GELU GEMM and the add_norm kernel), while the norm gains stay fp32."""
    model = speed_up(build(conditioning=conditioning, temporal=True)).to(device)
    batches = [inputs(), {**inputs(frames=3), "motion_free": torch.tensor([True, False])}]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        ref = [model(**b) for b in batches]
        cast_matmul_weights(model)
        out = [model(**b) for b in batches]
    assert model.blocks[0].mlp.fc1.weight.dtype == model.patch_embed.bias.dtype == torch.bfloat16
    assert model.blocks[0].temporal.norm.weight.dtype == torch.float32
    for r, o in zip(ref, out):
        assert r.abs().max() > 0.1 and torch.equal(o, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused attention kernels run on CUDA (run on a GPU machine)")
def test_packed_temporal_attention_on_cuda_kernels():
    """On a GPU the packed sequences go through the fused SDPA kernels with a block-diagonal mask. Under bf16
    autocast the packed layer must be as close to the fp32 per-clip attention as the unpacked layer is."""
    torch.manual_seed(0)
    layer = blocks.FusedTemporalAttention(576, 8).cuda()  # Dh = 72, as XL/2
    torch.nn.init.normal_(layer.attn.proj.weight, std=0.05)  # not the zero init: the branch must show
    x = torch.randn(4 * 256, 8, 576, device="cuda")  # (B N, T, D): 4 clips x 256 patch positions, 8 frames
    for flags in (None, torch.tensor([True, False, False, True], device="cuda")):
        with torch.no_grad():
            layer.tile = 8  # one clip per sequence: the unpacked layer
            ref = layer(x, 8, flags)  # fp32 (the layer's output: the branch)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                alone = layer(x, 8, flags)
                layer.tile = 128  # 128 // 8 = 16 sequences per pack
                packed = layer(x, 8, flags)
        err_packed, err_alone = ((packed - ref).abs().max() / ref.abs().max()).item(), ((alone - ref).abs().max() / ref.abs().max()).item()
        assert err_packed < max(2 * err_alone, 1e-3) and err_packed < 2e-2, (err_packed, err_alone)


@pytest.mark.parametrize("conditioning", ["cross_attn", "adaln"])
@pytest.mark.parametrize("frames", [None, 4])
def test_a_step_with_the_caption_encoded_once_does_the_rest_of_the_flops(conditioning, frames):
    # The closed form of flops.py: a sampling step given the caption's context does the forward pass's FLOPs minus
    # the caption's share (pooled-text MLP, text projection, cross-attention keys and values), and no less.
    model = speed_up(build(conditioning=conditioning, temporal=frames is not None, randomize=False), pack=False)
    batch = inputs(b=2, frames=frames)
    kw = {} if frames is None else {"motion_free": None}
    expected = 2 * flops_per_sample(model.cfg, text_len=L, frames=frames or 1, resolution=16)
    caption = {k: batch.pop(k) for k in ("text", "text_mask", "pooled")}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        context = model.encode_text(**caption)
        with FlopCounterMode(display=False) as step:
            model(**batch, **kw, context=context)
    rest = 2 * flops_per_sample(model.cfg, text_len=L, frames=frames or 1, resolution=16, caption=False)
    assert step.get_total_flops() == rest < expected == counter.get_total_flops()


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

CASES = r'''
import torch, torch.nn as nn
import model
from fastpath import blocks, kernels

def run(fn, x, branch, gate, norm, shift, scale, seed=1, **kw):
    """(r, h) and the gradients of a random projection of both w.r.t. every input that has one."""
    ins = [t for t in (x, branch, gate, shift, scale, norm.weight) if t is not None and t.requires_grad]
    r, h = fn(x, branch, gate, norm, shift, scale, **kw)
    g = torch.Generator().manual_seed(seed)
    # the same weights in every dtype: bf16-representable, drawn on the CPU
    w = lambda t: torch.randn(t.shape, generator=g).bfloat16().to(t.device, t.dtype)
    loss = (r * w(r)).sum() + (h * w(h)).sum()
    return [r, h, *torch.autograd.grad(loss, ins)]

def cases(S, N, D, dtype, device="cpu"):
    t = lambda *shape: torch.randn(*shape, dtype=dtype, device=device).requires_grad_()
    plain = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
    affine = nn.LayerNorm(D, eps=1e-6, device=device, dtype=dtype)
    with torch.no_grad():
        affine.weight.normal_(); affine.bias.normal_()
    yield "gated branch, adaLN", (t(S, N, D), t(S, N, D), t(S, 1, D), plain, t(S, 1, D), t(S, 1, D))
    yield "ungated branch, affine LayerNorm", (t(S, N, D), t(S, N, D), None, affine, None, None)
    yield "no branch, adaLN", (t(S, N, D), None, None, plain, t(S, 1, D), t(S, 1, D))

def reference(x, branch, gate, norm, shift, scale, **kw):
    saved, blocks.kernels = blocks.kernels, None
    try:
        return blocks.add_norm(x, branch, gate, norm, shift, scale, **kw)
    finally:
        blocks.kernels = saved
'''


def interpret(code):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", CASES + code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@requires_triton
def test_fused_add_norm_matches_the_pytorch_math_in_the_interpreter():
    out = interpret(r'''
for chunk in (1, 4, 16):  # backward: tokens per program (of the 9 per group): 1, 4 (the last partly masked), all
    kernels.CHUNK = chunk
    for name, args in cases(3, 9, 40, torch.float32):
        fused, ref = run(blocks.add_norm, *args), run(reference, *args)
        err = max((a - b).abs().max().item() for a, b in zip(fused, ref))
        print(chunk, name, len(fused), err)
        assert len(fused) == len(ref) and err < 1e-5, (name, err)
# the temporal layer's layouts (Eq. 3, 5): 2 clips of T = 3 frames; the branch comes as, or h goes as, (B N, T, D)
kernels.CHUNK = 4
for bf, hf in ((3, 0), (0, 3), (3, 3)):
    for name, (x, branch, *rest) in cases(6, 9, 40, torch.float32):
        args = (x, branch.view(-1, 3, 40) if bf and branch is not None else branch, *rest)
        fused = run(blocks.add_norm, *args, branch_frames=bf, h_frames=hf)
        ref = run(reference, *args, branch_frames=bf, h_frames=hf)
        err = max((a - b).abs().max().item() for a, b in zip(fused, ref))
        print(bf, hf, name, len(fused), err)
        assert len(fused) == len(ref) and fused[1].shape == ref[1].shape and err < 1e-5, (bf, hf, name, err)
''')
    assert out.count("\n") == 18


@requires_triton
def test_fused_model_with_the_triton_kernel_equals_the_readable_model():
    # the whole model through the kernel (self-, cross- and temporal attention, motion-free flags), image and video,
    # both conditionings: prediction and every gradient of a training step, in the interpreter
    out = interpret(r'''
for temporal in (False, True):
  for conditioning in ("cross_attn", "adaln"):
    cfg = model.make_config("tiny", input_size=8, text_dim=16, pooled_dim=8, temporal=temporal, num_frames=3,
                            conditioning=conditioning)
    torch.manual_seed(0)
    m = model.GenTron(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)  # no zero-init: every branch contributes
    x = torch.randn(2, 3, 4, 8, 8) if temporal else torch.randn(2, 4, 8, 8)
    kw = dict(t=torch.tensor([3, 500]), text=torch.randn(2, 5, 16), pooled=torch.randn(2, 8),
              text_mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]).bool(),
              motion_free=torch.tensor([True, False]) if temporal else None)
    outs = []
    for fast in (True, False):
        (blocks.speed_up if fast else blocks.readable)(m)
        m.zero_grad()
        y = m(x, **kw)
        y.square().mean().backward()
        outs.append([y.detach()] + [p.grad.clone() for p in m.parameters()])
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*outs))
    print(temporal, conditioning, err)
    assert err < 1e-5, (temporal, conditioning, err)
''')
    assert out.count("\n") == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_add_norm_on_cuda_compiled_bf16():
    # XL/2 shapes (64 images x 256 tokens x 1152) in bf16, compiled as training compiles the model; against the
    # PyTorch math in fp32 the fused kernel must be at least as close as the unfused bf16 path
    ns = {}
    exec(CASES, ns)
    from fastpath import blocks
    for name, args in ns["cases"](64, 256, 1152, torch.bfloat16, "cuda"):
        fused = ns["run"](torch.compile(blocks.add_norm), *args)
        unfused = ns["run"](ns["reference"], *args)
        exact = ns["run"](ns["reference"], *[a.detach().float().requires_grad_() if torch.is_tensor(a) else
                                             (copy.deepcopy(a).float() if a is not None else a) for a in args])
        for i, (f, u, e) in enumerate(zip(fused, unfused, exact)):
            scale = e.abs().max()
            ef, eu = ((f.float() - e).abs().max() / scale).item(), ((u.float() - e).abs().max() / scale).item()
            assert ef <= max(2 * eu, 1e-2), (name, i, ef, eu)
    # the temporal layer's layouts (8 clips x 8 frames): the branch comes as, h goes as, (B N, T, D)
    for name, (x, branch, *rest) in ns["cases"](64, 256, 1152, torch.bfloat16, "cuda"):
        args = (x, None if branch is None else branch.view(-1, 8, 1152), *rest)
        fused = ns["run"](torch.compile(blocks.add_norm), *args, branch_frames=8, h_frames=8)
        unfused = ns["run"](ns["reference"], *args, branch_frames=8, h_frames=8)
        for i, (f, u) in enumerate(zip(fused, unfused)):
            assert f.shape == u.shape and ((f.float() - u.float()).abs().max() / u.float().abs().max()).item() < 2e-2, (name, i)


@pytest.mark.parametrize("video", [False, True])
def test_bundled_models_load_into_both_and_sample_the_same(video):
    """The bundled checkpoints hold model.py's parameter names: they load strictly into the readable model and
    into the fused one, and both sample the same pictures (8-bit pixels; the fused path sums the same terms in
    another order, so a pixel may move by one level)."""
    from pipeline import generate, load_model

    prompts = ["a red circle moving right", "a blue square moving down"] if video else \
        ["a red circle to the left of a blue square", "a green triangle and a yellow diamond"]
    out = {}
    for fast in (False, True):
        model, meta = load_model(None, device="cpu", video=video, fast=fast)
        assert isinstance(model, blocks.FusedGenTron) == fast
        out[fast] = generate(model, meta, prompts, steps=6, progress=False).int()
    diff = (out[True] - out[False]).abs()
    assert out[True].float().std() > 10  # real pictures, not a blank
    assert diff.max() <= 2 and diff.float().mean() < 0.05, (diff.max().item(), diff.float().mean().item())
