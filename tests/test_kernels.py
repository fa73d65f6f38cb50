"""kernels.py: the fused residual + LayerNorm + modulate kernel equals model.add_norm's PyTorch math, forward and
backward. On the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported: so in a
subprocess); on CUDA compiled, at the shapes of XL/2."""

import copy
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
triton = pytest.importorskip("triton")

CASES = r'''
import torch, torch.nn as nn
import model
from fastpath import kernels

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
    saved, model.kernels = model.kernels, None
    try:
        return model.add_norm(x, branch, gate, norm, shift, scale, **kw)
    finally:
        model.kernels = saved
'''


def interpret(code):
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, "-c", CASES + code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_fused_add_norm_matches_the_pytorch_math_in_the_interpreter():
    out = interpret(r'''
for chunk in (1, 4, 16):  # backward: tokens per program (of the 9 per group): 1, 4 (the last partly masked), all
    kernels.CHUNK = chunk
    for name, args in cases(3, 9, 40, torch.float32):
        fused, ref = run(model.add_norm, *args), run(reference, *args)
        err = max((a - b).abs().max().item() for a, b in zip(fused, ref))
        print(chunk, name, len(fused), err)
        assert len(fused) == len(ref) and err < 1e-5, (name, err)
# the temporal layer's layouts (Eq. 3, 5): 2 clips of T = 3 frames; the branch comes as, or h goes as, (B N, T, D)
kernels.CHUNK = 4
for bf, hf in ((3, 0), (0, 3), (3, 3)):
    for name, (x, branch, *rest) in cases(6, 9, 40, torch.float32):
        args = (x, branch.view(-1, 3, 40) if bf and branch is not None else branch, *rest)
        fused = run(model.add_norm, *args, branch_frames=bf, h_frames=hf)
        ref = run(reference, *args, branch_frames=bf, h_frames=hf)
        err = max((a - b).abs().max().item() for a, b in zip(fused, ref))
        print(bf, hf, name, len(fused), err)
        assert len(fused) == len(ref) and fused[1].shape == ref[1].shape and err < 1e-5, (bf, hf, name, err)
''')
    assert out.count("\n") == 18


def test_model_with_fused_kernels_matches_the_model_without():
    # the whole block (self-, cross- and temporal attention, motion-free flags), image and video, in the interpreter
    out = interpret(r'''
for temporal in (False, True):
    cfg = model.make_config("tiny", input_size=8, text_dim=16, pooled_dim=8, temporal=temporal, num_frames=3)
    torch.manual_seed(0)
    m = model.GenTron(cfg)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)  # no zero-init: every branch contributes
    x = torch.randn(2, 3, 4, 8, 8) if temporal else torch.randn(2, 4, 8, 8)
    kw = dict(t=torch.tensor([3, 500]), text=torch.randn(2, 5, 16), pooled=torch.randn(2, 8),
              text_mask=torch.tensor([[1] * 5, [1, 1, 0, 0, 0]]).bool(),
              motion_free=torch.tensor([True, False]) if temporal else None)
    outs = []
    for use in (kernels, None):
        model.kernels = use
        m.zero_grad()
        y = m(x, **kw)
        y.square().mean().backward()
        outs.append([y.detach()] + [p.grad.clone() for p in m.parameters()])
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*outs))
    print(temporal, err)
    assert err < 1e-5, (temporal, err)
''')
    assert out.count("\n") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_add_norm_on_cuda_compiled_bf16():
    # XL/2 shapes (64 images x 256 tokens x 1152) in bf16, compiled as training compiles the model; against the
    # PyTorch math in fp32 the fused kernel must be at least as close as the unfused bf16 path
    ns = {}
    exec(CASES, ns)
    import model
    for name, args in ns["cases"](64, 256, 1152, torch.bfloat16, "cuda"):
        fused = ns["run"](torch.compile(model.add_norm), *args)
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
        fused = ns["run"](torch.compile(model.add_norm), *args, branch_frames=8, h_frames=8)
        unfused = ns["run"](ns["reference"], *args, branch_frames=8, h_frames=8)
        for i, (f, u) in enumerate(zip(fused, unfused)):
            assert f.shape == u.shape and ((f.float() - u.float()).abs().max() / u.float().abs().max()).item() < 2e-2, (name, i)
