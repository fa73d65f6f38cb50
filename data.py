"""
Data for GenTron: datasets and batching (latent spaces: latents.py; the latent/text cache: cache.py).

- synthetic shapes / moving shapes (built in, no files): see synthetic.py
- real image-text and video-text folders, JSONL manifests or WebDataset .tar shards (Sec. 4.1: 8 frames at 4 fps)
- joint image-video batches with motion-free pseudo-videos (Sec. 3.3.2, "Putting solutions together")

Every dataset item is a dict {"x": tensor, "caption": str, "meta": dict or None, ...};
images are (3, H, W) and videos (T, 3, H, W), floats in [-1, 1].
"""

import array
import concurrent.futures
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import tarfile
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageOps

from text_encoders import compact_caption

# -----------------------------------------------------------------------------
# batching

CACHED_KEYS = ("text", "text_mask", "pooled")  # text features read from a cache


def collate(batch):
    """List of items -> {"x", "caption", "meta", ["motion_free"], [cached text features]}.

    "x" is (B, C, H, W) for images or (B, T, C, H, W) for videos; for videos "motion_free" is a
    (B,) bool tensor (True for pseudo-videos of a repeated image, Sec. 3.3.2), False if an item
    does not say. "meta" is the list of ground-truth dicts, or None when no item has one. Cached text features
    come as text_encoders.compact_caption leaves them: each caption's real tokens first, cut to the positions the batch's
    longest caption needs (rounded up to 64), with a bool mask.
    """
    x = torch.stack([b["x"] for b in batch])  # (B, C, H, W) or (B, T, C, H, W)
    out = {"x": x, "caption": [b["caption"] for b in batch]}
    metas = [b.get("meta") for b in batch]
    out["meta"] = None if all(m is None for m in metas) else metas
    if x.dim() == 5:
        out["motion_free"] = torch.tensor([bool(b.get("motion_free", False)) for b in batch])
    for k in CACHED_KEYS:
        if k in batch[0]:
            out[k] = torch.stack([b[k] for b in batch])  # (B, L, C), (B, L), (B, P)
    if "text" in out:  # only the positions these captions need (CLIP + T5 pad each to 197), cut here in the worker
        out["text"], out["text_mask"] = compact_caption(out["text"], out["text_mask"].bool())
    return out


# -----------------------------------------------------------------------------
# real data: image-text and video-text folders, JSONL manifests or WebDataset .tar shards

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".avi", ".mkv")


def resize_center_crop(img, size):
    """PIL image -> float (3, size, size) in [-1, 1]: upright as its EXIF orientation says (phone photos), resize
    the shorter side to size, crop the centre."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit grey (Pillow opens some PNGs as "I"): scale to
        img = Image.fromarray((np.asarray(img).clip(0, 65535).astype(np.uint16) >> 8).astype(np.uint8))  # 8 bits
    if "A" in img.getbands() or "transparency" in img.info:  # transparent pixels are white, not their hidden RGB
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)  # crop the centre square, then resize it: a 2000 x 1 image never becomes 512000 x 256
    left, top = (w - side) // 2, (h - side) // 2
    img = img.resize((size, size), resample=Image.BICUBIC, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W)


class Manifest:
    """A JSONL manifest's entries, compact: every path and caption in one UTF-8 byte string each, with an offset
    array (8 bytes an item beyond the text), instead of a Python tuple of strings (~330 bytes an item: +333 MB
    for 1M lines in every rank and loader worker). Item i reads as a folder's entry: (path, ("text", caption))."""

    def __init__(self, root, key):
        self.root, self.base = root, os.path.dirname(os.path.abspath(root))
        paths, captions, ends = bytearray(), bytearray(), array.array("q", [0, 0])  # ends: path, caption pairs
        with open(root, encoding="utf-8-sig", errors="replace") as f:  # a stray non-UTF-8 byte: one caption char
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{root}:{n}: not valid JSON ({e})") from None
                if not isinstance(rec, dict) or key not in rec or "caption" not in rec:
                    raise ValueError(f"{root}:{n}: each line needs {key!r} and 'caption' fields")
                if not isinstance(rec[key], str) or not isinstance(rec["caption"], (str, type(None))):
                    raise ValueError(f"{root}:{n}: {key!r} must be a path and 'caption' a string (or null)")
                # a literal caption; "" (or null) trains as the null caption used for CFG
                paths += rec[key].encode("utf-8", "surrogatepass")
                captions += (rec["caption"] or "").encode("utf-8", "surrogatepass")
                ends.extend((len(paths), len(captions)))
        if len(ends) == 2:
            raise ValueError(f"manifest {root} has no entries")
        self.paths, self.captions = bytes(paths), bytes(captions)
        self.ends = np.frombuffer(ends, dtype=np.int64).reshape(-1, 2)  # (N + 1, 2): item i is [ends[i], ends[i+1])

    def __len__(self):
        return len(self.ends) - 1

    def nbytes(self):
        return len(self.paths) + len(self.captions) + self.ends.nbytes

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        (p0, c0), (p1, c1) = self.ends[i], self.ends[i + 1]
        text = lambda blob, a, b: blob[a:b].decode("utf-8", "surrogatepass")
        return os.path.join(self.base, text(self.paths, p0, p1)), ("text", text(self.captions, c0, c1))


def _list_pairs(root, exts, key):
    """(media path, caption or caption-file path) for a folder with same-name .txt files or a JSONL manifest."""
    if os.path.isfile(root) and root.endswith(".jsonl"):
        return Manifest(root, key)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is neither a folder, a .jsonl manifest nor .tar shards")
    entries = []
    folders, seen = [], set()  # linked folders are followed (datasets assembled with ln -s), each real one once
    for d, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:  # a second link to it, or a loop: do not descend
            dirs[:] = []
            continue
        seen.add(real)
        folders.append((d, files))
    for d, files in sorted(folders):
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in exts:
                txt = os.path.join(d, stem + ".txt")
                if not os.path.isfile(txt):
                    raise FileNotFoundError(f"caption file {txt} is missing for {os.path.join(d, name)}")
                entries.append((os.path.join(d, name), ("file", txt)))
    if not entries:
        raise FileNotFoundError(f"no {'/'.join(exts)} files in {root}")
    return entries


def shard_paths(root, exts=()):
    """The .tar shards that --data names, or None: one shard.tar, a brace pattern (shards-{000000..000099}.tar)
    or a folder holding *.tar files and no media files of exts at its top level."""
    m = re.fullmatch(r"(.*)\{(\d+)\.\.(\d+)\}(.*\.tar)", root)
    if m:  # zero-padded to the first number's width, as webdataset's brace notation
        head, a, b, tail = m.groups()
        return [f"{head}{k:0{len(a)}d}{tail}" for k in range(int(a), int(b) + 1)]
    if os.path.isfile(root) and root.endswith(".tar"):
        return [root]
    if os.path.isdir(root):
        names = sorted(os.listdir(root))
        if any(n.endswith(".tar") for n in names) and not any(os.path.splitext(n)[1].lower() in exts for n in names):
            return [os.path.join(root, n) for n in names if n.endswith(".tar")]
    return None


# A tar file is a run of 512-byte headers (POSIX ustar), each followed by its member's data padded to whole blocks.
_NUMBER = re.compile(rb" *[0-7]* *(?:\0.*)?", re.S)  # an octal number field laid out as tarfile reads it
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156), (329, 337), (337, 345))
# mode, uid, gid, size, mtime, checksum, devmajor, devminor


def _nts(field):
    """A NUL-terminated header field as text, decoded as tarfile decodes names."""
    return field.split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")


def _octal(field):
    """A number field that _NUMBER matched, as tarfile reads it (an empty one is 0)."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _ustar_files(path):
    """[(name, data offset, size)] of a tar's regular files, read from its ustar headers as tarfile reads them, or
    None as soon as a header is anything else - a pax or GNU header (long names), a sparse file, a link, a bad
    checksum or number field, a file cut short - and the caller hands that shard to tarfile. Why not tarfile alone:
    it parses every field and builds an object per member, and the whole scan takes 2.4x as long (4.6 s instead
    of 1.9 s for 20 shards of 5,000 image-caption pairs, one process, 2-core x86 CPU, 2026-12-08)."""
    files = []
    with open(path, "rb") as f:
        fd, pos, end = f.fileno(), 0, os.fstat(f.fileno()).st_size
        while pos + 512 <= end:
            h = os.pread(fd, 512, pos)
            if h == bytes(512):  # the end-of-archive block
                return files
            if not all(_NUMBER.fullmatch(h, a, b) for a, b in _NUMBER_FIELDS):
                return None
            if sum(h) - sum(h[148:156]) + 8 * 32 != _octal(h[148:156]):  # summed with the checksum field as spaces
                return None
            kind, name, prefix, size = h[156:157], _nts(h[:100]), _nts(h[345:500]), _octal(h[124:136])
            if kind == b"5":  # a directory: a header alone
                pos += 512
                continue
            if kind not in (b"0", b"\0", b"7") or name.endswith("/"):  # not a regular file, or an old-style folder
                return None
            files.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))  # a long name: prefix/name
            pos += 512 + -(-size // 512) * 512
    return None  # no end-of-archive block


def _scan_shard(path, exts):
    """Item i of one shard as offsets[2i:2i+2] and sizes[2i:2i+2] (media, caption): two array('q')."""
    try:
        files = _ustar_files(path)
        if files is None:
            with tarfile.open(path, "r:") as tar:  # "r:": compressed shards have no byte offsets to seek to
                files = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (OSError, tarfile.TarError) as e:
        raise ValueError(f"shard {path} is not a readable uncompressed .tar ({e})") from None
    samples = {}  # key -> {extension: (offset, size)}, in the order the shard holds them
    for name, offset, size in files:
        d, name = os.path.split(name)
        key, _, ext = name.partition(".")
        samples.setdefault(os.path.join(d, key), {})[ext.lower()] = (offset, size)
    offsets, sizes = array.array("q"), array.array("q")
    for key, members in samples.items():
        media = next((members[e] for e in members if "." + e in exts), None)
        if media is None:
            continue
        if "txt" not in members:
            raise FileNotFoundError(f"caption member {key}.txt is missing in shard {path}")
        offsets.extend((media[0], members["txt"][0]))
        sizes.extend((media[1], members["txt"][1]))
    return offsets, sizes


def _scan_shards(paths, exts, processes):
    """_scan_shard of each path, in order: in this process, or shared out to `processes` forked ones. Fork, not
    spawn: a spawned process imports this module again (with torch: 3.4 s on a 2-core CPU, 2026-12-08) and the
    calling script too, which then needs an `if __name__ == "__main__"` guard; a forked one runs only _scan_shard
    (file reads into Python objects, no torch), so it is safe in a torchrun rank that has started CUDA and NCCL,
    as DataLoader's forked workers are."""
    # one process: asked for, one shard, inside a DataLoader worker (a daemon, which may not start processes), or
    # where there is no fork (Windows)
    if (processes <= 1 or len(paths) <= 1 or multiprocessing.current_process().daemon
            or "fork" not in multiprocessing.get_all_start_methods()):
        yield from map(_scan_shard, paths, itertools.repeat(exts))
        return
    fork = multiprocessing.get_context("fork")
    pool = concurrent.futures.ProcessPoolExecutor(min(processes, len(paths)), mp_context=fork)
    try:
        yield from pool.map(_scan_shard, paths, itertools.repeat(exts))
    except (ValueError, FileNotFoundError) as e:  # a bad shard: its one-line error, without the worker's traceback
        raise e from None
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the shards not yet started are not scanned


def _scan_shared(paths, exts, processes):
    """_scan_shards of every path, in order, each rank of a process group scanning every world-th one. A bad shard
    is the same one-line error on every rank (the first bad one in order), not a rank that stops while the
    others wait."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    if world == 1:
        return list(_scan_shards(paths, exts, processes))
    mine, error = [], None
    try:
        for part in _scan_shards(paths[rank::world], exts, processes):
            mine.append(part)
    except (ValueError, FileNotFoundError) as e:
        error = (rank + world * len(mine), e)  # the bad shard's place in paths
    parts = [None] * world
    dist.all_gather_object(parts, (mine, error))
    errors = sorted((e for _, e in parts if e is not None), key=lambda e: e[0])
    if errors:
        raise errors[0][1]
    return [parts[i % world][0][i // world] for i in range(len(paths))]


class TarShards:
    """WebDataset tar shards as a compact, map-style index: each sample is the members that share a key
    (dir/KEY.jpg + dir/KEY.txt: the key is the name up to its first dot), and item i is where its media and
    caption bytes lie - five numbers, 36 bytes an item, instead of a Python tuple of paths (~300 bytes).

    Each shard is scanned once here (its 512-byte headers are read and the data seeked over), by `processes`
    processes side by side; the default is this process's share of the CPUs, as torchrun starts LOCAL_WORLD_SIZE
    ranks a machine. In a process group of N ranks each rank scans every N-th shard and the ranks exchange their
    parts (all_gather_object), so every rank of a training run must build it, as train_t2i.py does; N ranks scan
    N times as fast. An item is then read by seeking to its offset in the uncompressed
    tar, so the folder datasets' order, splitting over ranks and workers, exact resume and bad-file counting all
    apply unchanged. A sample without a media member of exts (e.g. a .json only) is not an item; one without a
    .txt caption is an error, as in a folder.
    """

    def __init__(self, paths, exts, processes=None):
        self.paths = list(paths)
        if processes is None:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            processes = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        offsets, sizes, counts = array.array("q"), array.array("q"), []  # columns grown shard by shard, 8 B a number
        for o, s in _scan_shared(self.paths, exts, processes):
            offsets += o
            sizes += s
            counts.append(len(o) // 2)
        if not offsets:
            raise FileNotFoundError(f"no {'/'.join(exts)} members in {len(self.paths)} shard(s) {self.paths[0]} ...")
        self.shard = np.repeat(np.arange(len(self.paths), dtype=np.int32), counts)  # (N,)
        self.offset = np.frombuffer(offsets, dtype=np.int64).reshape(-1, 2)  # (N, 2): media, caption; no copy
        self.size = np.frombuffer(sizes, dtype=np.int64).reshape(-1, 2)  # (N, 2)

    def __len__(self):
        return len(self.shard)

    def nbytes(self):
        return self.shard.nbytes + self.offset.nbytes + self.size.nbytes

    def __getitem__(self, i):
        """(name, ("tar", shard path)) - the layout of a folder's entries (cache.content_fingerprint reads them)."""
        path = self.paths[self.shard[i]]
        return f"{path}@{self.offset[i, 0]}", ("tar", path)

    def read(self, i, member):
        """The bytes of item i's media (member 0) or caption (member 1)."""
        with open(self.paths[self.shard[i]], "rb") as f:
            f.seek(int(self.offset[i, member]))
            data = f.read(int(self.size[i, member]))
        if len(data) != self.size[i, member]:
            raise EOFError(f"{self[i][0]}: shard truncated")
        return data


REFILL_DRAWS = 8  # random replacements tried for an unreadable file before a scan of the whole folder


class _MediaTextDataset(torch.utils.data.Dataset):
    """Shared logic: listing, captions, and skipping bad files so that a long run never dies on one.

    A file that cannot be decoded (unreadable, truncated, wrong format) is skipped and its slot refilled with
    another readable file, drawn from the index (so a resumed run reads the same). Why refill instead of dropping
    the item: every step trains on a global batch of exactly B items, split evenly over ranks, with noise drawn
    for B (fsdp.py); a dropped item would leave one rank a short micro-batch and break a resumed run's exactness.
    The price is one duplicate per bad file per epoch: a few in a million for a real dataset, no measurable
    bias. The replacement is random rather than the next file, so a run of bad files (a broken sub-folder) is
    spread over the dataset instead of repeating its one neighbour as many times.

    The count is exact across DataLoader workers (separate processes, fork or spawn): one flag per file and the
    count live in shared memory behind one lock, so each bad file is counted once, by whichever process met it
    first. One warning at 1, 10, 100, ... bad files; the training loop prints the total once per epoch.

    per_epoch: training asks for index epoch * len + i (fsdp.DistributedBatches), which __getitem__ splits: a
    video's clip start is drawn per epoch (VideoTextFolder.load).
    """

    exts, key, per_epoch = (), "", True

    def __init__(self, root):
        self.root = root
        shards = shard_paths(root, self.exts)
        self.entries = TarShards(shards, self.exts) if shards else _list_pairs(root, self.exts, self.key)
        # shared with the DataLoader's workers: which files are bad, and how many
        self._bad = torch.zeros(len(self.entries), dtype=torch.bool).share_memory_()
        self._count = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._lock = multiprocessing.get_context("spawn").Lock()  # spawn's: shareable with forked workers too

    def __len__(self):
        return len(self.entries)

    @property
    def num_bad(self):
        return int(self._count[0])

    def caption(self, i):
        kind, v = self.entries[i][1]
        if kind == "text":
            return v
        if kind == "tar":
            return self.entries.read(i, 1).decode("utf-8-sig", errors="replace").strip()
        with open(v, encoding="utf-8-sig", errors="replace") as f:  # a BOM is not caption text
            return f.read().strip()  # an empty file -> "" -> the null caption

    def __getitem__(self, index):
        n = len(self)
        epoch, i = divmod(index, n)  # epoch > 0 in training (per_epoch)
        rng = np.random.default_rng([n, i])  # i, then REFILL_DRAWS random files, then all of them in order
        for j in [i, *rng.integers(n, size=REFILL_DRAWS).tolist(), *range(n)]:
            if self._bad[j]:
                continue
            try:
                x, caption = self.load(self.media(j), j, epoch), self.caption(j)
            except Exception as e:  # noqa: BLE001 - any decoder error means "bad file"
                self._flag_bad(j, e)
                continue
            return {"x": x, "caption": caption, "meta": None}
        raise ValueError(f"no readable files in {self.root} ({self.num_bad} bad)")

    def media(self, j):
        """What load() opens: item j's file path, or its bytes in a tar shard (as a file object)."""
        path, (kind, _) = self.entries[j]
        return io.BytesIO(self.entries.read(j, 0)) if kind == "tar" else path

    def _flag_bad(self, j, error):
        """Count file j once (over all workers); warn at 1, 10, 100, ... bad files."""
        with self._lock:
            if self._bad[j]:  # another worker met it first
                return
            self._bad[j] = True
            self._count += 1
            count = int(self._count[0])
        if math.log10(count).is_integer():
            warnings.warn(f"{type(self).__name__}({self.root}): skipped {count} unreadable file(s) so far (each "
                          f"slot refilled with another file), latest {self.entries[j][0]}: {error!r}")


class ImageTextFolder(_MediaTextDataset):
    """Images with same-name .txt captions (a folder or WebDataset .tar shards), or a JSONL manifest of
    {"image", "caption"}."""

    exts, key = IMAGE_EXTS, "image"

    def __init__(self, root, size=256):
        super().__init__(root)
        self.size = size

    def load(self, path, i, epoch=0):
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file raises here
            return resize_center_crop(img, self.size)


def frame_indices(num_src_frames, src_fps, num_frames=8, target_fps=4, offset=0.0):
    """Source frame indices of num_frames frames at target_fps (paper Sec. 4.1: 8 frames at 4 fps of 24 fps).

    The stride is src_fps / target_fps (6 for 24 -> 4 fps); offset in [0, 1] picks where the clip
    starts among all valid starts. A video shorter than the clip is sampled evenly over its length.
    """
    if num_src_frames < 1:
        raise ValueError("video has no frames")
    stride = src_fps / target_fps
    if (num_frames - 1) * stride > num_src_frames - 1:  # too short: squeeze the clip into the video
        stride = (num_src_frames - 1) / max(1, num_frames - 1)
    start = offset * (num_src_frames - 1 - (num_frames - 1) * stride)
    return [min(num_src_frames - 1, int(round(start + k * stride))) for k in range(num_frames)]


def _video_plugin():
    # PyAV if installed, else imageio-ffmpeg; both through imageio's v3 API
    try:
        import imageio.v3 as iio
    except ImportError:
        raise ImportError("video decoding needs `pip install imageio imageio-ffmpeg` (or av)") from None
    for module, plugin in (("av", "pyav"), ("imageio_ffmpeg", "FFMPEG")):
        try:
            __import__(module)
            return iio, plugin
        except ImportError:
            pass
    raise ImportError("video decoding needs `pip install imageio-ffmpeg` or `pip install av`")


def read_clip(path, num_frames=8, target_fps=4, offset=0.0):
    """Decode num_frames frames at target_fps from a video file -> list of (H, W, 3) uint8 arrays."""
    iio, plugin = _video_plugin()
    with _open_video(iio, plugin, path) as f:
        meta = f.metadata()
    fps = float(meta.get("fps") or 0)
    if fps <= 0:
        raise ValueError(f"{path if isinstance(path, str) else 'video'}: unknown frame rate")
    # the header's duration gives the frame count: decode up to the last needed frame, keep only those
    est = int(round(float(meta.get("duration") or 0) * fps))
    if est > 0:
        idx = frame_indices(est, fps, num_frames, target_fps, offset)
        frames = _decode(iio, plugin, path, set(idx))
        if frames is not None:
            return [frames[k] for k in idx]
    # the length was unknown or over-estimated: decode every frame once, then pick
    frames = _decode(iio, plugin, path)
    return [frames[k] for k in frame_indices(len(frames), fps, num_frames, target_fps, offset)]


def _open_video(iio, plugin, path):
    """imageio's reader of a video file, or of a tar member's bytes. imageio-ffmpeg picks its readers by the file
    name's extension, which bytes lack: ".mp4" lets it open them, and ffmpeg then reads the container's format
    from the bytes themselves (webm, mov, ... as well)."""
    return iio.imopen(path, "r", plugin=plugin, **({"extension": ".mp4"} if isinstance(path, bytes) else {}))


def _decode(iio, plugin, path, want=None):
    """{index: frame} of the frames in want (every frame if None); None if the video ends before max(want)."""
    out, last = {}, max(want) if want else math.inf
    with _open_video(iio, plugin, path) as f:
        for k, frame in enumerate(f.iter()):
            if want is None or k in want:
                out[k] = frame
            if k >= last:
                return out
    return out if want is None else None


class VideoTextFolder(_MediaTextDataset):
    """Videos with same-name .txt captions (a folder or WebDataset .tar shards), or a JSONL manifest of
    {"video", "caption"}.

    Item i is a clip of num_frames frames at target_fps; where it starts in the video is drawn from
    (seed, epoch, i): another part of a long video each epoch, and a resumed run is identical. Decoding
    uses PyAV or imageio-ffmpeg (optional).
    """

    exts, key = VIDEO_EXTS, "video"

    def __init__(self, root, size=256, num_frames=8, target_fps=4, seed=0):
        super().__init__(root)
        _video_plugin()  # fail at construction, not in a worker, if no decoder is installed
        self.size, self.num_frames, self.target_fps, self.seed = size, num_frames, target_fps, seed

    def load(self, path, i, epoch=0):
        offset = float(np.random.default_rng([self.seed, epoch, i]).random())
        if isinstance(path, io.BytesIO):  # a shard's member: imageio reads bytes (opened twice, so not a stream)
            path = path.getvalue()
        frames = read_clip(path, self.num_frames, self.target_fps, offset)
        return torch.stack([resize_center_crop(Image.fromarray(f), self.size) for f in frames])  # (T, 3, H, W)


# -----------------------------------------------------------------------------
# joint image-video training (Sec. 3.3.2, "Putting solutions together")


class JointImageVideoDataset(torch.utils.data.Dataset):
    """Item i: with probability p_motion_free an image repeated T times (motion_free=True), else a clip.

    Motion-free guidance disables temporal attention with probability p_motion_free (identity
    mask, Fig. 3); those iterations can train on images as static pseudo-videos instead of clips.
    The choice and the image are drawn from (seed, epoch, i) (per_epoch, see _MediaTextDataset): each
    epoch other clips are replaced and other images used, the fraction is exact in expectation, and a
    resumed run is identical.
    """

    per_epoch = True

    def __init__(self, videos, images, p_motion_free=0.5, num_frames=8, seed=0):
        if not 0.0 <= p_motion_free <= 1.0:
            raise ValueError(f"p_motion_free must be in [0, 1], got {p_motion_free}")
        self.videos, self.images = videos, images
        self.p, self.num_frames, self.seed = p_motion_free, num_frames, seed

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        # The DataLoader's batched fetch: the images and the clips of a batch are each fetched in one
        # call, so a source with a batched __getitems__ (the synthetic data) renders its share at once.
        sources = []  # (motion-free?, index into images or videos), drawn from (seed, epoch, i)
        for index in indices:
            epoch, i = divmod(index, len(self))
            rng = np.random.default_rng([self.seed, epoch, i])
            mf = bool(rng.random() < self.p)
            video = epoch * len(self.videos) + i if getattr(self.videos, "per_epoch", False) else i
            image = int(rng.integers(len(self.images)))
            image += epoch * len(self.images) if getattr(self.images, "per_epoch", False) else 0
            sources.append((mf, image if mf else video))
        out = [None] * len(indices)
        for motion_free, ds in ((True, self.images), (False, self.videos)):
            pos = [k for k, (mf, _) in enumerate(sources) if mf == motion_free]
            if not pos:
                continue
            for k, item in zip(pos, _fetch(ds, [sources[k][1] for k in pos])):
                item = dict(item)
                if motion_free:
                    item["x"] = item["x"].unsqueeze(0).repeat(self.num_frames, 1, 1, 1)  # (T, C, H, W) exact repeats
                elif item["x"].shape[0] != self.num_frames:
                    raise ValueError(f"video item {indices[k]} has {item['x'].shape[0]} frames, expected {self.num_frames}")
                item["motion_free"] = motion_free
                out[k] = item
        return out


def _fetch(ds, indices):
    """ds's items at indices, in one batched call where the dataset has one."""
    getitems = getattr(ds, "__getitems__", None)
    return getitems(indices) if getitems is not None else [ds[i] for i in indices]
