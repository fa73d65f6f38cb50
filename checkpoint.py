"""
Checkpoint files, the two formats every script reads:
- a training run's `RUN/ckpt-NNNNNNN.pt`: plain types only (loads with weights_only=True) - model, EMA and
  optimizer state, step, data position, RNG state, the model config and the run's meta and flags;
- a `.safetensors` export (`sample.py --export`): EMA weights, with the config, meta and step as metadata.
Here: finding them, reading them, writing them (atomically), exporting, and starting a new run from one
(`--init-from`: same model at any resolution, or T2I weights into a T2V model, Sec. 3.3.1).
"""

import dataclasses
import json
import os
import pickle
import re
import textwrap

import torch
import torch.distributed as dist

from model import GenTron, GenTronConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# -----------------------------------------------------------------------------
# writing any file atomically (checkpoints, cache shards, score and result JSONs)


def atomic_write(path, write):
    """write(tmp) to a temp file beside path, then rename it to path: a killed run never leaves a
    complete-looking partial file. The file's bytes reach the disk before the rename and the rename before
    this returns (fsync), so a machine that loses power keeps the old file or the whole new one, and a caller
    may then delete older files (save_checkpoint's --keep). A failed write (a full disk) removes the temp file
    and is one OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        fsync(tmp)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's zip writer on a full disk
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path} ({str(e).splitlines()[0]})") from None
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))  # the folder's entry: the rename itself


def fsync(path):
    """Flush a file's or a folder's data to the disk (folders: POSIX only; elsewhere a no-op)."""
    if os.path.isdir(path) and not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def killed_write(name):
    """NAME for the temp file NAME.tmpPID that an atomic_write killed midway leaves behind, else None."""
    m = re.fullmatch(r"(.+)\.tmp\d*", name)  # (\d*: also the pid-less names of earlier versions)
    return m and m.group(1)


def free_name(base, taken=os.path.exists):
    """base, or base-2, base-3, ... (before the extension): the first name that is not `taken`, so that a new
    run's output never replaces an earlier run's."""
    stem, ext = os.path.splitext(base)
    name, k = base, 1
    while taken(name):
        k += 1
        name = f"{stem}-{k}{ext}"
    return name


def write_json(path, obj, **kwargs):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, **kwargs)
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# finding and reading


def checkpoint_step(path):
    """The step of a ckpt-NNNNNNN.pt path (from its name), None for any other file name."""
    m = re.fullmatch(r"ckpt-(\d+)\.pt", os.path.basename(path))
    return int(m.group(1)) if m else None


def checkpoints(run_dir):
    """A run directory's ckpt-*.pt paths, oldest (lowest step) first; [] if there are none."""
    if not os.path.isdir(run_dir):
        return []
    steps = sorted((s, f) for f in os.listdir(run_dir) if (s := checkpoint_step(f)) is not None)
    return [os.path.join(run_dir, f) for _, f in steps]


def resolve_checkpoint(path):
    """A run directory -> its newest ckpt-*.pt (highest step); a file -> itself."""
    if os.path.isdir(path):
        found = checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no ckpt-*.pt checkpoint in run directory {path}")
        return found[-1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_pt(path, mmap=False):
    """A ckpt-*.pt file's dict, plain types only (STYLE.md: never unpickle arbitrary objects); a file that is
    not one (truncated, another format) is a one-line ValueError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        # torch's weights_only refusal opens with a long preamble; its reason follows "WeightsUnpickler error:".
        cause = textwrap.shorten(f"{type(e).__name__}: {str(e).split('WeightsUnpickler error:')[-1]}", 200)
        raise ValueError(f"{path} is not a readable GenTron checkpoint ({cause}); "
                         "if it is a run's newest, move it away to resume from the one before") from None
    missing = [k for k in ("model", "config", "meta") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a GenTron checkpoint: missing {', '.join(missing)}")
    return ckpt


def export_metadata(path):
    """(config dict, meta dict, step) of a .safetensors export, read without its weights."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise ImportError("reading .safetensors models needs `pip install safetensors`") from None
    try:
        with safe_open(path, "pt") as f:
            md = f.metadata() or {}
    except Exception as e:  # safetensors' own error type for a damaged or foreign file
        cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
        raise ValueError(f"{path} is not a readable .safetensors file ({cause})") from None
    if "config" not in md or "meta" not in md:
        raise ValueError(f"{path} has no GenTron metadata ('config', 'meta'); make it with sample.py --export")
    step = int(md["step"]) if md.get("step", "").lstrip("-").isdigit() else None
    return json.loads(md["config"]), json.loads(md["meta"]), step


def read_checkpoint(path, ema=True):
    """-> (state dict, config dict, meta dict, step) of a .pt checkpoint or a .safetensors export."""
    if path.endswith(".safetensors"):
        config, meta, step = export_metadata(path)
        if not ema:
            raise ValueError(f"{path} is an export and holds EMA weights only; pass a ckpt-*.pt for --no-ema")
        from safetensors.torch import load_file

        return load_file(path), config, meta, step
    ckpt = load_pt(path)
    weights = ckpt.get("ema") if ema else ckpt["model"]
    if weights is None:
        raise ValueError(f"{path} has no EMA weights; pass --no-ema to sample with the raw weights")
    return weights, ckpt["config"], ckpt["meta"], ckpt.get("step")


def build_config(config, path=""):
    """GenTronConfig from the stored dict; fields added to model.py later keep their defaults."""
    names = {f.name for f in dataclasses.fields(GenTronConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"{path}: config has fields this model.py does not know: {', '.join(unknown)}")
    return GenTronConfig(**config)


def config_dict(config):
    """A stored config as dataclasses.asdict(GenTronConfig) would give it today: fields added to model.py after
    the checkpoint was written take their defaults, so old checkpoints compare equal to the same model."""
    return dataclasses.asdict(build_config(config))


# -----------------------------------------------------------------------------
# writing: training checkpoints and exports


def remove_partial_checkpoints(out):
    """Delete the temp files of checkpoint writes that were killed midway (nothing to resume from)."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if (killed_write(name) or "").startswith("ckpt-"):
            os.remove(os.path.join(out, name))


def save_checkpoint(out, step, weights, optimizer, pos, cfg, meta, args, keep):
    """Every rank calls it with the full state dicts gathered onto rank 0 (weights: fsdp.gather_weights; optimizer:
    fsdp.ShardedAdamW.full_state_dict; None for every tensor on the other ranks). Rank 0 writes ckpt-{step}.pt
    atomically (temp file + rename) and keeps the last `keep`. Returns the checkpoint dict on rank 0 (None elsewhere)."""
    ckpt = {**weights, "optimizer": optimizer, "step": step,
            "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": pos[0], "offset": pos[1]},
            "config": dataclasses.asdict(cfg), "meta": meta, "args": vars(args)}
    master = not dist.is_initialized() or dist.get_rank() == 0
    if master:
        path = os.path.join(out, f"ckpt-{step:07d}.pt")
        try:  # atomic: a crash never leaves a half-written newest checkpoint
            atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
        except OSError as e:
            raise OSError(f"{e}; the checkpoints already in {out} are intact") from None
        for old in checkpoints(out)[:-keep]:
            os.remove(old)
    dist.barrier()
    return ckpt if master else None


def export(ckpt, out, dtype="fp32"):
    """Write a checkpoint's EMA weights + {"config", "meta", "step"} metadata to a .safetensors file -> bytes."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("exporting needs `pip install safetensors`") from None
    if not out.endswith(".safetensors"):
        raise ValueError(f"export target {out} must end in .safetensors")
    file = resolve_checkpoint(ckpt)
    state, config, meta, step = read_checkpoint(file, ema=True)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    metadata = {"config": json.dumps(config), "meta": json.dumps(meta), "step": str(step)}
    atomic_write(out, lambda tmp: save_file(state, tmp, metadata=metadata))  # a model in use is replaced whole
    return os.path.getsize(out)


# -----------------------------------------------------------------------------
# a new run from another run's weights (--init-from)


def init_file(path):
    """--init-from: a run folder (its newest checkpoint), a ckpt-*.pt or a .safetensors export."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init-from: {e}") from None


def stored_settings(path):
    """(config, meta) of an --init-from run folder, checkpoint or export, without reading its weights."""
    path = init_file(path)
    if path.endswith(".safetensors"):
        return export_metadata(path)[:2]
    ckpt = load_pt(path, mmap=True)
    return ckpt["config"], ckpt["meta"]


def check_init(config, cfg, path):
    """Raise unless weights of a model with stored `config` can start this run's model `cfg` (--init-from):
    the same architecture at any resolution or clip length, or T2I weights into a T2V model (Sec. 3.3.1).
    Every rank calls it, so that all stop together (only rank 0 reads the weights)."""
    have, want = config_dict(config), dataclasses.asdict(cfg)
    diff = [k for k in want if k not in ("input_size", "num_frames", "temporal") and have.get(k) != want[k]]
    if diff:
        raise ValueError(f"--init-from {path} has a different model: "
                         + ", ".join(f"{k} {have.get(k)} (this run: {want[k]})" for k in diff))
    if have["temporal"] and not cfg.temporal:
        raise ValueError(f"--init-from {path} is a T2V model; a T2I run cannot start from it")


def load_init(path, cfg, seed):
    """(model, EMA) full state dicts of another run for a new run. Same architecture: any resolution (sin-cos
    positions are computed in forward, so a new grid needs nothing else; Sec. 4.1 256 -> 512). A T2I checkpoint
    into a T2V model: shared weights copied, new temporal layers keep their zero-output init (Sec. 3.3.1).
    Training runs it on rank 0 only."""
    path = init_file(path)
    if path.endswith(".safetensors"):  # an export (sample.py --export) holds EMA weights only: start both from them
        weights, config, _, step = read_checkpoint(path)
        weights = {k: v.float() for k, v in weights.items()}
        ckpt = {"model": weights, "ema": weights, "config": config, "step": step}
    else:
        ckpt = load_pt(path, mmap=True)
    check_init(ckpt["config"], cfg, path)
    if cfg.temporal and not ckpt["config"].get("temporal", False):  # T2I -> T2V
        torch.manual_seed(seed)
        m = GenTron(cfg)
        new = m.load_t2i_weights(ckpt["model"])
        print(f"init from T2I {path}: {len(new)} new temporal weights, {len(ckpt['model'])} copied")
        model_sd = m.state_dict()
        return model_sd, {**model_sd, **ckpt["ema"]}
    print(f"init from {path}: model and EMA weights of step {ckpt['step']}")
    return ckpt["model"], ckpt["ema"]
