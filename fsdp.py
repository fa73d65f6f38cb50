"""
The distributed runtime that training and bench.py share: one process group for any number of
processes (torchrun, or a 1-process group under plain `python`), rank-0 printing, the measured
matmul peak that MFU is reported against, GenTron built for training (FSDP2 shards, or the plain model on
one rank), each rank's slices of a global batch order with per-step random draws, and AdamW on the shards.

FSDP2 in torchtitan order: the model is built on the meta device, each block gets activation
checkpointing and torch.compile (CUDA), then fully_shard per unit of consecutive blocks (4 by default) and
at the root (bf16 compute, fp32 gradient reduction), then to_empty and the weights of a seeded
single-process init, broadcast from rank 0 - so N ranks x batch b train like 1 rank x batch Nb: the same
weights, samples, noise and timesteps (tests/test_train.py). One rank without checkpointing has nothing
to shard: the plain model, compiled whole, under bf16 autocast (as torchtitan runs without data-parallel
sharding); its bf16 GEMMs are FSDP2's, and the norm gains stay fp32 where FSDP2 rounds them to bf16.
"""

import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm import tqdm

import fastpath
from model import GenTron

# -----------------------------------------------------------------------------
# distributed set-up


def setup_distributed(device=None):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` gets a 1-process group, so the code path is
    the same. Returns (rank, world_size, device, created) - created: this call made the process group."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    try:
        device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for a GPU, but PyTorch sees no CUDA device here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # plain "cuda": this process's GPU under torchrun
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # frozen encoders / VAE
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "RANK" in os.environ:  # torchrun: rendezvous through MASTER_ADDR / MASTER_PORT
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:  # one process: an in-memory store, no ports
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device, created


def master_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if master_process():
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def matmul_peak_tflops(device, n=8192, iters=20):
    """Measured bf16 matmul peak (TFLOP/s) of this GPU, the denominator of MFU (as bench.py); None on CPU."""
    if torch.device(device).type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):  # warm-up
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


# -----------------------------------------------------------------------------
# the model: meta device -> AC -> compile -> fully_shard per unit -> root (or: compile whole) -> to_empty -> init

def fresh_state(cfg, seed):
    """The single-process initialisation (GenTron.init_weights under a fixed seed) as a full state dict."""
    torch.manual_seed(seed)
    return GenTron(cfg).state_dict()


def build_model(cfg, device, ac=0, compile=False, init_state=None, seed=0, unit=4, fast=False, init=True):
    """GenTron as training runs it: FSDP2 shards across ranks, and on one rank with activation checkpointing (memory:
    G/2); otherwise (one rank, no checkpointing) the plain model, to be run under `mixed_precision`.
    ac: activation checkpointing of every ac-th block (1: all, 2: every other, 0: none).
    unit: consecutive blocks per FSDP2 unit (one all-gather / reduce-scatter each).
    init_state: full state dict used on rank 0 (others ignore it); default: the seeded single-process init, so
    the weights do not depend on the number of ranks. fast: fastpath's fused forwards (the same math and parameters).
    init=False leaves the weights uninitialised, for a checkpoint's shards to be loaded into (no full model on rank 0:
    ~12 GB and its broadcast for G/2)."""
    # FSDP2 (torch >= 2.12) warns when a sharded module returns a view, since an in-place op on one would skip its
    # backward all-gather. Ours do (a block's gate is a slice of its adaLN output, a Linear's 3D output a view of its
    # 2D product), and nothing modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with torch.device("meta"):
        model = GenTron(cfg)  # no memory yet: shapes only
    if fast:
        fastpath.speed_up(model)  # before the blocks' forwards are wrapped below
    # Units of `unit` blocks: only one unit's bf16 weights and gradients are unsharded at a time - needed across
    # ranks, and on one rank with activation checkpointing (memory-bound: G/2). FSDP2's hooks cost host time per
    # unit, which small per-GPU batches leave the GPU waiting for: units of 4 blocks trained G/2 (--ac, 32 per GPU,
    # 4 H100s) 28% faster than units of 1 (docs/performance.md, "GenTron-G/2 with FSDP2"). The math is the same
    # either way.
    # One rank without checkpointing shards nothing: FSDP2 there only copies every weight in and out of its
    # all-gather buffer and every gradient through its reduce-scatter. The plain model trained XL/2 4.7% faster
    # on an H100 and 19% on an H200 (docs/performance.md, "Optimisations in the code").
    sharded = dist.get_world_size() > 1 or ac
    for i, block in enumerate(model.blocks):
        # Replacing forward on the instance (rather than wrapping the module) keeps GenTron's parameter
        # names, and puts recompute inside the compiled graph (a composable checkpoint() hook would not).
        forward = block.forward
        if ac and i % ac == 0:  # Sec. 4.1: activation checkpointing for G/2 - keep the block's input, recompute
            forward = _checkpointed(forward)  # the rest in backward; every 2nd block: half the memory saving
            # for half the recompute (docs/performance.md, "GenTron-G/2 with FSDP2")
        # CPU: Inductor's vectorised C++ for a compiled block gave gradients ~0.2% off in torch 2.13 (the eager and
        # aot_eager backends are exact; a bug of that code generator), so blocks run
        # eagerly there. CUDA compiles them (its norms are the Triton kernel); so does one CPU rank without --ac.
        if compile and sharded and device.type == "cuda":
            forward = torch.compile(forward)
        block.forward = forward
    if sharded:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        # bf16 compute and all-gathers, fp32 gradient reduce-scatter; sharded fp32 master weights (CPU: fp32)
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
            else MixedPrecisionPolicy()
        for i in range(0, len(model.blocks), unit):  # one all-gather / reduce-scatter per unit
            fully_shard(list(model.blocks[i:i + unit]), mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embedders, text projection, final layer
    elif compile:
        model.forward = torch.compile(model.forward)  # one graph: the whole forward and backward
    model.to_empty(device=device)  # allocate the local shards (uninitialised)
    # init: rank 0 builds the full model on CPU with init_weights() under the seed, and its weights are
    # broadcast and sharded - identical to single-process training for any number of ranks.
    if init:
        load_full_state(model, (init_state if init_state is not None else fresh_state(cfg, seed)) if master_process() else {})
    return model


def mixed_precision(model, device):
    """The context of a forward pass: FSDP2 computes in bf16 by its MixedPrecisionPolicy; the plain model runs under
    bf16 autocast on CUDA (fp32 master weights, as FSDP2's shards). The CPU computes in fp32 either way."""
    if isinstance(model, FSDPModule):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def load_full_state(model, state):
    """Load a full state dict, read on rank 0 only, into the (sharded) model: broadcast, each rank keeps its shard.
    In place, so an optimizer's references to the parameters stay valid."""
    if not isinstance(model, FSDPModule):  # one rank, unsharded
        model.load_state_dict(state)
        return
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(state) if master_process() else {}, options=options)  # dict(): it writes into it


def full_tensor(t):
    """A parameter or gradient as one whole tensor: gathered from the ranks if it is a DTensor shard (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_cpu_on_master(t):
    """full_tensor(t) (a collective: every rank calls it) copied to the CPU on rank 0, None on the other ranks: only
    rank 0 writes checkpoints, and a CPU copy of a G/2 model, its EMA and AdamW state is ~47 GB on every rank."""
    full = full_tensor(t)
    return full.to("cpu", copy=True) if master_process() else None  # a copy even where t is on the CPU (1 rank)


def sharded_state(model, opt, ema):
    """What a training checkpoint holds, as this rank's shards (checkpoint.save_checkpoint / load_sharded): the model's
    weights, the EMA and AdamW's state, each under GenTron's parameter names. The tensors share the training
    state's memory: loading into them restores it in place."""
    return {"model": model.state_dict(), "ema": opt.like_params(ema), "optimizer": opt.sharded_state_dict()}


def gather_weights(model, opt, ema):
    """{"model": ..., "ema": ...}: the model's weights and its EMA as full CPU state dicts in memory of their own on
    rank 0, with None for every tensor elsewhere (a collective where the model is sharded: every rank calls it).
    opt: ShardedAdamW; ema: this rank's EMA shards, in its parameter order."""
    weights = {k: full_cpu_on_master(v.detach()) for k, v in model.state_dict().items()}  # a plain model's as they are
    return {"model": weights, "ema": opt.gather(ema)}


def _checkpointed(forward):
    def checkpointed_forward(*args):
        # a block draws no random numbers: no RNG state to save and restore around the recompute
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False)
    return checkpointed_forward


# -----------------------------------------------------------------------------
# the data side of "N ranks x b == 1 rank x N b": a global batch order and per-step draws that no rank count changes


def next_position(pos, batch, n):
    """(epoch, offset) where the next global batch starts; an epoch's last partial batch is dropped."""
    epoch, offset = pos
    return (epoch + 1, 0) if offset + batch > n else (epoch, offset)


def permutation(n, seed, epoch):
    """The global order of an epoch: the same for every rank and every world size."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class DistributedBatches:
    """Index lists of this rank's micro-batches, starting at a data position (epoch, offset).

    Global batch k of an epoch is perm[k B : (k+1) B]; its micro-batch j of rank r is the slice
    [(j W + r) m, (j W + r + 1) m) with m = B / (W A). Every sample keeps its position in the global
    batch, so 2 ranks x m == 1 rank x 2m on the same samples, with the same noise (see step_draws).
    per_epoch: yield epoch * n + i, for datasets whose items are drawn anew each epoch (data.py)."""

    def __init__(self, n, batch, accum, rank, world, seed, pos, per_epoch=False):
        self.n, self.batch, self.accum, self.rank, self.world = n, batch, accum, rank, world
        self.seed, self.pos, self.micro, self.per_epoch = seed, pos, batch // (world * accum), per_epoch

    def __iter__(self):
        pos, perm_epoch = self.pos, None
        while True:
            epoch, offset = next_position(pos, self.batch, self.n)
            if epoch != perm_epoch:
                perm, perm_epoch = permutation(self.n, self.seed, epoch), epoch
                if self.per_epoch:  # the dataset draws per epoch (data.py): index epoch * n + i
                    perm = perm + epoch * self.n
            for j in range(self.accum):
                start = offset + (j * self.world + self.rank) * self.micro
                yield perm[start : start + self.micro].tolist()
            pos = (epoch, offset + self.batch)


def step_draws(seed, step, batch, sample_shape, device, p_drop, num_steps=1000):
    """Timesteps t ~ U{0..999}, noise ~ N(0, I) and caption-dropout flags of a whole global batch, from
    generators seeded by (seed, step): a resumed run draws the same, and each rank slices its samples."""
    key = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0])
    g = torch.Generator(device).manual_seed(key)
    t = torch.randint(0, num_steps, (batch,), generator=g, device=device)
    noise = torch.randn((batch, *sample_shape), generator=g, device=device)
    drop = torch.rand(batch, generator=torch.Generator().manual_seed(key)) < p_drop  # CPU: captions live there
    return t, noise, drop


# -----------------------------------------------------------------------------
# the optimizer: AdamW on this rank's shards


class ShardedAdamW:
    """AdamW and the global gradient-norm clip on this rank's local shards of the FSDP2 parameters (of the plain
    model: the parameters themselves).

    Why not torch.optim.AdamW(model.parameters()): in torch 2.11 the fused kernel on DTensor parameters keeps
    one DTensorSpec per parameter per step alive (pytorch/pytorch#188174; 160 a step for the toy model, measured),
    host memory that grows for as long as the run lasts; and every optimizer and clipping call on DTensors
    pays DTensor dispatch on the host (about 15 ms of the toy model's synchronised step, measured). AdamW is
    elementwise, so stepping the shards is the same update; only the gradient norm needs the other ranks (one
    all-reduce)."""

    def __init__(self, model, **hparams):
        self.model = model
        self.names, self.params = zip(*model.named_parameters())
        with torch.no_grad():  # views of the shards: stepping them updates the model
            self.shards = [_local(p) for p in self.params]
        cuda = self.shards[0].is_cuda
        self.opt = torch.optim.AdamW(self.shards, fused=cuda, foreach=not cuda, **hparams)

    @torch.no_grad()
    def step(self, lr, max_norm=float("inf")):
        """Clip the gradients to global norm max_norm, take an AdamW step at lr, zero the gradients.
        Returns the global gradient norm before clipping (a device scalar: no host sync)."""
        for shard, p in zip(self.shards, self.params):
            shard.grad = None if p.grad is None else _local(p.grad)
        grads = [s for s in self.shards if s.grad is not None]
        norm_sq = torch.nn.utils.get_total_norm([s.grad for s in grads]) ** 2
        dist.all_reduce(norm_sq)  # sum of the ranks' squared norms
        norm = norm_sq.sqrt()
        if max_norm < float("inf"):
            torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)  # scales by min(1, max_norm / norm)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        return norm

    def gather(self, shards):
        """This rank's shards of tensors shaped like the parameters (the EMA), in their order -> {name: full CPU
        tensor} on rank 0 (None elsewhere). A collective: every rank calls it."""
        return {n: _full(s, p) for n, s, p in zip(self.names, shards, self.params)}

    def sharded_state_dict(self):
        """{name: {"step", "exp_avg", "exp_avg_sq"}}: AdamW's state as tensors laid out like the parameters (DTensors
        over this rank's shards, without a copy), for torch.distributed.checkpoint to save, or to load in place."""
        if not self.opt.state:  # before the first step: make the state tensors, so that a load has them to fill
            for s in self.shards:
                s.grad = torch.zeros_like(s)
            for group in self.opt.param_groups:
                group["lr"] = 0.0  # a step of size 0: moments of zero gradients, parameters unchanged
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return {n: {k: like(v, p) if v.ndim else v for k, v in self.opt.state[s].items()}
                for n, s, p in zip(self.names, self.shards, self.params)}

    def like_params(self, shards):
        """{name: tensor} of this rank's shards of tensors shaped like the parameters (the EMA), as DTensors laid out
        like them (no copy): what a checkpoint stores under GenTron's parameter names."""
        return {n: like(s, p) for n, s, p in zip(self.names, shards, self.params)}

    def load_full_state_dict(self, full):
        """AdamW's state from a single-file checkpoint ({"state": {name: {field: full tensor}}}, the same on every
        rank): each rank keeps its shard of every state tensor. Hyperparameters (betas, weight decay, eps; lr is
        set every step) stay this run's: a resumed run follows its flags, as it does for --lr and --clip."""
        state = self.sharded_state_dict()  # this rank's tensors, to fill in place
        for name, fields in full["state"].items():
            for k, v in fields.items():
                mine = state[name][k]
                mine = mine.to_local() if isinstance(mine, DTensor) else mine
                mine.copy_(_shard(v, self.params[self.names.index(name)]) if v.ndim else v)


def _local(t):
    """This rank's shard of a DTensor; a plain tensor is whole."""
    return t.to_local() if isinstance(t, DTensor) else t


def like(shard, param):
    """This rank's shard of a tensor shaped like `param` -> a DTensor laid out like it (sharing the shard's memory);
    a plain param: the shard is whole, and returned as it is."""
    if not isinstance(param, DTensor):
        return shard
    return DTensor.from_local(shard, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _full(shard, param):
    """This rank's shard of a tensor laid out like `param` -> the full tensor on the CPU on rank 0, None elsewhere
    (a collective)."""
    return full_cpu_on_master(like(shard, param))


def _shard(full, like):
    """A full tensor (the same on every rank) -> this rank's shard, laid out like the DTensor `like` (a plain
    tensor: the whole of it)."""
    if not isinstance(like, DTensor):
        return full.to(like.device, copy=True)
    shard = distribute_tensor(full.to(like.device), like.device_mesh, like.placements)  # rank 0's copy, scattered
    return shard.to_local().clone()  # its own memory: the optimizer updates it in place


# -----------------------------------------------------------------------------
# preemption: SIGTERM / SIGINT stop a run at a step all ranks agree on (train_t2i.py)


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send a job before they kill it) and SIGINT (Ctrl-C) while `with
    StopSignals() as stop` holds. In the training loop (phase "training") the first one only sets stop.signum: the
    loop reads it at its next check step, where all ranks agree to stop (an all-reduce, as for --time-limit), write
    a checkpoint and exit. A second signal exits at once; so does one during the set-up (nothing is trained yet)
    or the final samples (training is over)."""
    SAME = 1.0  # s: a repeat this soon is the same request, not a second one: torchrun passes on the terminal's
                # Ctrl-C that its workers got too, and scancel signals torchrun and its workers alike

    def __init__(self):
        self.signum, self.at, self.phase, self.told, self.previous = 0, 0.0, "set-up", False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers there only
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum and time.monotonic() - self.at < self.SAME:
            return
        if self.phase == "training" and not self.signum:
            self.signum, self.at = signum, time.monotonic()
            return
        name = signal.Signals(signum).name
        why = {"set-up": f"{name} during the set-up: exited before training",
               "training": f"{name} again: exited at once, without a checkpoint of the steps since the last one",
               "sampling": f"{name} during the final samples: exited (training had finished)"}[self.phase]
        try:  # the log lines printed so far; the signal may have interrupted a write to stdout itself
            sys.stdout.flush()
        except (OSError, RuntimeError):
            pass
        if int(os.environ.get("RANK", 0)) == 0:
            os.write(2, (why + "\n").encode())  # not print(): no buffer that the interrupted code may hold
        os._exit(exit_status(signum))


def exit_status(signum):
    """The exit status of a run stopped by a signal: 128 + N, that of a process the signal killed (143 for SIGTERM,
    130 for SIGINT). Not 0: a Kubernetes Job (restartPolicy OnFailure) or a SLURM requeue must see an unfinished
    run and start it again (with --resume), where 0 would mark it done; scripts that already read 143 as
    "preempted" keep working."""
    return 128 + signum
