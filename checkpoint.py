"""
Checkpoint files, the formats every script reads:
- a training run's checkpoint, the folder `RUN/ckpt-NNNNNNN/` in torch.distributed.checkpoint's (DCP) format:
    __R_0.distcp     rank R's shards of the model, its EMA and AdamW's moments: every rank writes its own, at once
    .metadata        DCP's index: each tensor's global shape and where its pieces are
    state.pt         step, data position, RNG state, the model config, the run's meta and flags (plain types)
    checksums.json   the size and CRC-32 of each file above, written last and checked on every load
  so that G/2's ~47 GB of weights, EMA and moments are never gathered onto one rank, and a run resumes on
  any number of ranks (DCP reshards on load). It is written as ckpt-NNNNNNN.tmp and renamed once every rank's
  files are on the disk: a folder named ckpt-NNNNNNN is whole. Single-file `ckpt-NNNNNNN.pt` checkpoints
  (model, EMA and optimizer state, with a CRC-32 of every tensor) still read and resume;
- a `.safetensors` export (`sample.py --export`): EMA weights, with the config, meta and step as metadata,
  for sampling and sharing.
Here: finding them, reading and verifying them, writing them (atomically; a full disk is one line that says
how much is needed and free), exporting, and starting a new run from one
(`--init-from`: same model at any resolution, T2I weights into a T2V model, Sec. 3.3.1, or an official DiT checkpoint,
dit_weights.py).
"""

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import textwrap
import warnings
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from dit_weights import DIT_META, check_dit, convert_dit, dit_config, read_dit
from model import GenTron, GenTronConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# -----------------------------------------------------------------------------
# writing any file atomically (checkpoints, cache shards, score and result JSONs)


def atomic_write(path, write, size=None):
    """write(tmp) to a temp file beside path, then rename it to path: a killed run never leaves a
    complete-looking partial file. The file's bytes reach the disk before the rename and the rename before
    this returns (fsync), so a machine that loses power keeps the old file or the whole new one, and a caller
    may then delete older files (save_checkpoint's --keep). A failed write (a full disk) removes the temp file
    and is one OSError; size() -> the bytes the file needs, for that message (default: what was written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free  # before: the failed write's own share
    try:
        write(tmp)
        fsync(tmp)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's zip writer on a full disk
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = f"could not write {path} ({str(e).splitlines()[0]})"
        raise OSError(f"{cause}: {space_report(path, size, written, free)}" if out_of_space(e) else cause) from None
    os.replace(tmp, path)
    fsync(os.path.dirname(os.path.abspath(path)))  # the folder's entry: the rename itself


def out_of_space(e):
    """Whether a failed write ran out of room: a full disk or quota, a file-size limit, or torch.save's zip writer
    reporting a short write ("unexpected pos", which hides the errno)."""
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "unexpected pos" in str(e)


def space_report(path, size=None, written=0, free=None):
    """Why a file did not fit, in a few words: the bytes it needs (size(), else more than the `written`), the free
    space on its disk before the write (shutil.disk_usage; default: now) and the process's file-size limit
    (`ulimit -f`) where that stopped it."""
    if free is None:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    try:
        need = size() if size else None
    except Exception:  # the count is a courtesy: never let it hide the write's own failure
        need = None
    needs = f"needs {human(need)}" if need else f"needs more than the {human(written)} written"
    try:
        import resource  # POSIX only

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        limit = None if limit == resource.RLIM_INFINITY else limit
    except ImportError:
        limit = None
    if limit is not None and (need or written + 1) > limit:
        return f"the file {needs} but this process may write files of at most {human(limit)} (ulimit -f)"
    return f"the disk is full: the file {needs} and {human(free)} was free there"


def human(n):
    """Bytes as a short size: 812.0 KiB, 23.4 MiB, 1.6 GiB."""
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


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


def check_writable(folder, flag="--out"):
    """A one-line ValueError now, before any model is loaded, if files cannot be written into folder (a read-only
    or pseudo file system such as /proc, no permission, a full disk): make it and its missing parents, write a
    probe file there, then remove the probe and every folder made here. A write can still fail later (the disk
    fills up meanwhile); atomic_write reports that."""
    made, f = [], os.path.abspath(folder)
    while not os.path.exists(f):
        made.append(f)
        f = os.path.dirname(f)
    made.reverse()  # parents first
    probe = os.path.join(folder, f".write-probe{os.getpid()}")
    try:
        for d in made:
            os.mkdir(d)
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 4096)  # a few blocks: a disk with no room left refuses them
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        where = f"{e.strerror}: {e.filename}" if e.strerror and e.filename else e
        raise ValueError(f"{flag} {folder}: cannot write there ({where})") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
        for d in reversed(made):
            if os.path.isdir(d):
                os.rmdir(d)


def write_json(path, obj, **kwargs):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, **kwargs)
    atomic_write(path, write)


# -----------------------------------------------------------------------------
# finding and reading


def checkpoint_step(path):
    """The step of a ckpt-NNNNNNN folder or ckpt-NNNNNNN.pt file (from its name), None for any other name."""
    m = re.fullmatch(r"ckpt-(\d+)(\.pt)?", os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def checkpoints(run_dir):
    """A run directory's checkpoints (ckpt-NNNNNNN folders and .pt files), oldest (lowest step) first; [] if none."""
    if not os.path.isdir(run_dir):
        return []
    steps = sorted((s, f) for f in os.listdir(run_dir) if (s := checkpoint_step(f)) is not None)
    return [os.path.join(run_dir, f) for _, f in steps]


def is_run_dir(path):
    """A folder that holds checkpoints (a run), rather than one checkpoint folder."""
    return os.path.isdir(path) and checkpoint_step(path) is None


def resolve_checkpoint(path):
    """A run directory -> its newest checkpoint (highest step); a checkpoint folder or file -> itself."""
    if is_run_dir(path):
        found = checkpoints(path)
        if not found:
            raise FileNotFoundError(f"no ckpt-NNNNNNN checkpoint in run directory {path}")
        return found[-1]
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path, weights=True, share=False):
    """A training checkpoint, verified -> {"step", "data", "rng", "config", "meta", "args"} and, with weights, its
    "model" and "ema" state dicts and "optimizer" ({"state": {name: {"step", "exp_avg", "exp_avg_sq"}}}) as full
    CPU tensors. weights=False reads a folder's small state.pt alone (training then loads its shards in place:
    load_sharded). share: every rank of the process group calls it, and each checks a share of the files.
    A damaged or incomplete checkpoint is a one-line ValueError naming it."""
    if not os.path.isdir(path):
        return load_pt(path, mmap=True)  # a single-file checkpoint
    verify_files(path, share)
    ckpt = read_state(path)
    check_index(path)
    if weights:
        ckpt.update(read_sharded(path))
    return ckpt


def read_state(path):
    """A checkpoint folder's state.pt (step, data position, RNG, config, meta, args)."""
    try:
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as e:  # missing, truncated or junk
        cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
        raise ValueError(f"{path} is not a readable GenTron checkpoint ({cause})") from None
    missing = [k for k in ("step", "config", "meta") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path} is not a GenTron checkpoint: state.pt has no {', '.join(missing)}")
    return state


# DCP's .metadata, the index of a checkpoint folder's tensors, is a pickle of DCP's own classes, and DCP unpickles
# it with no restriction. A checkpoint is data, never code (torch.load(weights_only=True) reads the shards): the
# index is first read here with only these classes allowed, and refused if it names anything else.
INDEX_CLASSES = {("torch.distributed.checkpoint.metadata", name) for name in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict")}


class IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in INDEX_CLASSES or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's index")


def check_index(path):
    """Raise a one-line ValueError unless the folder's .metadata unpickles with IndexUnpickler's classes alone."""
    try:
        with open(os.path.join(path, ".metadata"), "rb") as f:
            IndexUnpickler(f).load()
    except Exception as e:  # missing, junk, or a class that is not DCP's index
        raise ValueError(f"{path}/.metadata is not a checkpoint index ({type(e).__name__}: {e})") from None


def read_sharded(path, keys=("model", "ema", "optimizer")):
    """The tensors of a checkpoint folder as full CPU tensors, in one process: {"model": {name: tensor}, "ema":
    ..., "optimizer": {"state": {name: {field: tensor}}}} for the `keys` asked for. DCP's .metadata gives every
    tensor's global shape; DCP reads each one's pieces from whichever ranks wrote them."""
    check_index(path)
    layout = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in layout.items() if k.split(".")[0] in keys}
    nested = {key: {} for key in keys}
    for k, t in flat.items():  # "model.blocks.0.mlp.fc1.weight", "optimizer.blocks.0.mlp.fc1.weight.exp_avg"
        key, name = k.split(".", 1)
        if key == "optimizer":
            name, field = name.rsplit(".", 1)
            nested[key].setdefault(name, {})[field] = t
        else:
            nested[key][name] = t
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process reads it all, as meant
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(nested, checkpoint_id=path, no_dist=True)  # fills the tensors in place
    if "optimizer" in nested:
        nested["optimizer"] = {"state": nested["optimizer"]}
    return nested


def load_sharded(path, state):
    """Every rank: fill `state` ({"model", "ema", "optimizer"} of this rank's shards: DTensors, or whole tensors on
    one rank) in place from a checkpoint folder written by any number of ranks (DCP reshards)."""
    check_index(path)
    dcp.load(state, checkpoint_id=path)


def load_pt(path, mmap=False):
    """A ckpt-*.pt file's dict, plain types only (STYLE.md: never unpickle arbitrary objects), its tensors checked
    against the checksums it was written with (verify); a file that is not one (truncated, another format, junk)
    or whose bytes changed is a one-line ValueError naming it."""
    try:
        # mmap: the tensors stay on the disk until used (a zip file only: torch.save's format; junk gets torch's own
        # error below)
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # junk fails anywhere in torch's reader: UnpicklingError, RuntimeError, KeyError, ...
        # torch's weights_only refusal opens with a long preamble; its reason follows "WeightsUnpickler error:".
        cause = textwrap.shorten(f"{type(e).__name__}: {str(e).split('WeightsUnpickler error:')[-1]}", 200)
        raise ValueError(f"{path} is not a readable GenTron checkpoint ({cause})") from None
    missing = [k for k in ("model", "config", "meta") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a GenTron checkpoint: missing {', '.join(missing)}")
    verify(ckpt, path)
    return ckpt


# -----------------------------------------------------------------------------
# checksums: a checkpoint whose bytes changed on the disk (bit rot, a bad copy, an overwrite) is refused, not
# trained on; torch.load itself checks nothing of a tensor's bytes


def tensors(obj, prefix=""):
    """(name, tensor) of every tensor in nested dicts and lists, named by their keys: "model.final.linear.weight"."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from tensors(v, f"{prefix}.{k}" if prefix else str(k))


def crc(t):
    """CRC-32 of a tensor's bytes (zlib, ~1 GB/s): any changed byte changes it, unlike a sum of the values."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def checksums(ckpt):
    """{tensor name: CRC-32} of every tensor of a checkpoint dict (plain ints: it loads with weights_only=True)."""
    return {name: crc(t) for name, t in tensors({k: v for k, v in ckpt.items() if k != "checksums"})}


def verify(ckpt, path):
    """Raise a one-line ValueError unless every tensor's bytes are those save_checkpoint wrote. A checkpoint from
    before checksums has only its weights checked, for NaN and inf (what a save would never hold)."""
    found = dict(tensors({k: v for k, v in ckpt.items() if k != "checksums"}))
    if "checksums" not in ckpt:
        bad = next((n for n, t in tensors({"model": ckpt["model"], "ema": ckpt.get("ema")})
                    if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad:
            raise ValueError(f"{path} is corrupt: {bad} holds NaN or inf")
        return
    stored = ckpt["checksums"]
    if stored.keys() != found.keys():
        diff = sorted(stored.keys() ^ found.keys())
        raise ValueError(f"{path} is corrupt: {len(diff)} tensor(s) missing or unexpected, e.g. {diff[0]}")
    for name, t in found.items():
        if crc(t) != stored[name]:
            raise ValueError(f"{path} is corrupt: the bytes of {name} are not those written (CRC-32 mismatch)")


def file_crc(path, chunk=1 << 24):
    """CRC-32 of a file's bytes, read in 16 MiB pieces."""
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return value


def verify_files(path, share=False):
    """Raise a one-line ValueError unless every file of a checkpoint folder has the size and CRC-32 that
    checksums.json records (no checksums.json: a write that never finished). share: every rank calls it and
    checks every world-th file, and all ranks raise the same error."""
    try:
        with open(os.path.join(path, "checksums.json")) as f:
            sums = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is incomplete or damaged: no readable checksums.json ({e.__class__.__name__})") from None
    rank, world = (dist.get_rank(), dist.get_world_size()) if share and dist.is_initialized() else (0, 1)
    bad = None
    for name in sorted(sums)[rank::world]:
        file, (size, crc32) = os.path.join(path, name), sums[name]
        if not os.path.isfile(file):
            bad = f"{name} is missing"
        elif os.path.getsize(file) != size:
            bad = f"{name} has {os.path.getsize(file)} bytes, not the {size} written"
        elif file_crc(file) != crc32:
            bad = f"the bytes of {name} are not those written (CRC-32 mismatch)"
        if bad:
            break
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, bad)
        bad = next((b for b in found if b), None)
    if bad:
        raise ValueError(f"{path} is corrupt: {bad}")


def newest_good(found, say=print, flag="--resume", weights=False, share=False):
    """The newest of a run's checkpoints (checkpoints() order) that reads and verifies -> (path, ckpt), after one
    line each, through say(), for the newer ones that do not; none that does is one ValueError. Nothing is moved
    or deleted: a bad one stays for a look (a resumed run that reaches its step writes a good one in its place).
    weights, share: as load_checkpoint's."""
    bad = []
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path, weights, share)
        except ValueError as e:
            bad.append(str(e))
            continue
        for reason in bad:
            say(f"{flag}: skipping {reason}")
        return path, ckpt
    raise ValueError(f"none of the {len(found)} checkpoint(s) in {os.path.dirname(found[0])} reads and verifies "
                     f"(the newest: {bad[0]})")


def last_good_checkpoint(run_dir, share=False):
    """The newest checkpoint of a run that reads and verifies (the NaN guard names it), else "none"."""
    try:
        return newest_good(checkpoints(run_dir), say=lambda line: None, weights=False, share=share)[0]
    except (ValueError, IndexError):
        return "none"


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


def read_checkpoint(path, ema=True, ckpt=None):
    """-> (state dict, config dict, meta dict, step) of a checkpoint (folder or .pt) or a .safetensors export
    (ckpt: the checkpoint's dict, where it was read already)."""
    if path.endswith(".safetensors"):
        config, meta, step = export_metadata(path)
        if not ema:
            raise ValueError(f"{path} is an export and holds EMA weights only; pass a ckpt-NNNNNNN for --no-ema")
        from safetensors.torch import load_file

        return load_file(path), config, meta, step
    ckpt = ckpt or load_checkpoint(path, weights=False)
    key = "ema" if ema else "model"
    weights = ckpt.get(key) if key in ckpt else read_sharded(path, (key,))[key]  # a folder: read the one set
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


def remove(path):
    """Delete a checkpoint: a folder and its files, or one file."""
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def remove_partial_checkpoints(out):
    """Delete what checkpoint writes killed midway left (ckpt-NNNNNNN.tmp folders, temp files): nothing to resume
    from."""
    for name in os.listdir(out) if os.path.isdir(out) else []:
        if (killed_write(name) or "").startswith("ckpt-"):
            remove(os.path.join(out, name))


def save_checkpoint(out, step, state, pos, cfg, meta, args, keep):
    """Every rank calls it with its shards, state = {"model", "ema", "optimizer"} (fsdp.sharded_state). Each rank
    writes its own files into out/ckpt-{step}.tmp (DCP); rank 0 adds state.pt and checksums.json, renames the folder
    to out/ckpt-{step}, and keeps the newest `keep`. A failed write (a full disk) is one OSError on every rank,
    and the folder is removed; the earlier checkpoints are untouched."""
    path = os.path.join(out, f"ckpt-{step:07d}")
    tmp, rank = f"{path}.tmp", dist.get_rank()
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    free = shutil.disk_usage(out).free
    error = None
    try:
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))  # each file fsynced before it returns
        mine = {f: (os.path.getsize(os.path.join(tmp, f)), file_crc(os.path.join(tmp, f)))
                for f in os.listdir(tmp) if f.startswith(f"__{rank}_")}  # this rank's files, still in the page cache
    except (OSError, RuntimeError, dcp.CheckpointException) as e:  # DCP's: every rank's failures, as a BaseException
        first = next(iter(e.failures.values()))[0] if isinstance(e, dcp.CheckpointException) else e
        cause = str(first).splitlines()[0] if str(first) else type(first).__name__
        error = f"{cause}: {space_report(tmp, lambda: state_bytes(state), free=free)}" if out_of_space(first) else cause
        mine = {}
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (mine, error))
    error = next((e for _, e in found if e), None)
    if rank == 0 and error is None:
        try:
            extra = {"step": step, "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": pos[0], "offset": pos[1]},
                     "config": dataclasses.asdict(cfg), "meta": meta, "args": vars(args)}
            torch.save(extra, os.path.join(tmp, "state.pt"))
            sums = {name: v for files, _ in found for name, v in files.items()}
            for name in (".metadata", "state.pt"):
                fsync(os.path.join(tmp, name))
                sums[name] = (os.path.getsize(os.path.join(tmp, name)), file_crc(os.path.join(tmp, name)))
            write_json(os.path.join(tmp, "checksums.json"), sums)
            fsync(tmp)
            if os.path.exists(path):  # a checkpoint of this step that --resume found damaged and skipped
                shutil.rmtree(path)
            os.replace(tmp, path)  # the checkpoint appears whole, or not at all
            fsync(out)
        except (OSError, RuntimeError) as e:
            error = (f"{str(e).splitlines()[0]}: {space_report(tmp, lambda: state_bytes(state), free=free)}"
                     if out_of_space(e) else str(e).splitlines()[0])
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write {path} ({outcome[0]}); the checkpoints already in {out} are intact")
    if rank == 0:
        # keep the newest `keep` up to this step; later steps (a newer checkpoint that --resume found corrupt and
        # skipped) are left alone until this run reaches and rewrites them
        older = [p for p in checkpoints(out) if checkpoint_step(p) < step] if keep else []  # --keep 0: all
        for old in older[:max(0, len(older) - (keep - 1))]:
            remove(old)
    dist.barrier()


def state_bytes(state):
    """The bytes of a (sharded) state's tensors at their global sizes: about what its checkpoint takes on disk."""
    return sum(t.numel() * t.element_size() for _, t in tensors(state))


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
    """--init-from: a run folder (its newest checkpoint), a checkpoint, a .safetensors export or a DiT .pt."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--init-from: {e}") from None


def init_dit(path):
    """The state dict of an official DiT checkpoint given to --init-from (an init_file), else None. Our own
    ckpt-NNNNNNN.pt files are not opened for a look."""
    return None if checkpoint_step(path) is not None else read_dit(path)


def stored_settings(path):
    """(config, meta) of an --init-from run folder, checkpoint or export, without reading its weights."""
    path = init_file(path)
    if path.endswith(".safetensors"):
        return export_metadata(path)[:2]
    dit = init_dit(path)
    if dit is not None:  # DiT: the architecture its weights fix; SD-VAE latents and eps, as it was trained
        return dit_config(dit), dict(DIT_META)
    ckpt = load_checkpoint(path, weights=False)
    return ckpt["config"], ckpt["meta"]


def check_init(config, cfg, path):
    """Raise unless weights of a model with stored `config` can start this run's model `cfg` (--init-from):
    the same architecture at any resolution or clip length, or T2I weights into a T2V model (Sec. 3.3.1).
    Every rank calls it, so that all stop together (only rank 0 reads the weights)."""
    dit = init_dit(init_file(path))
    if dit is not None:  # an official DiT checkpoint: its own checks (dit_weights.py)
        return check_dit(dit, cfg, path)
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
    An official DiT checkpoint: converted (dit_weights.py), model and EMA both from it.
    Training runs it on rank 0 only."""
    path = init_file(path)
    dit = init_dit(path)
    if dit is not None:
        check_dit(dit, cfg, path)
        weights, copied = convert_dit(dit, cfg, seed)
        new = [k for k in weights if k not in copied]
        parts = sorted({k.split(".")[2] if k.startswith("blocks.") else k.split(".")[0] for k in new})
        print(f"init from DiT {path}: {len(copied)} weights copied (residual channels reordered to match our "
              f"position table), {len(new)} new ({', '.join(parts) or 'none'}); "
              f"class table and sigma channels dropped")
        return weights, dict(weights)
    if path.endswith(".safetensors"):  # an export (sample.py --export) holds EMA weights only: start both from them
        weights, config, _, step = read_checkpoint(path)
        weights = {k: v.float() for k, v in weights.items()}
        ckpt = {"model": weights, "ema": weights, "config": config, "step": step}
    else:
        ckpt = load_checkpoint(path, weights=False)
        if "model" not in ckpt:  # a folder: its weights and EMA, not the optimizer's moments
            ckpt.update(read_sharded(path, ("model", "ema")))
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


def truncate_log(path, step):
    """Keep a log's lines up to and including `step` (log.txt, and metrics.jsonl's JSON objects): a run resumed
    from an older checkpoint trains the steps after it again, which would otherwise be logged twice, out of
    order. Atomic (temp file + rename): a kill leaves the old log or the new one. Returns how many lines were
    dropped."""
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = 0
    for line in lines:  # "step N | ..." or '{"step": N, ...}' lines; a line cut short by a kill ends the log too
        m = re.match(r'(?:step |\{"step": )(\d+)\D', line)
        if not (m and line.endswith("\n") and int(m.group(1)) <= step):
            break
        keep += 1
    if keep < len(lines):
        def write(tmp):
            with open(tmp, "w") as f:
                f.writelines(lines[:keep])
        atomic_write(path, write)
    return len(lines) - keep
