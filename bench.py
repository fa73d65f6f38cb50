"""
Throughput and MFU of GenTron: a training step (forward, backward, fused AdamW) and a sampling step: a
forward pass over the CFG batch (prompts + null captions) with the captions' share encoded once before
the steps, as sample.py runs it (fastpath: FusedGenTron.encode_text; --readable or an FSDP2-sharded model runs
the whole forward). Both
are timed with CUDA events over steps run back to back after warm-up. One device by
default; with --fsdp (implied under torchrun) the model is built exactly as train_t2i.py trains it
(fsdp.build_model): FSDP2 (--fsdp-unit blocks per unit) across ranks or with activation checkpointing (--ac: every
block, --ac N: every N-th), unsharded on one rank without it; bf16 compute, torch.compile, AdamW with the gradient
norm on the shards (fsdp.ShardedAdamW).

MFU = model FLOP/s / the bf16 matmul peak measured in the same run (an 8192^3 product), with model
FLOPs from flops.flops_per_sample: 3x forward for a training step (recompute not counted), 1x for
sampling, less the captions' share where it is encoded once, at the text positions the step keeps
(text_encoders.compact_caption; all --text-len of them in training, where the captions come as given). With --fsdp, --batch is per GPU, samples/s is global (summed over ranks), TFLOP/s and MFU
are per GPU and memory is the largest over ranks. Inputs are random latents and text features of the
real shapes (SD-VAE latents, CLIP+T5 with `--text-len` tokens), so no weights or data are needed.

    python bench.py --size XL --batch 64 --compile                # GenTron-XL/2, 256px
    python bench.py --size XL --batch 8 --frames 8 --compile      # T2V, 8-frame clips
    python bench.py --size XL --batch 16 --mode sample --cuda-graph  # sampling as sample.py runs it on a GPU
    python bench.py --size XL --batch 64 --compile --readable     # model.py as written, compiled
    python bench.py --size XL --batch 64 --max-batch --mode train # the largest batch that fits
    torchrun --nproc_per_node 2 bench.py --size G --fsdp --ac 2 --compile --batch 96 --mode train
    python bench.py --size tiny --batch 2 --steps 2 --device cpu  # smoke test
    python bench.py --peer dit --peer-repo ../DiT --compile --mode train  # DiT-XL/2's own code, same harness
"""

import argparse
import dataclasses
import gc
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flops import flops_per_sample
import fastpath
from fastpath.sampling import cast_matmul_weights, sampling_step
from model import SIZES, GenTron, make_config
from peers import PEERS, Peer
# the model, optimizer and logging as training builds them
from fsdp import ShardedAdamW, build_model, matmul_peak_tflops, mixed_precision, print0, setup_distributed

# Flash attention takes no mask, and cross-attention (and T2V temporal attention) pass a boolean one:
# "flash" also allows the memory-efficient kernel, which then runs exactly the masked calls.
ATTENTION = {"flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
             "efficient": [SDPBackend.EFFICIENT_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
             "math": [SDPBackend.MATH]}
MAX_BATCH = 8192  # per GPU: where the --max-batch doubling stops even if memory is left

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--size", default="XL", choices=list(SIZES))
p.add_argument("--conditioning", default="cross_attn", choices=["cross_attn", "adaln"])
p.add_argument("--batch", type=int, default=64,
               help="images (or clips) per training step / prompts per sampling pass; per GPU with --fsdp")
p.add_argument("--resolution", type=int, default=256, help="pixels; SD-VAE latents are resolution / 8")
p.add_argument("--frames", type=int, default=1, help=">1 benchmarks the T2V model on clips")
p.add_argument("--text-len", type=int, default=120, help="text tokens per caption, padding included")
p.add_argument("--max-tokens", type=int, default=None, metavar="N",
               help="real tokens per caption drawn from 8..N (default --text-len); the rest is masked padding. "
                    "sample.py's prompts fill ~10-40 of CLIP + T5's 197")
p.add_argument("--compile", action="store_true", help="torch.compile the model (with --fsdp: as fsdp.build_model does)")
p.add_argument("--compile-mode", default=None,
               help="torch.compile mode, e.g. reduce-overhead or max-autotune-no-cudagraphs (not with --fsdp)")
p.add_argument("--fsdp", action="store_true", help="the model as training builds it (fsdp.build_model: FSDP2 across "
               "ranks or with --ac, else the plain model) and its optimizer (implied when WORLD_SIZE > 1)")
p.add_argument("--ac", type=int, nargs="?", const=1, default=0, metavar="N",
               help="activation checkpointing of every N-th block (--ac alone: every block; needs --fsdp)")
p.add_argument("--fsdp-unit", type=int, default=4, metavar="K",
               help="with --fsdp: consecutive blocks per FSDP2 unit where blocks are sharded (as train_t2i.py)")
p.add_argument("--attention", default="auto", choices=["auto", *ATTENTION],
               help="SDPA backend for the timed steps (auto: PyTorch picks). flash also allows efficient, "
                    "because flash takes no mask: the masked cross-attention calls then run the efficient kernel")
p.add_argument("--readable", action="store_true",
               help="model.py's forwards as written: none of fastpath's pieces (default: all of them, as training and "
                    "sample.py run on CUDA)")
PIECES = ("pack", "gelu", "context", "bf16")
p.add_argument("--without", default="", metavar="PIECES",
               help="fastpath pieces to leave out, comma-separated: pack (temporal sequence packing), gelu (GELU in the "
                    "GEMM epilogue), context (the caption's share encoded once per batch), bf16 (weights stored in bf16)")
p.add_argument("--cuda-graph", action="store_true",
               help="sampling: replay each step as a CUDA graph, as sample.py does on CUDA (fastpath.sampling.CUDAGraphStep)")
p.add_argument("--max-batch", action="store_true",
               help="CUDA: double --batch until out of memory; report the largest that fit (per GPU)")
p.add_argument("--steps", type=int, default=20, help="timed iterations (after warm-up)")
p.add_argument("--warmup", type=int, default=5)
p.add_argument("--mode", default="train,sample")
p.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step of each mode")
p.add_argument("--device", default=None, help="default: cuda (cuda:LOCAL_RANK with --fsdp) if available, else cpu")
p.add_argument("--peer", default=None, choices=["dit", "pixart"],
               help="time DiT-XL/2 or PixArt-XL/2, built by their own code (peers.py), instead of GenTron; its FLOPs "
                    "counted by PyTorch's FLOP counter")
p.add_argument("--peer-repo", default=None, metavar="PATH",
               help="with --peer: a clone of github.com/facebookresearch/DiT or github.com/PixArt-alpha/PixArt-alpha")


def timed(fn, steps, warmup, device):
    """Seconds per call of fn() over `steps` calls back to back after warm-up, CUDA-event timed (wall clock on
    CPU). No sync between calls, as in training, so the host may run ahead: host time hidden behind GPU work
    does not count, host time the GPU waits for does."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def largest_batch(fits, start, limit):
    """Doubling search, not bisection: try start, 2 start, 4 start, ... up to limit and stop at the first
    batch for which fits(batch) is False. Returns the last batch that fit (None if start did not), so
    the true largest batch lies in [result, 2 x result)."""
    best, batch = None, start
    while batch <= limit and fits(batch):
        best, batch = batch, 2 * batch
    return best


def all_ranks(value, op, device):
    """value reduced over the ranks (op: dist.ReduceOp.SUM or MAX); value itself in a single process."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), device=device)  # NCCL reduces only CUDA tensors
    dist.all_reduce(t, op=op)
    return t.item()


def out_of_memory(fn, device):
    """fn() on every rank -> True on every rank if it ran out of GPU memory on any, so all ranks take the same
    branch next (else one would wait alone in a collective). measure() asks after the first step too, where
    memory runs out: a rank that ran out in the optimizer step meets the others here, not in the next all-gather.
    One running out while the others wait in an all-gather would hang them; equal batches and shards prevent it."""
    try:
        fn()
        oom = False
    except torch.cuda.OutOfMemoryError:
        oom = True
    return all_ranks(oom, dist.ReduceOp.MAX, device) > 0


def kernel_families(prof):
    """{family: (ms, calls)} of a profiled step's CUDA kernels: GEMM, attention, optimizer, kernels.py's
    add_norm, Inductor's fused (triton) kernels, other; the answer to "where does the time go" that the
    per-kernel table spreads out."""
    def family(name):
        n = name.lower()
        if any(s in n for s in ("nvjet", "gemm", "cutlass", "xmma")):
            return "gemm"
        # cuDNN's attention backward also runs dot(dO, O) and dQ's fp32 -> bf16 conversion as kernels of their own
        if any(s in n for s in ("flash", "fmha", "sdpa", "attention", "mha", "dot_do_o", "convert_dq")):
            return "attention"
        if "adam" in n or "multi_tensor" in n:
            return "optimizer"
        if "add_norm" in n:
            return "add_norm"
        return "triton fused" if n.startswith("triton") else "other"

    out = {}
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            f = family(e.key)
            ms, calls = out.get(f, (0.0, 0))
            out[f] = (ms + e.self_device_time_total / 1e3, calls + e.count)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


def random_inputs(cfg, batch, resolution, frames, text_len, device, g, max_tokens=None):
    """Latents (B, [T,] 4, r/8, r/8) and CLIP+T5-shaped text with padding (lengths 8..max_tokens, default L)."""
    side = resolution // 8
    shape = (batch, cfg.in_channels, side, side) if frames == 1 else (batch, frames, cfg.in_channels, side, side)
    lengths = torch.randint(8, (max_tokens or text_len) + 1, (batch, 1), generator=g)
    return dict(
        x=torch.randn(shape, generator=g).to(device),
        t=torch.randint(0, 1000, (batch,), generator=g).to(device),
        text=torch.randn(batch, text_len, cfg.text_dim, generator=g).to(device),
        text_mask=(torch.arange(text_len)[None] < lengths).to(device),
        pooled=torch.randn(batch, cfg.pooled_dim, generator=g).to(device),
    )


def counted_flops(model, inputs, amp):
    """Forward FLOPs per sample of model(**inputs) in eval mode, by PyTorch's FLOP counter (2 x multiply-adds)."""
    with torch.no_grad(), amp, FlopCounterMode(display=False) as counter:
        model.eval()(**inputs)
    model.train()
    return counter.get_total_flops() / len(inputs["x"])


def main(args):
    args.fsdp = args.fsdp or int(os.environ.get("WORLD_SIZE", 1)) > 1
    for name, lo in (("batch", 1), ("resolution", 8), ("frames", 1), ("text_len", 8), ("steps", 1), ("warmup", 0), ("ac", 0)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if args.max_tokens is not None and not 8 <= args.max_tokens <= args.text_len:
        p.error(f"--max-tokens must be in 8..--text-len ({args.text_len}), got {args.max_tokens}")
    if set(args.mode.split(",")) - {"train", "sample"}:
        p.error(f"--mode is train, sample or train,sample; got {args.mode}")
    if args.ac and not args.fsdp:
        p.error("--ac needs --fsdp (activation checkpointing is applied by fsdp.build_model)")
    if args.compile_mode and (args.fsdp or not args.compile):
        p.error("--compile-mode applies to --compile without --fsdp (fsdp.build_model compiles in the default mode)")
    if args.cuda_graph and (args.compile or args.fsdp or "sample" not in args.mode):
        p.error("--cuda-graph records the eager sampling step: drop --compile, --fsdp and --mode train")
    without = set(filter(None, args.without.split(",")))
    if without - set(PIECES):
        p.error(f"--without takes {', '.join(PIECES)}; got {args.without}")
    if args.peer and (not args.peer_repo or args.fsdp or args.cuda_graph or args.size != "XL" or args.frames > 1):
        p.error("--peer needs --peer-repo PATH and times XL/2 images on one device: no --fsdp, --cuda-graph, "
                "--size or --frames")
    if args.readable or args.peer:
        without = set(PIECES)
    if args.cuda_graph and "context" in without:
        p.error("--cuda-graph records a step given the captions' context: drop --readable / --without context")
    if args.fsdp_unit < 1:
        p.error(f"--fsdp-unit must be at least 1, got {args.fsdp_unit}")
    if args.fsdp:  # a 1-process group under plain python, so one code path for any number of GPUs
        try:
            rank, world, device, created = setup_distributed(args.device)
        except ValueError as e:  # a bad --device
            p.error(str(e))
    else:
        rank, world, created = 0, 1, False
        try:
            device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            p.error(f"--device {args.device!r} is not a device: cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} asks for a GPU, but PyTorch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # Triton kernels and CUDA graphs run on the current device
    if args.cuda_graph and device.type != "cuda":
        p.error("--cuda-graph needs a GPU")
    if args.profile and device.type != "cuda":
        p.error("--profile reads CUDA kernel times: it needs a GPU")
    if args.max_batch and (device.type != "cuda" or args.profile):
        p.error("--max-batch needs CUDA (it stops at torch.cuda.OutOfMemoryError); --profile a found batch in a 2nd run")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = make_config(args.size, conditioning=args.conditioning, temporal=args.frames > 1, num_frames=args.frames)
    if args.peer == "pixart":  # the shapes of its inputs: 120 T5-XXL positions
        cfg = dataclasses.replace(cfg, text_dim=4096)
    if args.resolution % (8 * cfg.patch):
        p.error(f"--resolution {args.resolution} must be a multiple of {8 * cfg.patch} (SD-VAE downsampling 8 x patch {cfg.patch})")

    def build():  # (model, the callable that is timed); build_model compiles what it builds itself
        if args.peer:
            try:
                model = Peer(args.peer, args.peer_repo, args.resolution // 8).to(device)
            except (FileNotFoundError, ImportError) as e:  # not a clone of its repository, or timm missing
                p.error(f"--peer {args.peer}: {e}")
        elif args.fsdp:
            model = build_model(cfg, device, args.ac, args.compile, unit=args.fsdp_unit, fast=not args.readable)
        else:
            model = GenTron(cfg).to(device)
            if not args.readable:
                fastpath.speed_up(model, pack="pack" not in without, gelu="gelu" not in without)
        return model, torch.compile(model, mode=args.compile_mode) if args.compile and not args.fsdp else model

    g = torch.Generator().manual_seed(rank)
    peak = matmul_peak_tflops(device)
    torch.cuda.empty_cache()  # give the peak test's buffers back before measuring memory (no-op on CPU)
    flops = flops_per_sample(cfg, args.text_len, args.frames, args.resolution // 8)
    attention = lambda: sdpa_kernel(ATTENTION[args.attention]) if args.attention != "auto" else nullcontext()
    model = fwd = opt = amp = None  # amp: the forward's bf16 context (fsdp.mixed_precision), set with the model
    sharded = False  # whether fsdp.build_model sharded it
    rows, ran_out = [], False

    def make_step(name, batch):
        """(fn, samples, FLOPs per sample): a training step, or a sampling pass over 2 x batch (CFG)."""
        if args.compile and args.max_batch:
            torch._dynamo.reset()  # compile each batch afresh with static shapes, as a run at that batch would
        n = batch if name == "train" else 2 * batch  # sampling: prompts and null captions in one batch
        inp = random_inputs(cfg, n, args.resolution, args.frames, args.text_len, device, g, args.max_tokens)
        if args.frames > 1:
            inp["motion_free"] = torch.zeros(n, dtype=torch.bool, device=device)
        if name == "sample":  # a denoising step as sample.py runs it: the captions encoded once, before the steps
            caption = {k: inp.pop(k) for k in ("text", "text_mask", "pooled")}
            if not sharded and "context" not in without:  # FSDP2 gathers a block's weights only inside its forward
                with torch.no_grad(), amp:
                    inp["context"] = model.encode_text(**caption)
                text = inp["context"].text  # the keys a step attends to (text_encoders.compact_caption)
                step_flops = flops_per_sample(cfg, args.text_len if text is None else text.shape[1], args.frames,
                                              args.resolution // 8, caption=False)
            else:
                inp.update(caption)
                step_flops = flops

            if args.cuda_graph:
                graphed = sampling_step(fwd, device)  # as sample.generate

                def sample_step():
                    with torch.no_grad():
                        graphed(**inp)
            else:
                def sample_step():
                    with torch.no_grad(), amp:
                        fwd(**inp)
            return sample_step, n, step_flops
        noise = torch.randn_like(inp["x"])

        def train_step():
            with amp:
                loss = torch.nn.functional.mse_loss(fwd(**inp).float(), noise)
            loss.backward()
            if args.fsdp:
                opt.step(lr=1e-4)  # as training: gradient norm, AdamW on the shards, zero_grad
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
        return train_step, n, 3 * flops

    def measure(name, batch):
        """Time `name` at this (per-GPU) batch and keep its row; False, on every rank, if any rank ran out of memory."""
        nonlocal ran_out
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = {}

        def first():  # the inputs and the first step, which allocates the optimizer state: the peak
            run["step"], run["samples"], run["flops"] = make_step(name, batch)
            run["step"]()

        def rest():  # the remaining warm-up steps, then the timed ones
            run["seconds"] = timed(run["step"], args.steps, max(args.warmup - 1, 0), device)

        with attention():
            oom = out_of_memory(first, device) or out_of_memory(rest, device)
        run.pop("step", None)  # the inputs
        if oom:
            print0(f"{name} batch {batch}: out of memory")
            model.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            ran_out = True
            return False
        rate = all_ranks(run["samples"] / run["seconds"], dist.ReduceOp.SUM, device)  # global samples/s
        mem = all_ranks(torch.cuda.max_memory_allocated() / 2**30, dist.ReduceOp.MAX, device) \
            if device.type == "cuda" else None
        tflops = rate * run["flops"] / world / 1e12  # per GPU
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
        mem_s = f"{mem:8.1f}" if mem is not None else f"{'n/a':>8}"
        rows.append(f"{name:<8} {rate:10.1f} {tflops:9.1f} {mfu:>7} {mem_s}" + (f" {batch:6d}" if args.max_batch else ""))
        if args.max_batch:
            print0(f"{name} batch {batch}: fits, {rate:.1f} samples/s, {mem:.1f} GiB")
        return True

    for name in [m for m in ("train", "sample") if m in args.mode]:
        if model is None:
            model, fwd = build()
            amp = mixed_precision(model, device)  # FSDP2's policy, or autocast
            sharded = isinstance(model, FSDPModule)
            if args.peer:  # its own forward's FLOPs (flops.py's formula is GenTron's)
                flops = counted_flops(model, random_inputs(cfg, 2, args.resolution, 1, args.text_len, device, g), amp)
        if name == "train":
            opt = ShardedAdamW(model, lr=1e-4, weight_decay=0) if args.fsdp else \
                torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
        else:
            model.eval()
            if not args.fsdp and device.type == "cuda" and "bf16" not in without:  # as sample.py loads it
                cast_matmul_weights(model, torch.bfloat16)
        n, ran_out = len(rows), False
        # without --max-batch the limit leaves one try: --batch itself
        batch = largest_batch(lambda b: measure(name, b), args.batch, MAX_BATCH if args.max_batch else args.batch)
        del rows[n:-1]  # --max-batch: keep only the row of the largest batch that fit
        if batch is None:
            rows.append(f"{name:<8} out of memory at batch {args.batch}")
        if args.profile and batch:
            step = make_step(name, batch)[0]
            if args.cuda_graph:
                step()  # warm-up and recording first: profile one replay
            with attention(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print0(f"profile of one {name} step: top CUDA kernels")
            print0(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
            fams = kernel_families(prof)
            total = sum(ms for ms, _ in fams.values())
            print0(f"profile of one {name} step: {total:.1f} ms of kernels: " + ", ".join(
                f"{k} {ms:.1f} ms ({100 * ms / total:.0f}%, {n} calls)" for k, (ms, n) in fams.items()))
            del step
        opt = None
        model.zero_grad(set_to_none=True)
        if args.fsdp and ran_out:  # FSDP2 keeps per-step state that an aborted step leaves behind: build afresh
            model = fwd = None
            gc.collect()
            torch.cuda.empty_cache()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_s = f"{peak:.0f} TFLOP/s" if peak else "n/a"
    built = (f" fsdp x{world} ac {args.ac}" if sharded else " as trained: unsharded x1") if args.fsdp else ""
    pieces = "its own code" if args.peer else "readable" if args.readable else \
        "fastpath" + (f" without {','.join(sorted(without))}" if without else "")
    setup = (f" ({args.compile_mode})" if args.compile_mode else "") + built + " " + pieces \
        + (" cuda-graph" if args.cuda_graph else "") \
        + (f" attention {args.attention}" if args.attention != "auto" else "")
    title = PEERS[args.peer] if args.peer else f"GenTron-{args.size}/{cfg.patch} {cfg.conditioning}"
    print0(f"{title} batch {args.batch}{'/GPU' if args.fsdp else ''} "
           f"res {args.resolution} frames {args.frames} compile {args.compile}{setup} | {name} | torch {torch.__version__} "
           f"| matmul peak {peak_s}")
    print0(f"{'mode':<8} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'mem GiB':>8}" + (f" {'batch':>6}" if args.max_batch else ""))
    print0("\n".join(rows))
    if created:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(p.parse_args())
