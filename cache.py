"""
The latent / text-feature cache: a dataset encoded once (VAE latents, frozen text-encoder features) into
shards on disk, so that training runs neither (`train_t2i.py --cache`). Written atomically and resumably; a
cache built with other settings, from files or captions that changed since, unfinished or damaged, is refused.
"""

import hashlib
import itertools
import json
import math
import os
import re
import time

import torch

from checkpoint import atomic_write, killed_write, write_json
from data import JointImageVideoDataset, TarShards, _MediaTextDataset, collate
from latents import latent_spec
from text_encoders import looks_like_path, parse_spec

# the fields of meta.json that the readers use (cache_spec's and build_cache's); a meta.json without them is not ours
META_KEYS = ("text_encoder", "text_dim", "pooled_dim", "latent_space", "latent_channels", "resolution", "num_frames",
             "dataset", "num_items", "shard_size")
SHARD = re.compile(r"shard_(\d+)\.pt")  # the shard files' names (shard_00000.pt, ...)


def cache_spec(text_encoder, latent_space, resolution, num_frames=None, dataset=""):
    """The settings a cache is built with; CachedDataset refuses a cache whose settings differ."""
    return {"text_encoder": text_encoder.spec, "text_dim": text_encoder.text_dim,
            "pooled_dim": text_encoder.pooled_dim, "max_length": getattr(text_encoder, "max_length", None),
            "latent_space": latent_space.spec, "latent_channels": latent_space.channels,
            "resolution": resolution, "num_frames": num_frames, "dataset": dataset}


def content_fingerprint(dataset):
    """A hash of what a file dataset reads: every media and caption file's path, size and modification time,
    and inline (JSONL) captions; of tar shards, each shard's (not each item's: 100,000 items in 20 shards hash in
    milliseconds instead of ~1 s) with the index of where their items lie; also through a joint dataset's videos
    and images. A cache stores it, so a cache
    built before files or captions changed is refused instead of silently training on the old ones. None for
    data that its spec alone defines (the synthetic datasets)."""
    h, found = hashlib.sha256(), False

    def walk(ds):
        nonlocal found
        if isinstance(ds, _MediaTextDataset) and isinstance(ds.entries, TarShards):
            found = True  # each shard's size and modification time, once, and where the items lie in them
            for path in ds.entries.paths:
                st = os.stat(path)
                h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            for column in (ds.entries.shard, ds.entries.offset, ds.entries.size):
                h.update(column.tobytes())
        elif isinstance(ds, _MediaTextDataset):
            found = True
            for path, (kind, v) in ds.entries:  # v: a caption file ("file") or the caption itself ("text")
                for f in (path, v) if kind == "file" else (path,):
                    st = os.stat(f) if os.path.exists(f) else None
                    h.update(f"{f}|{st and st.st_size}|{st and st.st_mtime_ns}\n".encode())
                if kind == "text":
                    h.update(f"caption|{v}\n".encode())
        elif isinstance(ds, JointImageVideoDataset):
            walk(ds.videos)
            walk(ds.images)

    walk(dataset)
    return h.hexdigest()[:16] if found else None


# a cache's storage dtype as meta.json names it; items read back as float32 whatever it is
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@torch.no_grad()
def build_cache(dataset, out_dir, text_encoder, latent_space, shard_size=4096, batch_size=64, num_workers=0,
                dataset_spec=None, dtype=None, progress=True, rank=0, world=1, poll=5.0, report_every=300.0):
    """Encode a dataset once into out_dir/shard_NNNNN.pt + meta.json; resumes a killed run.

    Every rank calls it with the same arguments: rank r encodes the shards k with k % world == r that are not on
    disk yet, with num_workers loader workers. Rank 0 writes meta.json (incomplete) before any shard, and the
    other ranks start only once it is there and agrees with their settings. Rank 0 marks it complete when every
    shard exists, waiting on the files (polling every `poll` s, and printing the missing shards every
    `report_every` s), not in a collective: a long build outlasts a process group's timeout. The other ranks
    return once it is complete.

    Each shard is a dict of plain tensors, lists and strings (torch.load(weights_only=True)):
    "x" latents (n, [T,] C, h, w), "text_mask" (n, L), "text" (the shard's real tokens, C) with each item's
    first row in "text_start" (n + 1,), "pooled" (n, P), "caption", "meta", and "motion_free" (n,) for videos.
    Only real tokens are stored: CLIP + T5 pad every caption to 197 positions and a caption fills ~10-60 of
    them. The float tensors are stored as dtype (default float32; torch.bfloat16 halves the disk), which
    meta.json records as "dtype".
    """
    from tqdm import tqdm

    dtype = dtype or torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"a cache stores {', '.join(map(str, DTYPES))}, not {dtype}")
    x0 = dataset[0]["x"]
    num_frames = x0.shape[0] if x0.dim() == 4 else None
    spec = cache_spec(text_encoder, latent_space, x0.shape[-1], num_frames,
                      dataset_spec or getattr(dataset, "spec", type(dataset).__name__))
    spec["content"] = content_fingerprint(dataset)  # files or captions changed since: refused below
    n, num_shards = len(dataset), math.ceil(len(dataset) / shard_size)
    meta = {**spec, "num_items": n, "shard_size": shard_size, "dtype": DTYPES[dtype]}
    shard_path = lambda k: os.path.join(out_dir, f"shard_{k:05d}.pt")
    mine = range(rank, num_shards, world)  # this rank's shards

    # meta.json first: rank 0 writes it, the others wait for it; each rank checks it against its own settings
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    names = os.listdir(out_dir)
    if not os.path.exists(meta_path):  # then no shard either (asked after listing: meta.json comes first), so
        # any file but a killed write of ours is someone else's
        for name in names:
            target = killed_write(name) or ""
            if not (target == "meta.json" or SHARD.fullmatch(target)):
                raise ValueError(f"{out_dir} holds other files ({name}) and no cache: "
                                 "give --cache a new or empty folder")
    while rank != 0 and not os.path.exists(meta_path):
        time.sleep(poll)
    have = read_meta(meta_path) if os.path.exists(meta_path) else {}
    if have:  # resume only a cache of the same settings
        _check_spec(have, meta, out_dir)
    if rank == 0 and not have.get("complete"):  # (a complete one stays so: the other ranks may be reading it)
        write_json(meta_path, {**meta, "complete": False})
    for name in os.listdir(out_dir):  # each rank removes what its own writes, cut off midway, left
        target = killed_write(name) or ""
        shard = SHARD.fullmatch(target)
        if (target == "meta.json" and rank == 0) or (shard and int(shard.group(1)) % world == rank):
            os.remove(os.path.join(out_dir, name))

    # this rank's missing shards, batch by batch through one loader (a batch never spans two shards)
    todo = [k for k in mine if not os.path.exists(shard_path(k))]  # written atomically: one on disk is complete
    bounds = {k: range(k * shard_size, min(n, (k + 1) * shard_size)) for k in mine}
    batches = [list(r[i : i + batch_size]) for k in todo for r in [bounds[k]] for i in range(0, len(r), batch_size)]
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                              collate_fn=collate))
    share = sum(len(r) for r in bounds.values())  # the bar counts items, on rank 0 alone
    bar = tqdm(total=share, initial=share - sum(len(bounds[k]) for k in todo), unit="item",
               desc="cache" + (f" (rank 0's share of {world} ranks)" if world > 1 else ""),
               disable=not progress or rank != 0)
    device = getattr(latent_space, "device", "cpu")
    for k in todo:
        parts = []
        for b in itertools.islice(loader, math.ceil(len(bounds[k]) / batch_size)):
            parts.append(_encode_batch(b, text_encoder, latent_space, device))
            bar.update(len(b["caption"]))
        _write_shard(shard_path(k), parts, dtype)
    bar.close()
    del loader  # its workers exit now, not after the wait below

    # every shard on disk (the other ranks' too), then rank 0 marks meta.json complete and the others see it
    started = last = time.monotonic()
    while missing := [k for k in range(num_shards) if not os.path.exists(shard_path(k))]:
        if rank == 0 and time.monotonic() - last >= report_every:  # a rank that died must not go unnoticed
            last = time.monotonic()
            print(f"cache: waited {last - started:.0f} s for {len(missing)} shard(s) of other ranks: "
                  + ", ".join(f"shard_{k:05d}.pt (rank {k % world})" for k in missing[:8])
                  + (" ..." if len(missing) > 8 else ""), flush=True)
        time.sleep(poll)
    if rank == 0:
        write_json(meta_path, {**meta, "complete": True})
    wait_until_complete(out_dir, poll)
    return read_meta(meta_path)


def _encode_batch(b, text_encoder, latent_space, device):
    """A collated batch -> its features on the CPU, text as the real tokens alone."""
    tokens, mask, pooled = text_encoder(b["caption"])
    mask = mask.bool()  # the real tokens alone, (real tokens, C): CachedDataset puts them back in place
    part = {"x": latent_space.encode(b["x"].to(device)), "text": tokens[mask], "text_mask": mask, "pooled": pooled}
    if "motion_free" in b:
        part["motion_free"] = b["motion_free"]
    part = {key: v.detach().cpu() for key, v in part.items()}
    return {**part, "caption": b["caption"], "meta": b["meta"] or [None] * len(b["caption"])}


def _write_shard(path, parts, dtype):
    """The encoded batches of one shard -> one file, float tensors stored as dtype (see build_cache)."""
    shard = {key: torch.cat([p[key] for p in parts]) for key in parts[0] if key not in ("caption", "meta")}
    shard = {key: v.to(dtype) if v.is_floating_point() else v for key, v in shard.items()}
    count = shard["text_mask"].sum(1)  # each item's rows of "text"
    shard["text_start"] = torch.cat([count.new_zeros(1), count.cumsum(0)])
    shard["caption"] = [c for p in parts for c in p["caption"]]
    shard["meta"] = [m for p in parts for m in p["meta"]]
    atomic_write(path, lambda tmp: torch.save(shard, tmp))


def wait_until_complete(out_dir, poll=5.0):
    """Block until build_cache (on another process) has marked out_dir/meta.json complete."""
    path = os.path.join(out_dir, "meta.json")
    while True:
        try:
            with open(path) as f:
                if json.load(f).get("complete"):
                    return
        except (OSError, ValueError):  # not written yet
            pass
        time.sleep(poll)


def check_kind(meta, path, video):
    """A video run needs a cache of videos, an image run one of images."""
    if video and not meta["num_frames"]:
        raise ValueError(f"{path} is a cache of images; train_t2v.py needs one of videos")
    if not video and meta["num_frames"]:
        raise ValueError(f"{path} is a cache of videos; train_t2i.py needs one of images (train_t2v.py trains on it)")


def check_flags(meta, path, given):
    """A cache fixes what it was made with: flags given on the command line ({flag: value or None}) must agree
    with its meta.json. A text encoder or VAE that the cache names by a local folder may be given as another
    existing folder (the same model, moved): the caller checks that what loads from it has the cache's shapes
    (meta's text_dim, pooled_dim, latent_channels)."""
    p = re.search(r":p_motion_free=([^:+]+)$", meta["dataset"])  # the spec's end (train_t2v.py), e.g. 1e-05
    made = {"--text-encoder": meta["text_encoder"], "--latent-space": meta["latent_space"],
            "--resolution": meta["resolution"], "--num-frames": meta["num_frames"],
            "--p-motion-free": float(p.group(1)) if p else None}
    for flag, value in given.items():
        if value is not None and made.get(flag) is not None and not _same_model(flag, made[flag], value):
            raise ValueError(f"the cache {path} was made with {flag} {made[flag]}, not {value}: "
                             f"drop the flag, or build a cache with it")


def _same_model(flag, made, given):
    """Whether the value `given` for flag names what the cache was `made` with: the same value, or for a model
    recorded as a local folder (text_encoders.looks_like_path) another existing folder. Hub and built-in names
    ("clip+t5", "tiny-clip+t5", "sd-vae", "pixel") must match exactly."""
    moved = lambda a, b: a == b or (looks_like_path(a) and os.path.isdir(b))
    if flag == "--latent-space":
        return moved(made, given)
    if flag != "--text-encoder" or made.startswith("tiny-") or given.startswith("tiny-"):  # (tiny: bundled folders)
        return made == given
    try:  # "clip=/ckpt/clip+t5=/ckpt/t5": the same kinds, each part from the same or a moved folder
        a, b = parse_spec(made), parse_spec(given)
    except ValueError:
        return False
    return [k for k, _, _ in a] == [k for k, _, _ in b] and all(moved(x, y) for (_, x, _), (_, y, _) in zip(a, b))


def is_cache(path):
    """Whether the folder `path` is a build_cache directory: a meta.json of ours (an image folder may hold a
    meta.json of its own), or shard files beside a meta.json (a damaged cache: read_meta then says what is wrong)."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return False
    if any(SHARD.fullmatch(name) for name in os.listdir(path)):
        return True
    try:
        read_meta(meta_path)
    except (OSError, ValueError):
        return False
    return True


def read_meta(meta_path):
    """A cache's meta.json, with the SD VAE under one name (caches before 2026-11-27 spelled it out)."""
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"{meta_path} is damaged ({e}): build the cache again") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"{meta_path} has no {missing[0]!r}: not the meta.json of a cache (build_cache)")
    meta["latent_space"] = latent_spec(meta["latent_space"])
    meta.setdefault("dtype", "fp32")  # caches without the field stored float32
    return meta


def _check_spec(have, want, out_dir):
    # name the first mismatched field, so the user knows what to rebuild
    for key, v in want.items():
        if key not in have:
            raise ValueError(f"cache {out_dir} has no field {key!r} in meta.json; rebuild it")
        if have[key] != v:
            raise ValueError(f"cache {out_dir} was built with {key}={have[key]!r} but {v!r} is expected; "
                             f"rebuild it with build_cache or use another directory")


class CachedDataset(torch.utils.data.Dataset):
    """Items of a build_cache directory: {"x", "text", "text_mask", "pooled", "caption", "meta", ...}.

    expect is a dict of settings (e.g. cache_spec(...) or just {"latent_space": "pixel"}); a cache
    built with anything else, or not finished, is refused. Shards are memory-mapped on first use; float tensors
    come as float32 whatever the cache stores (meta "dtype").
    """

    def __init__(self, out_dir, expect=None):
        meta_path = os.path.join(out_dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no cache at {out_dir} (missing {meta_path}); run build_cache first")
        self.meta = read_meta(meta_path)
        if not self.meta.get("complete"):
            raise ValueError(f"cache {out_dir} is incomplete (build_cache was interrupted); run it again to finish")
        _check_spec(self.meta, expect or {}, out_dir)
        self.out_dir, self.shard_size = out_dir, self.meta["shard_size"]
        self.shards = {}
        for k in range(math.ceil(len(self) / self.shard_size)):  # a damaged shard fails now, not hours in
            self._shard(k)
        self.shards = {}  # opened again where used: in each DataLoader worker

    def __len__(self):
        return self.meta["num_items"]

    def _shard(self, k):
        if k not in self.shards:  # mmap: only the rows that are read are paged in
            path = os.path.join(self.out_dir, f"shard_{k:05d}.pt")
            try:
                self.shards[k] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, OSError, EOFError) as e:  # truncated, emptied or missing
                raise ValueError(f"cache shard {path} is damaged ({str(e).splitlines()[0].split('. ')[0]}): delete "
                                 "it and run build_cache (train --cache) again to rewrite it") from None
        return self.shards[k]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s, j = self._shard(i // self.shard_size), i % self.shard_size
        item = {key: v[j] for key, v in s.items() if key not in ("text", "text_start")}
        if "text_start" not in s:  # a shard written before 2026-11-27: all L positions stored
            item["text"] = s["text"][j]
        else:
            real = s["text"][s["text_start"][j] : s["text_start"][j + 1]]  # (real tokens, C)
            item["text"] = real.new_zeros(item["text_mask"].shape[0], real.shape[1])  # (L, C), padding rows 0
            item["text"][item["text_mask"]] = real
        # float32 items whatever the cache stores (meta "dtype"), so that no reader needs to know it
        return {key: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for key, v in item.items()}
