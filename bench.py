"""
Throughput and MFU of GenTron on one device: a training step (forward, backward, fused AdamW) and a
sampling forward pass (the CFG batch: prompts + null captions), timed with CUDA events after warm-up.

MFU = model FLOP/s / the bf16 matmul peak measured in the same run (an 8192^3 product), with model
FLOPs from model.flops_per_sample: 3x forward for a training step (recompute not counted), 1x for
sampling. Inputs are random latents and text features of the real shapes (SD-VAE latents, CLIP+T5
with `--text-len` tokens), so no weights or data are needed.

    python bench.py --size XL --batch 64 --compile                # GenTron-XL/2, 256px
    python bench.py --size XL --batch 8 --frames 8 --compile      # T2V, 8-frame clips
    python bench.py --size tiny --batch 2 --steps 2 --device cpu  # smoke test
"""

import argparse
import time

import torch

from model import GenTron, flops_per_sample, make_config
from train_t2i import matmul_peak_tflops  # the same MFU denominator as the training logs

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--size", default="XL")
p.add_argument("--conditioning", default="cross_attn", choices=["cross_attn", "adaln"])
p.add_argument("--batch", type=int, default=64, help="images (or clips) per training step / prompts per sampling pass")
p.add_argument("--resolution", type=int, default=256, help="pixels; SD-VAE latents are resolution / 8")
p.add_argument("--frames", type=int, default=1, help=">1 benchmarks the T2V model on clips")
p.add_argument("--text-len", type=int, default=120)
p.add_argument("--compile", action="store_true")
p.add_argument("--steps", type=int, default=20, help="timed iterations (after warm-up)")
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--mode", default="train,sample")
p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one training step")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def timed(fn, steps, warmup, device):
    """Median seconds per call of fn(), CUDA-event timed after warm-up (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def random_inputs(cfg, batch, resolution, frames, text_len, device, g):
    """Latents (B, [T,] 4, r/8, r/8) and CLIP+T5-shaped text with realistic padding (lengths 8..L)."""
    side = resolution // 8
    shape = (batch, cfg.in_channels, side, side) if frames == 1 else (batch, frames, cfg.in_channels, side, side)
    lengths = torch.randint(8, text_len + 1, (batch, 1), generator=g)
    return dict(
        x=torch.randn(shape, generator=g).to(device),
        t=torch.randint(0, 1000, (batch,), generator=g).to(device),
        text=torch.randn(batch, text_len, cfg.text_dim, generator=g).to(device),
        text_mask=(torch.arange(text_len)[None] < lengths).to(device),
        pooled=torch.randn(batch, cfg.pooled_dim, generator=g).to(device),
    )


def main(args):
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = make_config(args.size, conditioning=args.conditioning, temporal=args.frames > 1, num_frames=args.frames)
    model = GenTron(cfg).to(device)
    fwd = torch.compile(model) if args.compile else model
    g = torch.Generator().manual_seed(0)
    peak = matmul_peak_tflops(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    flops = flops_per_sample(cfg, args.text_len, args.frames, args.resolution // 8)
    motion = {"motion_free": torch.zeros(args.batch, dtype=torch.bool, device=device)} if args.frames > 1 else {}
    rows = []

    def report(name, seconds, samples, flops_per):
        tflops = samples * flops_per / seconds / 1e12
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
        rows.append(f"{name:<8} {samples / seconds:10.1f} {tflops:9.1f} {mfu:>7} {mem:8.1f}")

    if "train" in args.mode:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
        inp = random_inputs(cfg, args.batch, args.resolution, args.frames, args.text_len, device, g)
        noise = torch.randn_like(inp["x"])

        def train_step():
            with amp:
                loss = torch.nn.functional.mse_loss(fwd(**inp, **motion).float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report("train", timed(train_step, args.steps, args.warmup, device), args.batch, 3 * flops)
        if args.profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                train_step()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
        del opt, inp
        model.zero_grad(set_to_none=True)

    if "sample" in args.mode:
        # Sampling evaluates prompts and null captions in one batch (CFG): 2 x batch samples a pass.
        inp = random_inputs(cfg, 2 * args.batch, args.resolution, args.frames, args.text_len, device, g)
        motion2 = {k: v.repeat(2) for k, v in motion.items()}
        model.eval()

        @torch.no_grad()
        def sample_step():
            with amp:
                fwd(**inp, **motion2)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        report("sample", timed(sample_step, args.steps, args.warmup, device), 2 * args.batch, flops)

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_s = f"{peak:.0f} TFLOP/s" if peak else "n/a"
    print(f"GenTron-{args.size}/{cfg.patch} {cfg.conditioning} batch {args.batch} res {args.resolution} "
          f"frames {args.frames} compile {args.compile} | {name} | torch {torch.__version__} | matmul peak {peak_s}")
    print(f"{'mode':<8} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'mem GiB':>8}")
    print("\n".join(rows))


if __name__ == "__main__":
    main(p.parse_args())
