"""
The distributed runtime that training and bench.py share: one process group for any number of
processes (torchrun, or a 1-process group under plain `python`), rank-0 printing, the measured
matmul peak that MFU is reported against, and GenTron built as FSDP2 shards.

FSDP2 in torchtitan order: the model is built on the meta device, each block gets activation
checkpointing and torch.compile, then fully_shard per block and at the root (bf16 compute, fp32
gradient reduction), then to_empty and the weights of a seeded single-process init, broadcast
from rank 0 - so N ranks x batch b trains exactly like 1 rank x batch Nb (tests/test_train.py).
"""

import os

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

from model import GenTron

# -----------------------------------------------------------------------------
# distributed set-up


def setup_distributed(device=None):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain `python` gets a 1-process group, so the code path is
    the same. Returns (rank, world_size, device, created) - created: this call made the process group."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
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
# the model: meta device -> AC -> compile -> fully_shard per block -> root -> to_empty -> init


def fresh_state(cfg, seed):
    """The single-process initialisation (GenTron.init_weights under a fixed seed) as a full state dict."""
    torch.manual_seed(seed)
    return GenTron(cfg).state_dict()


def build_model(cfg, device, ac=False, compile=False, init_state=None, seed=0):
    """FSDP2-sharded GenTron. init_state: full state dict used on rank 0 (others ignore it); default: the
    seeded single-process init, so the weights do not depend on the number of ranks."""
    with torch.device("meta"):
        model = GenTron(cfg)  # no memory yet: shapes only
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute and all-gathers, fp32 gradient reduce-scatter; sharded fp32 master weights (CPU: fp32)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        # Replacing forward on the instance (rather than wrapping the module) keeps GenTron's parameter
        # names, and puts recompute inside the compiled graph (a composable checkpoint() hook would not).
        forward = block.forward
        if ac:  # Sec. 4.1: activation checkpointing for G/2 - keep block inputs, recompute the rest in backward
            forward = _checkpointed(forward)
        if compile:
            forward = torch.compile(forward)
        block.forward = forward
        fully_shard(block, mesh=mesh, mp_policy=mp)  # one all-gather / reduce-scatter unit per block
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embedders, text projection, final layer
    model.to_empty(device=device)  # allocate the local shards (uninitialised)
    # init: rank 0 builds the full model on CPU with init_weights() under the seed, and its weights are
    # broadcast and sharded - identical to single-process training for any number of ranks.
    load_full_state(model, (init_state if init_state is not None else fresh_state(cfg, seed)) if master_process() else {})
    return model


def load_full_state(model, state):
    """Load a full state dict, read on rank 0 only, into the sharded model: broadcast, each rank keeps its shard."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, dict(state) if master_process() else {}, options=options)  # dict(): it writes into it


def _checkpointed(forward):
    def checkpointed_forward(*args):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return checkpointed_forward


def full_tensors(tensors, names):
    """Sharded DTensors -> {name: full CPU tensor} (a collective: every rank calls it)."""
    return {n: t.full_tensor().cpu() for n, t in zip(names, tensors)}
