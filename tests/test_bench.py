"""bench.py on CPU: the single-device smoke test, the FSDP2 path of fsdp.build_model in one process, the
--max-batch search (its FLOP formula is pinned in test_model.py)."""

import os
import subprocess
import sys

from types import SimpleNamespace

from bench import kernel_families, largest_batch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--resolution", "64"]


def bench(*argv):
    """(header line, {mode: row fields}) of a bench.py run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "bench.py", *TINY, *argv], capture_output=True, text=True, timeout=300,
                         cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("train", "sample"))}
    return next(line for line in lines if line.startswith("GenTron-")), rows


def test_bench_cpu_smoke():
    _, rows = bench()
    assert set(rows) == {"train", "sample"} and all(float(r[1]) > 0 for r in rows.values())  # samples/s > 0


def test_bench_fsdp_one_process():
    # fsdp.build_model on a 1-process gloo group, with activation checkpointing and a fixed SDPA backend
    header, rows = bench("--fsdp", "--ac", "--attention", "math", "--mode", "train")
    assert set(rows) == {"train"} and float(rows["train"][1]) > 0
    assert "batch 2/GPU" in header and "fsdp x1 ac 1" in header and "attention math" in header
    # without checkpointing one rank has nothing to shard: the plain model, as train_t2i.py trains it
    header, rows = bench("--fsdp", "--mode", "train")
    assert float(rows["train"][1]) > 0 and "as trained: unsharded x1" in header and "fsdp x1" not in header


def test_largest_batch_doubles_until_the_first_failure():
    tried = []
    fits = lambda b: tried.append(b) or b <= 48
    assert largest_batch(fits, 8, 4096) == 32 and tried == [8, 16, 32, 64]  # doubling: 48 itself is never tried
    assert largest_batch(fits, 64, 4096) is None  # not even the start fits
    assert largest_batch(lambda b: True, 8, 100) == 64  # stops at the limit with memory to spare


def test_kernel_families_sum_a_profile_by_kind():
    # names as they appear in an H100 profile of the compiled XL/2 step (docs/performance.md, "Where the time goes")
    ev = lambda key, us, n: SimpleNamespace(key=key, self_device_time_total=us, count=n)
    events = [ev("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", 25_000, 196),
              ev("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16", 13_000, 56),
              ev("void cudnn::fusion::compute_dot_do_o<true>(void const*, void const*, void*, void*, ...", 3_300, 56),
              ev("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, ...", 2_500, 56),
              ev("triton_red_fused__to_copy_add_mul_native_layer_norm_split_unsqueeze_view_27", 3_500, 27),
              ev("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata<4>>", 8_800, 41),
              ev("_add_norm_fwd_kernel", 2_000, 84), ev("_add_norm_bwd_kernel", 3_000, 84),
              ev("sm90_xmma_fprop_implicit_gemm_bf16bf16", 1_000, 1), ev("Memset (Device)", 500, 511),
              ev("a CPU-side op", 0, 3)]
    fams = kernel_families(SimpleNamespace(key_averages=lambda: events))
    assert fams == {"gemm": (26.0, 197), "attention": (18.8, 168), "optimizer": (8.8, 41), "add_norm": (5.0, 168),
                    "triton fused": (3.5, 27), "other": (0.5, 511)}
    assert list(fams) == ["gemm", "attention", "optimizer", "add_norm", "triton fused", "other"]  # largest first
    # (cuDNN's attention backward runs dot(dO, O) and the dQ conversion as kernels of their own: attention too)


def test_bad_flags_are_usage_errors():
    for argv, message in ((["--batch", "0"], "--batch must be >= 1, got 0"),
                          (["--resolution", "72"], "--resolution 72 must be a multiple of 16 (SD-VAE downsampling 8 x patch 2)")):
        out = subprocess.run([sys.executable, "bench.py", *TINY, *argv], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 2 and out.stderr.strip().endswith(f"bench.py: error: {message}"), out.stderr[-2000:]


def test_peer_flags_and_repository_are_checked(tmp_path):
    for argv, message in ((["--peer", "dit"], "--peer needs --peer-repo PATH and times XL/2 images on one device"),
                          (["--peer", "dit", "--peer-repo", str(tmp_path), "--size", "XL"],
                           f"--peer dit: {tmp_path} holds no models.py: pass a clone of facebookresearch/DiT")):
        out = subprocess.run([sys.executable, "bench.py", *TINY, *argv], capture_output=True, text=True, timeout=300,
                             cwd=REPO)
        assert out.returncode == 2 and f"bench.py: error: {message}" in out.stderr, out.stderr[-2000:]


FAKE_DIT = """
import torch.nn as nn
class Net(nn.Module):
    def __init__(self, input_size):
        super().__init__()
        self.embed, self.out = nn.Conv2d(4, 1152, 2, 2), nn.ConvTranspose2d(1152, 8, 2, 2)
    def forward(self, x, t, y):
        return self.out(self.embed(x))
def DiT_XL_2(input_size):
    return Net(input_size)
"""


def test_peer_is_timed_in_the_same_harness_with_its_flops_counted(tmp_path):
    # a stand-in for DiT's models.py (the real one needs timm): a 2x2 patch convolution and its inverse
    (tmp_path / "models.py").write_text(FAKE_DIT)
    argv = ["--peer", "dit", "--peer-repo", str(tmp_path), "--batch", "2", "--steps", "1", "--warmup", "1",
            "--device", "cpu", "--resolution", "64"]
    out = subprocess.run([sys.executable, "bench.py", *argv], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("DiT-XL/2 (facebookresearch/DiT models.py) batch 2 res 64") and "its own code" in lines[0]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("train", "sample"))}
    assert set(rows) == {"train", "sample"} and all(float(r[1]) > 0 for r in rows.values())
    # its FLOPs: 2 x multiply-adds of both convolutions at 8 x 8 tokens (64px, SD-VAE / 8, patch 2), per sample
    import torch
    from bench import counted_flops
    from peers import Peer
    model = Peer("dit", str(tmp_path), 8)
    x = torch.randn(3, 4, 8, 8)
    assert counted_flops(model, dict(x=x, t=torch.zeros(3, dtype=torch.long)), torch.no_grad()) == \
        2 * (4 * 4 * 1152 + 1152 * 4 * 8) * 4 * 4
    assert model.training and model(x, torch.zeros(3, dtype=torch.long)).shape == x.shape  # the noise's 4 channels


def test_xformers_stand_in_is_attention_within_each_block():
    import torch
    from peers import BlockDiagonalMask, memory_efficient_attention
    g = torch.Generator().manual_seed(0)
    B, N, L, H, K = 3, 5, 7, 2, 4  # PixArt's cross-attention: B images of N queries, each against its L keys
    q, k, v = (torch.randn(1, B * n, H, K, generator=g, dtype=torch.float64) for n in (N, L, L))
    out = memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalMask.from_seqlens([N] * B, [L] * B))
    for b in range(B):
        qb, kb, vb = q[0, b * N:(b + 1) * N], k[0, b * L:(b + 1) * L], v[0, b * L:(b + 1) * L]  # (tokens, H, K)
        weights = torch.einsum("nhk,lhk->hnl", qb, kb).div(K ** 0.5).softmax(-1)
        expected = torch.einsum("hnl,lhk->nhk", weights, vb)
        assert torch.allclose(out[0, b * N:(b + 1) * N], expected, atol=1e-12)
    # PixArt's self-attention: no bias, a plain batch
    x = torch.randn(B, N, H, K, generator=g, dtype=torch.float64)
    expected = torch.einsum("bhnm,bmhk->bnhk", torch.einsum("bnhk,bmhk->bhnm", x, x).div(K ** 0.5).softmax(-1), x)
    assert torch.allclose(memory_efficient_attention(x, x, x), expected, atol=1e-12)
    try:  # blocks of unequal lengths would need a padding mask, which the stand-in does not build
        memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalMask.from_seqlens([N] * B, [L - 1, L, L + 1]))
        raise AssertionError("unequal blocks were accepted")
    except NotImplementedError:
        pass
