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
