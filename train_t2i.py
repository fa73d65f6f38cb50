r"""
Train GenTron text-to-image (paper Sec. 3.2, 4.1). One script for one CPU, one GPU and many GPUs:

    python train_t2i.py                                  # toy: built-in shapes -> samples.png + oracle scores
    torchrun --nproc_per_node 8 train_t2i.py --size XL --data /data/cache256 --batch-size 2048 \
        --max-steps 500000 --out runs/xl256              # Sec. 4.1 stage 1: 256px, batch 2048, 500K steps
    torchrun --nproc_per_node 8 train_t2i.py --size XL --data /data/cache512 --batch-size 784 \
        --max-steps 300000 --init-from runs/xl256/ckpt-0500000 --out runs/xl512   # stage 2: 512px

FSDP2 (fsdp.py) makes N ranks x batch b train like 1 rank x batch Nb (one rank without --ac: unsharded). Every random
draw of a step (timesteps, noise, caption dropout) is a function of (seed, step) drawn for the whole
global batch, and the data order a function of (seed, epoch) (fsdp.py): a resumed run repeats an uninterrupted
one. train_t2v.py trains text-to-video with this loop: it passes its own data (make_data) and model config
(make_config), and sets its own flag defaults; the data sources are in train_data.py.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm

import cache
from checkpoint import (check_init, checkpoints, config_dict, last_good_checkpoint, load_init, load_sharded,
                        newest_good, remove_partial_checkpoints, save_checkpoint, stored_settings, truncate_log)
from diffusion import Diffusion
from flops import flops_per_sample
from fsdp import (DistributedBatches, ShardedAdamW, StopSignals, build_model, exit_status, gather_weights,
                  load_full_state, master_process, matmul_peak_tflops, mixed_precision, next_position, print0,
                  setup_distributed, sharded_state, step_draws)
from data import ImageTextFolder, collate
from latents import latent_spec
from model import SIZES, GenTronConfig
from oracle import final_samples
from pipeline import check_parts
from synthetic import ShapesDataset
from train_data import bench_batches, bench_data, builtin, cached_data, online_data, text_condition

# -----------------------------------------------------------------------------
# flags: defaults train the toy model on the built-in shapes; each paper setting says where it comes from

LR = 1e-4  # constant learning rate with AdamW, paper Sec. 4.1 (XL/2 and G/2 at batch 2048)
TOY_LR = 1e-3  # toy / tiny models at batch 32: learn in minutes (1e-4 leaves a CPU toy run at noise)
# steps: --time-limit and SIGTERM / SIGINT are checked this often too (one host sync), not only when logging. A
# scheduler's grace period between SIGTERM and SIGKILL (30 s by default in SLURM and Kubernetes) must cover this
# many steps and one checkpoint write.
STOP_CHECK_EVERY = 10
CACHE_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # None: as the encoders give them


def bounded(kind, lo=None, hi=None, open_hi=False):
    """argparse type: a `kind` number in [lo, hi] (either bound optional; [lo, hi) with open_hi); anything else
    is a one-line usage error."""
    def parse(text):
        value = kind(text)  # argparse reports a ValueError here as "invalid <kind> value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (lo is not None and value < lo) or (hi is not None and (value > hi or open_hi and value == hi)):
            need = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}{')' if open_hi else ']'}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data and frozen encoders
    p.add_argument("--data", default="shapes",
                   help="shapes | bench | image folder, .jsonl manifest or .tar shards (a.tar, a folder of *.tar, "
                        "a-{000..099}.tar) | cache dir made by cache.build_cache")
    p.add_argument("--cache", default=None, help="first cache --data's latents + text features here (each rank encodes "
                   "its share, with --num-workers loader workers), then train on it")
    p.add_argument("--cache-dtype", default="fp32", choices=list(CACHE_DTYPES),
                   help="how --cache stores latents and text features: bf16 halves the disk (CLIP+T5: 19 KiB a caption "
                        "token in fp32)")
    p.add_argument("--text-encoder", default=None, help="default: the parent's (--resume, --init-from), else "
                   "tiny-clip+t5 (offline toy encoders); full scale: clip+t5 (Table 2, best)")
    p.add_argument("--latent-space", default=None, help="pixel | sd-vae | a diffusers AutoencoderKL hub name or local "
                   "folder (PATH). Default: the parent's (--resume, --init-from), else pixel for built-in data, "
                   "sd-vae for real data (Sec. 4.1). --resume takes a moved --text-encoder / --latent-space path "
                   "of the same shapes")
    p.add_argument("--resolution", type=bounded(int, 1), default=None, help="pixels; default 32 (shapes) or 256 (Sec. 4.1, stage 1)")
    # model
    p.add_argument("--size", default="toy", choices=list(SIZES), help="a row of Table 1 (model.SIZES)")
    p.add_argument("--patch", type=bounded(int, 1), default=None, help="patch size, the /2 of XL/2 (default: the row's)")
    p.add_argument("--conditioning", default="cross_attn", choices=["cross_attn", "adaln"])  # cross-attn: Sec. 4.2
    p.add_argument("--pooled-text", action=argparse.BooleanOptionalAction, default=True,
                   help="add the pooled text embedding to the time embedding (Sec. 3.2.1)")
    p.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm on attention queries and keys: not in the paper, off by default; it keeps long toy "
                        "runs stable (docs/bundled-models.md). A resumed or --init-from run keeps its parent's")
    # optimisation
    p.add_argument("--prediction", default=None, choices=["eps", "v"],
                   help="network output (diffusion.py): default eps (the paper, latents), v in pixel space; "
                        "a resumed or --init-from run keeps its parent's")
    p.add_argument("--batch-size", type=bounded(int, 1), default=32, help="global batch per step (Sec. 4.1: 2048 at 256px, 784 at 512px)")
    p.add_argument("--grad-accum", type=bounded(int, 1), default=1, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=bounded(float, 0), default=None, help=f"constant AdamW lr (default {LR}; {TOY_LR} for toy / tiny)")
    p.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                   help="constant (DiT, the paper) or cosine decay to 0 at --max-steps (short toy runs)")
    p.add_argument("--weight-decay", type=bounded(float, 0), default=0.0)  # DiT: AdamW without weight decay
    p.add_argument("--betas", type=bounded(float, 0, 1, open_hi=True), nargs=2, default=[0.9, 0.999])  # AdamW defaults, as DiT
    p.add_argument("--clip", type=bounded(float, 0), default=1.0, help="max gradient norm (0: off, the norm is still logged)")
    p.add_argument("--ema", type=bounded(float, 0, 1, open_hi=True), default=0.9999)  # DiT's EMA decay
    p.add_argument("--caption-dropout", type=bounded(float, 0, 1), default=0.1)  # null caption 10% of the time: CFG (Ho & Salimans)
    p.add_argument("--max-steps", type=bounded(int, 1), default=800)  # the toy: ~7 min on 2 CPU cores; Sec. 4.1: 500K + 300K
    p.add_argument("--time-limit", type=bounded(float, 0), default=None,
                   help="minutes from start (set-up included): stop cleanly (checkpoint, samples, scores) at the first "
                        f"log or checkpoint step past it, or the next multiple of {STOP_CHECK_EVERY} steps")
    p.add_argument("--seed", type=bounded(int, 0), default=0, help="seeds the data order, noise and init")
    # system
    p.add_argument("--ac", type=bounded(int, 0), nargs="?", const=1, default=None, metavar="N",
                   help="activation checkpointing of every N-th block: --ac every block, --ac 2 every other, "
                        "--ac 0 off (default: every block for G, Sec. 4.1)")
    p.add_argument("--fsdp-unit", type=bounded(int, 1), default=4, metavar="K",
                   help="consecutive blocks per FSDP2 unit (one all-gather and reduce-scatter each) where blocks "
                        "are sharded: over ranks, or with --ac; larger units cost less host time per block")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model (each block when sharded, on CUDA); the first compile of a "
                        "large model takes minutes")
    p.add_argument("--readable", action="store_true",
                   help="CUDA: train model.py's forwards as written instead of fastpath's fused ones (the same math; "
                        "the CPU always runs model.py's)")
    p.add_argument("--num-workers", type=bounded(int, 0), default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    # run folder, logs, checkpoints
    p.add_argument("--out", default="runs/t2i", help="run folder: log.txt, metrics.jsonl, ckpt-NNNNNNN/ checkpoints, samples.png")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init-from", default=None,
                   help="a run folder, checkpoint or .safetensors export: start from its model + EMA weights")
    p.add_argument("--log-every", type=bounded(int, 0), default=100, help="steps between log lines, and the last step (0: none)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each log line's metrics as TensorBoard scalars to --out (pip install tensorboard)")
    p.add_argument("--ckpt-every", type=bounded(int, 0), default=400,
                   help="steps between checkpoints, and the last step (0: none)")
    p.add_argument("--keep", type=bounded(int, 0), default=3, help="checkpoints to keep (0: all)")
    # the sample grid written at the end
    p.add_argument("--num-samples", type=bounded(int, 0), default=16, help="held-out prompts in samples.png (0: none)")
    p.add_argument("--sample-steps", type=bounded(int, 1, 1000), default=25)  # DPM-Solver++(2M) needs ~20-25 steps
    p.add_argument("--cfg-scale", type=bounded(float), default=7.5)  # lambda_T = 7.5, paper Sec. 3.3.2
    p.add_argument("--eval-n", type=bounded(int, 0), default=16, help="oracle scores on N held-out prompts per category (0: off)")
    p.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: plant a NaN loss
    return p


# -----------------------------------------------------------------------------
# the model config from the flags (the FSDP2 build itself: fsdp.build_model)


def model_config(args, data, **fields):
    """The GenTronConfig of --size, with the input and text shapes of the data."""
    cfg = {**SIZES[args.size], **({"patch": args.patch} if args.patch else {}), "conditioning": args.conditioning,
           "pooled_text": args.pooled_text, "qk_norm": bool(args.qk_norm), "in_channels": data.channels,
           "input_size": data.latent_size, "text_dim": data.text_dim, "pooled_dim": data.pooled_dim, **fields}
    return GenTronConfig(**cfg)


# -----------------------------------------------------------------------------
# data: which source --data names (the sources and the text conditioning: train_data.py)


def make_data_t2i(args, device):
    """--data for text-to-image: shapes | bench | cache dir | image folder / .jsonl / .tar shards."""
    if args.data == "bench":
        return bench_data(args, device)
    if cache.is_cache(args.data):
        data = cached_data(args.data, device, text_encoder=args.text_encoder)
        cache.check_kind(data.dataset.meta, args.data, video=False)
        return data
    if args.data == "shapes":
        ds = ShapesDataset("train", size=args.resolution or 32, seed=args.seed)
        return online_data(ds, ds.spec, args, device)
    ds = ImageTextFolder(args.data, size=args.resolution or 256)
    return online_data(ds, args.data, args, device)


# -----------------------------------------------------------------------------
# the end of a run: a sample grid of held-out prompts and, on the built-in data, the oracle scores


# -----------------------------------------------------------------------------
# the training loop


def lr_at(args, step):
    """Learning rate of optimizer step `step` (1-based): constant, or cosine from --lr down to 0 at --max-steps."""
    if args.lr_schedule == "constant":
        return args.lr
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.max_steps))


def same_dataset(a, b):
    """Whether two dataset specs (checkpoint meta) name the same data: folder parts compared as resolved paths, so
    that d/ok, d/ok/ and its absolute path agree (also in T2V's "videos+images:p_motion_free=p")."""
    def norm(spec):
        spec, sep, options = str(spec).partition(":p_motion_free=")
        return [os.path.realpath(p) if os.path.exists(p) else p for p in spec.split("+")], sep + options
    return a is None or norm(a) == norm(b)


def due(step, every, last):
    """Log / checkpoint at every `every` steps (0: never) and at the last step."""
    return bool(every) and (step % every == 0 or step == last)


def write_metrics(out, metrics, line, writer):
    """Rank 0: one log step as a line of log.txt, a JSON object of metrics.jsonl and TensorBoard scalars, each
    flushed now, so that a killed run keeps every step it logged."""
    with open(os.path.join(out, "log.txt"), "a") as f:
        f.write(line + "\n")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics) + "\n")
    if writer is not None:
        for key, value in metrics.items():
            if key != "step" and value is not None:  # MFU: None on the CPU
                writer.add_scalar(f"train/{key}", value, metrics["step"])
        writer.flush()


def train(args, make_data=make_data_t2i, make_config=model_config, kind="t2i"):
    """Train the model make_config(args, data) -> GenTronConfig on the data from make_data(args, device) -> Data.
    Returns {"loss": [...], "grad_norm": [...]} (per step, averaged over ranks) on every rank. train_t2v.py
    passes its own make_data and make_config; kind is what the checkpoints' meta records ("t2i" / "t2v")."""
    with StopSignals() as stop:
        rank, world, device, created = setup_distributed(args.device)
        try:
            return _train(args, make_data, make_config, kind, rank, world, device, stop)
        finally:
            if created:
                dist.destroy_process_group()


def _train(args, make_data, make_config, kind, rank, world, device, stop):
    started = time.perf_counter()  # --time-limit counts the set-up too: encoders, model, a --cache build
    if args.tensorboard:  # optional; checked on every rank before any collective, written by rank 0
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    out, B, A = args.out, args.batch_size, args.grad_accum
    if args.lr is None:  # resolved, so checkpoints record it
        args.lr = TOY_LR if args.size in ("toy", "tiny") else LR
    if B % (world * A):
        raise ValueError(f"--batch-size {B} must be divisible by world size {world} x --grad-accum {A}")
    micro = B // (world * A)
    found = checkpoints(out)
    if found and not args.resume:
        raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    os.makedirs(out, exist_ok=True)
    if master_process():
        remove_partial_checkpoints(out)
    torch.manual_seed(args.seed)

    # --resume: the newest checkpoint that verifies (each rank checks a share of its files), its small state.pt
    resumed, ckpt = newest_good(found, print0, share=True) if found else (None, None)
    # A resumed run or a child run (--init-from) keeps its parent's text encoder, latent space, patch size, QK-norm
    # and prediction unless told otherwise
    parent = (ckpt["config"], ckpt["meta"]) if ckpt else stored_settings(args.init_from) if args.init_from else None
    was = {"text_encoder": parent[1].get("text_encoder"),
           "latent_space": latent_spec(parent[1].get("latent_space")),
           "prediction": parent[1].get("prediction", "eps")} if parent else {}  # older checkpoints: eps
    args.latent_space = latent_spec(args.latent_space)  # "sd-vae" however spelled, as caches and checkpoints
    for key, value in was.items():  # a resumed run trains the same target from the same features
        given = getattr(args, key)
        moved = key != "prediction"  # another encoder / VAE path (a moved folder): checked by shape below
        if ckpt and not moved and given is not None and value is not None and given != value:
            raise ValueError(f"{resumed} was trained with --{key.replace('_', '-')} {value}; "
                             f"a resumed run keeps it (got {given})")
    args.text_encoder = args.text_encoder or was.get("text_encoder")
    args.latent_space = args.latent_space or was.get("latent_space")
    given = {"--text-encoder": args.text_encoder, "--latent-space": args.latent_space, "--resolution": args.resolution}
    data = make_data(args, device)
    args.text_encoder = data.text_encoder  # resolved (the data's default, or a cache's), as checkpoints record it
    if ckpt and data.encoder is not None:  # the same shapes as the run's, whatever path they load from
        check_parts(config_dict(ckpt["config"]), ckpt["meta"].get("resolution"), data.encoder, data.latents, resumed)
    if isinstance(data.dataset, cache.CachedDataset):  # (make_data checks a cache's kind and its own flags)
        cache.check_flags(data.dataset.meta, args.data, given)
    if parent:
        args.patch = args.patch or parent[0].get("patch")
        args.qk_norm = parent[0].get("qk_norm", False) if args.qk_norm is None else args.qk_norm
        args.prediction = args.prediction or was["prediction"]
    elif args.patch is None and args.size == "toy" and device.type == "cpu":
        args.patch = 4  # the no-argument CPU demo: 64 tokens train ~4x faster than the row's 2x2 (docs/deviations.md)
    cfg = make_config(args, data)
    down = data.latents.downsample if data.latents is not None else 1 if data.latent_space == "pixel" else 8
    if data.resolution % (down * cfg.patch):
        raise ValueError(f"--resolution {data.resolution} must be a multiple of {down * cfg.patch} "
                         f"({data.latent_space} downsampling {down} x patch {cfg.patch})")
    if data.dataset is not None and len(data.dataset) < B:
        raise ValueError(f"dataset {data.spec} has {len(data.dataset)} items, fewer than one batch of {B}")
    args.prediction = args.prediction or ("v" if data.latent_space == "pixel" else "eps")  # resolved, as lr
    meta = {"kind": kind, "text_encoder": data.text_encoder, "latent_space": data.latent_space,
            "resolution": data.resolution, "num_frames": data.frames, "dataset": data.spec,
            "prediction": args.prediction}
    if ckpt and not same_dataset(ckpt["meta"].get("dataset"), data.spec):  # its data position means nothing here
        raise ValueError(f"{resumed} was trained on {ckpt['meta'].get('dataset')}, not {data.spec}: resume with "
                         f"its --data (and --seed, --p-motion-free), or train into another --out")
    ac = args.ac if args.ac is not None else int(args.size == "G")

    # model, optimizer, EMA - from the newest checkpoint (--resume), another run (--init-from) or a fresh init
    if ckpt and config_dict(ckpt["config"]) != dataclasses.asdict(cfg):
        raise ValueError(f"{resumed} was trained with another model config {ckpt['config']}; use the same flags")
    if args.init_from and not ckpt:
        check_init(parent[0], cfg, args.init_from)  # on every rank: a mismatch stops all of them
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    if args.cache:  # after the checks above: encode the whole dataset once, every rank its share, then train on it
        if data.encoder is None:
            raise ValueError(f"--cache encodes a dataset of files; --data {args.data} is "
                             f"{'random features' if data.dataset is None else 'a cache already'}")
        # every rank returns once all shards are on the disk (it waits on files, not in a collective: building a
        # large cache outlasts the process group's timeout)
        cache.build_cache(data.dataset, args.cache, data.encoder, data.latents, dataset_spec=data.spec,
                          num_workers=workers, dtype=CACHE_DTYPES[args.cache_dtype], rank=rank, world=world)
        dist.barrier()
        data = cached_data(args.cache, device, data.frames, text_encoder=data.text_encoder)
    model_sd = ema_sd = None  # full state dicts, needed on rank 0 only (None: the fresh seeded init)
    single_file = ckpt is not None and "model" in ckpt  # (a checkpoint folder's shards are loaded below, in place)
    if single_file:
        model_sd, ema_sd = ckpt["model"], ckpt["ema"]
    elif args.init_from and not ckpt:
        if master_process():
            model_sd, ema_sd = load_init(args.init_from, cfg, args.seed)
    # The EMA weights go through the model first: build with them, copy the shards, then load the weights.
    model = build_model(cfg, device, ac, args.compile, ema_sd, args.seed, args.fsdp_unit,
                        fast=device.type == "cuda" and not args.readable, init=single_file or not ckpt)
    opt = ShardedAdamW(model, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    with torch.no_grad():
        ema = [s.clone() for s in opt.shards]  # this rank's EMA shards, next to its parameter shards
    if single_file or (args.init_from and not ckpt):  # a collective: rank 0's full state, broadcast
        load_full_state(model, model_sd)  # in place: the optimizer's views of the shards stay valid
    step, pos = 0, (0, 0)
    if single_file:
        opt.load_full_state_dict(ckpt["optimizer"])
    elif ckpt:  # every rank reads the pieces of its own shards, whatever number of ranks wrote them
        load_sharded(resumed, sharded_state(model, opt, ema))
    if ckpt:
        step, pos = ckpt["step"], (ckpt["data"]["epoch"], ckpt["data"]["offset"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        print0(f"resumed {resumed} at step {step}"  # --resume --init-from: a job script that is started again
               + (f" (--init-from {args.init_from} counts only before the first checkpoint)" if args.init_from else ""))
        was = ckpt.get("args", {})
        for k in ("lr", "lr_schedule", "betas", "weight_decay", "clip", "ema", "seed", "batch_size", "grad_accum",
                  "text_encoder", "latent_space"):
            if k in was and was[k] != getattr(args, k):
                print0(f"--resume: --{k.replace('_', '-')} {getattr(args, k)} (the checkpoint's run used {was[k]}"
                       + ("; the noise and data order from here are not the uninterrupted run's)"
                          if k in ("seed", "batch_size") else ")"))
    elif args.resume:
        print0(f"--resume: no checkpoint in {out}; starting from "
               + (f"--init-from {args.init_from}" if args.init_from else "scratch"))
    if master_process():
        dropped = truncate_log(os.path.join(out, "log.txt"), step)
        truncate_log(os.path.join(out, "metrics.jsonl"), step)  # the same steps, one JSON object a line
        if dropped:
            print0(f"{out}/log.txt: dropped {dropped} line(s) past step {step}, the steps this run trains again")
    # purge_step: TensorBoard hides the events past the resumed step that earlier runs wrote
    writer = SummaryWriter(out, purge_step=step or None) if args.tensorboard and master_process() else None

    # data loader from the saved position; every rank reads only its slices of each global batch
    if data.dataset is None:
        loader = bench_batches(data, micro, device, args.seed + rank)
    else:
        sampler = DistributedBatches(len(data.dataset), B, A, rank, world, args.seed, pos,
                                     getattr(data.dataset, "per_epoch", False))
        loader = iter(torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, num_workers=workers,
                                                  collate_fn=collate, pin_memory=device.type == "cuda"))
    sample_shape = ((data.frames,) if data.frames else ()) + (data.channels, data.latent_size, data.latent_size)
    diffusion = Diffusion(prediction=args.prediction)
    peak = matmul_peak_tflops(device) if master_process() else None
    # fwd + bwd = 3x fwd; recompute not counted. Per caption length: cached captions come cut to what they need
    flops = functools.cache(lambda text_len: 3 * flops_per_sample(cfg, text_len, data.frames or 1))
    print0(f"{kind} GenTron-{args.size}: {sum(p.numel() for p in opt.params) / 1e6:.2f}M params, {world} rank(s) on "
           f"{device.type}, global batch {B} = {world} x {micro} x {A} accum, {data.spec}, "
           f"AC {f'every {ac} block(s)' if ac else 'off'}, "
           f"{f'FSDP2 units of {args.fsdp_unit} block(s)' if isinstance(model, FSDPModule) else 'unsharded (one rank)'}, "
           f"compile {args.compile}")
    if args.data == "shapes" and args.size == "toy" and device.type == "cpu":
        then = ([f"{out}/samples.png shows held-out prompts as blobs of mostly the right colour with rough shapes"]
                if args.num_samples else []) + (["the oracle scores follow (single objects in the tens of %, colour "
                                                  "pairs near 0 this early)"] if args.eval_n else [])
        print0(f"toy run on the CPU at patch {cfg.patch} (the bar shows the time left): {args.max_steps} steps"
               + (f"; then {', and '.join(then)}" if then else " (--num-samples 0 --eval-n 0: no samples, no scores)"))

    amp = mixed_precision(model, device)  # bf16: FSDP2's policy, or autocast on one rank
    history = {"loss": [], "grad_norm": []}
    pending = []  # (loss, grad norm) device scalars of the steps since the last host sync
    # the bar only on rank 0 and only on a terminal (disable=None): a log file gets the step lines alone
    bar = tqdm(total=args.max_steps, initial=step, disable=None if master_process() else True, dynamic_ncols=True,
               desc=kind)
    t0, seen, work = time.perf_counter(), 0, 0.0
    deadline = started + 60 * (args.time_limit or 0)
    checkpoint_now = lambda: save_checkpoint(out, step, sharded_state(model, opt, ema), pos, cfg, meta, args,
                                             args.keep)  # every rank writes its shards

    stop.phase, stopped_by = "training", 0  # from here a signal stops at the next check step (fsdp.StopSignals)
    for step in range(step + 1, args.max_steps + 1):
        t, noise, drop = step_draws(args.seed, step, B, sample_shape, device, args.caption_dropout)
        loss_sum = torch.zeros((), device=device)
        for j in range(A):
            batch = next(loader)
            mine = slice((j * world + rank) * micro, (j * world + rank + 1) * micro)  # this micro-batch's positions
            cond = text_condition(batch, drop[mine], data, device)
            work += micro * flops(cond["text"].shape[1])  # this rank's FLOPs, for the MFU
            x0 = batch["x"].to(device, non_blocking=True)
            x0 = data.latents.encode(x0) if data.latents is not None else x0.float()
            mf = batch["motion_free"].to(device, non_blocking=True) if "motion_free" in batch else None  # Sec. 3.3.2
            eps_fn = lambda xt, tt: model(xt, tt, **cond, motion_free=mf)
            if isinstance(model, FSDPModule):
                model.set_requires_gradient_sync(j == A - 1)  # reduce-scatter once, after the last micro-step
            with amp:
                loss = diffusion.loss(eps_fn, x0, t[mine], noise[mine])
            if step == args.debug_nan_at_step:
                loss = loss * float("nan")
            (loss / A).backward()
            loss_sum += loss.detach()
        dist.all_reduce(loss_sum)  # sum over ranks (gloo has no AVG); stays on the device
        lr = lr_at(args, step)
        norm = opt.step(lr, args.clip if args.clip > 0 else float("inf"))  # clip, AdamW, zero the gradients
        pending.append(torch.stack([loss_sum / (A * world), norm]))
        with torch.no_grad():  # EMA: ema <- decay ema + (1 - decay) params, on the shards (no communication)
            torch._foreach_lerp_(ema, opt.shards, 1.0 - args.ema)
        epoch, offset = next_position(pos, B, len(data.dataset) if data.dataset is not None else math.inf)
        if offset == 0 and epoch > 0 and getattr(data.dataset, "num_bad", 0):  # once per epoch: the skipped files
            # (data._MediaTextDataset counts them over this rank's loader workers; other ranks read other files)
            print0(f"epoch {epoch - 1}: {data.dataset.num_bad} unreadable file(s) skipped so far"
                   + (" on rank 0" if world > 1 else "") + ", each slot refilled with another file")
        pos = (epoch, offset + B)  # data position after this step, saved in checkpoints
        seen += B
        bar.update()
        if stop.signum and not stop.told:  # a Python attribute: no host sync
            stop.told = True
            print0(f"{signal.Signals(stop.signum).name}: stopping with a checkpoint within {STOP_CHECK_EVERY} steps "
                   f"(again: exit at once)")

        log, save = due(step, args.log_every, args.max_steps), due(step, args.ckpt_every, args.max_steps)
        clock = step % STOP_CHECK_EVERY == 0  # --time-limit and signals, also with --log/--ckpt-every 0
        if not (log or save or clock or step == args.max_steps):  # the last step: check every loss, even untimed
            continue  # no host sync: the GPU runs ahead of Python between log and checkpoint steps
        # One sync for all pending steps; a non-finite loss stops the run before any checkpoint is written.
        done, pending = torch.stack(pending).tolist(), []
        for k, (loss_val, norm_val) in enumerate(done, start=step - len(done) + 1):
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                last_good = last_good_checkpoint(out, share=True)  # the newest that reads and verifies
                raise SystemExit(f"step {k}: non-finite loss {loss_val} (grad norm {norm_val}); stopped at step "
                                 f"{step} without saving. Last good checkpoint: {last_good}")
        history["loss"] += [v[0] for v in done]
        history["grad_norm"] += [v[1] for v in done]
        if log:
            dt = time.perf_counter() - t0
            rate = seen / dt  # global samples per second over the interval
            total = torch.tensor(work, dtype=torch.float64, device=device)
            dist.all_reduce(total)  # every rank's FLOPs: their batches' captions keep different lengths
            mfu = 100 * total.item() / world / (dt * peak * 1e12) if peak else None  # per GPU, %
            mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
            metrics = {"step": step, "loss": sum(v[0] for v in done) / len(done), "grad_norm": done[-1][1],
                       "lr": lr, "samples_per_s": rate, "mfu_percent": mfu, "mem_gib": mem}
            line = (f"step {step} | loss {metrics['loss']:.4f} | grad norm {done[-1][1]:.3f} | "
                    f"{rate:.1f} samples/s | MFU {'n/a' if mfu is None else f'{mfu:.1f}%'} | mem {mem:.2f} GiB | "
                    f"lr {lr:.1e}")
            print0(line)
            if master_process():
                write_metrics(out, metrics, line, writer)
            t0, seen, work = time.perf_counter(), 0, 0.0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
        if save:
            writing = time.perf_counter()
            checkpoint_now()
            t0 += time.perf_counter() - writing  # samples/s and MFU count training, not checkpoint writes
        # The ranks' clocks differ, and a signal may reach some ranks only, or later: all stop at this step, or
        # none does. The larger signal number wins, so that all ranks exit with the same status.
        late = args.time_limit is not None and time.perf_counter() > deadline
        flags = torch.tensor([float(late), float(stop.signum)], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        late, stopped_by = (int(v) for v in flags.tolist())
        if late or stopped_by:
            if not save:
                checkpoint_now()
            why = signal.Signals(stopped_by).name if stopped_by else f"--time-limit {args.time_limit} min reached"
            print0(f"{why}: stopped at step {step} of {args.max_steps} with {out}/ckpt-{step:07d}"
                   + ("; --resume continues" if stopped_by else ""))
            break
    bar.close()
    if writer is not None:
        writer.close()
    if stopped_by:  # no samples or scores: the grace period is for the checkpoint (--resume writes them at the end)
        raise SystemExit(exit_status(stopped_by))
    stop.phase = "sampling"

    if builtin(data.spec) and (args.num_samples or args.eval_n):
        final = {"step": step, **gather_weights(model, opt, ema)}  # full weights on rank 0 (a collective)
        if master_process():
            # An EMA averages the last ~1/(1-decay) steps; a shorter run would sample weights still near the init.
            use_ema = final["step"] >= 1 / (1 - args.ema)
            print0(f"sampling with the {'EMA' if use_ema else 'raw (run shorter than the EMA horizon)'} weights")
            final_samples(cfg, final["ema" if use_ema else "model"], data, meta, out, args, device)
    dist.barrier()
    return history


def main(argv=None):
    args = get_parser().parse_args(argv)
    return train(args)


def cli(main):
    """main() as a command: bad input (missing files, bad values) is one line of error from rank 0, no traceback."""
    try:
        main()
    except (OSError, ValueError, ImportError) as e:  # OSError: missing or existing files, a VAE that won't load
        sys.exit(f"error: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)


if __name__ == "__main__":
    cli(main)
