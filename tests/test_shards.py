"""WebDataset .tar shards as --data (data.TarShards): the same items as a folder of the same files, bad members
skipped and counted the same way, a compact index, and a training run on shards that resumes exactly."""

import io
import json
import os
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
import train_t2i
from test_train import _free_port, load, tiny


def _images(n=10, seed=0):
    """n (name, bytes, caption) samples of random-coloured 40x48 images, PNG and JPEG alternately."""
    rng, out = np.random.default_rng(seed), []
    for k in range(n):
        fmt = ("png", "jpeg")[k % 2]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, format=fmt)
        out.append((f"s{k:03d}.{'png' if fmt == 'png' else 'jpg'}", buf.getvalue(), f"caption {k}"))
    out[3] = ("s003.png", out[3][1][:200], "caption 3")  # a truncated PNG: a bad sample
    return out


def _add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _write(tmp_path, samples, per_shard=6):
    """The samples as a folder (name + same-name .txt) and as shards-000000.tar, shards-000001.tar ..."""
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    folder.mkdir()
    shards.mkdir()
    for start in range(0, len(samples), per_shard):
        with tarfile.open(shards / f"shards-{start // per_shard:06d}.tar", "w") as tar:
            d = tarfile.TarInfo("sub")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)  # a directory member and
            for name, payload, caption in samples[start:start + per_shard]:
                key = "sub/" + name.split(".")[0]
                _add(tar, f"{key}.{name.split('.')[1]}", payload)
                _add(tar, f"{key}.json", b"{}")  # members of other kinds are ignored
                _add(tar, f"{key}.txt", caption.encode())
    for name, payload, caption in samples:
        (folder / name).write_bytes(payload)
        (folder / name).with_suffix(".txt").write_text(caption)
    return folder, shards


def test_shards_equal_the_folder_and_count_bad_members(tmp_path):
    folder, shards = _write(tmp_path, _images())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = data.ImageTextFolder(str(folder), size=16)
        ref_items = [ref[i] for i in range(len(ref))]
    specs = [str(shards), str(shards / "shards-{000000..000001}.tar")]
    for spec in specs:
        ds = data.ImageTextFolder(spec, size=16)
        assert len(ds) == len(ref) == 10
        with pytest.warns(UserWarning, match="skipped 1 unreadable"):
            items = [ds[i] for i in range(len(ds))]
        assert ds.num_bad == ref.num_bad == 1
        for a, b in zip(items, ref_items):  # the bad slot is refilled with the same item as the folder's
            assert torch.equal(a["x"], b["x"]) and a["caption"] == b["caption"]
        assert ds[10 + 2]["caption"] == "caption 2"  # epoch 1's index (training's epoch * len + i)
    one = data.ImageTextFolder(str(shards / "shards-000001.tar"), size=16)
    assert len(one) == 4 and one.caption(0) == "caption 6"


def test_video_shards_pass_the_member_bytes_to_the_decoder(tmp_path, monkeypatch):
    """KEY.mp4 + KEY.txt: read_clip gets the member's bytes and the per-epoch clip offset; a real decoder
    (PyAV / imageio-ffmpeg, optional) reads them (test_a_real_mp4_in_a_shard_reads_as_the_same_file_in_a_folder)."""
    seen = []

    def fake_read_clip(src, num_frames, target_fps, offset):
        assert isinstance(src, bytes)
        seen.append((src, offset))
        if src == b"broken":
            raise ValueError("cannot decode")
        return [np.full((8, 8, 3), src[-1], np.uint8)] * num_frames

    monkeypatch.setattr(data, "_video_plugin", lambda: None)
    monkeypatch.setattr(data, "read_clip", fake_read_clip)
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for k, payload in enumerate([b"video\x10", b"broken", b"video\x30"]):
            _add(tar, f"c{k}.mp4", payload)
            _add(tar, f"c{k}.txt", f"clip {k}".encode())
    ds = data.VideoTextFolder(str(tmp_path / "v.tar"), size=4, num_frames=2, seed=1)
    assert len(ds) == 3 and ds[0]["x"].shape == (2, 3, 4, 4) and ds[0]["caption"] == "clip 0"
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        assert ds[1]["caption"] in ("clip 0", "clip 2")
    assert ds.num_bad == 1
    offsets = [o for src, o in seen if src == b"video\x30"]
    ds[2], ds[3 + 2]  # epoch 0 and epoch 1 of item 2: another clip start
    offsets = [o for src, o in seen if src == b"video\x30"][len(offsets):]
    assert len(offsets) == 2 and offsets[0] != offsets[1]


def _moving_square_mp4(path, colour, n=12, side=64, fps=24):
    """n frames of side x side: a 16-pixel square of colour on dark blue, 4 pixels further right each frame."""
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    w = imageio.get_writer(str(path), fps=fps, codec="libx264", quality=10, macro_block_size=1,
                           ffmpeg_log_level="error")
    for k in range(n):
        frame = np.zeros((side, side, 3), np.uint8)
        frame[..., 2] = 80
        frame[24:40, 4 * k:4 * k + 16] = colour
        w.append_data(frame)
    w.close()


def test_a_real_mp4_in_a_shard_reads_as_the_same_file_in_a_folder(tmp_path):
    """Two real H.264 clips (imageio-ffmpeg, optional) as KEY.mp4 + KEY.txt in a shard and as files in a folder:
    item i of epoch e is the same tensor, bit for bit - the same bytes go through the same decoder (the shard's
    member is handed to imageio as bytes) and the clip start is drawn from (seed, epoch, i) alone - and it is the
    frames data.frame_indices names for that draw, of a square that moves."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for k, colour in enumerate([(255, 64, 0), (0, 255, 64)]):
        _moving_square_mp4(folder / f"v{k}.mp4", colour)
        (folder / f"v{k}.txt").write_text(f"a square {k} moving right")
    with tarfile.open(tmp_path / "v.tar", "w") as tar:
        for k in range(2):
            _add(tar, f"clips/v{k}.mp4", (folder / f"v{k}.mp4").read_bytes())
            _add(tar, f"clips/v{k}.txt", (folder / f"v{k}.txt").read_bytes())
    clip = data.read_clip(str(folder / "v0.mp4"), 4, 12, 0.0)
    from_bytes = data.read_clip((folder / "v0.mp4").read_bytes(), 4, 12, 0.0)  # what a shard's member goes through
    assert all(np.array_equal(a, b) for a, b in zip(clip, from_bytes, strict=True))
    kw = dict(size=32, num_frames=4, target_fps=12, seed=3)  # every 2nd of 12 frames: the start is 0 .. 5
    shard, ref = data.VideoTextFolder(str(tmp_path / "v.tar"), **kw), data.VideoTextFolder(str(folder), **kw)
    assert isinstance(shard.entries, data.TarShards) and len(shard) == len(ref) == 2

    import imageio.v3 as iio
    starts = set()
    for epoch in (0, 1):
        for i in range(2):
            a, b = shard[epoch * 2 + i], ref[epoch * 2 + i]
            assert a["caption"] == b["caption"] == f"a square {i} moving right"
            assert a["x"].shape == (4, 3, 32, 32) and torch.equal(a["x"], b["x"])  # exact, frame by frame
            offset = float(np.random.default_rng([3, epoch, i]).random())  # VideoTextFolder.load's draw
            src = iio.imread(str(folder / f"v{i}.mp4"), plugin="FFMPEG")  # every decoded frame, (12, 64, 64, 3)
            idx = data.frame_indices(len(src), 24, 4, 12, offset)
            starts.add(idx[0])
            want = torch.stack([data.resize_center_crop(Image.fromarray(src[k]), 32) for k in idx])
            assert torch.equal(a["x"], want), (epoch, i, idx)
            # not trivial: the square (its channel i + 0 red, 1 green, above 0) moves 4 * 2 / 2 = 4 pixels right
            # a sampled frame at 32 x 32
            mask = (a["x"][:, i] > 0).float()  # (T, H, W)
            assert (mask.sum(dim=(1, 2)) > 40).all()  # ~8 x 8 pixels of square in every frame
            cols = (mask.sum(dim=1) * torch.arange(32.0)).sum(dim=1) / mask.sum(dim=(1, 2))  # mean x per frame
            assert torch.allclose(torch.diff(cols), torch.full((3,), 4.0), atol=0.75), cols
            assert abs(cols[0] - (2 * idx[0] + 4 - 0.5)) < 0.75, (cols, idx)  # at the start frame's position
    assert len(starts) > 1  # the clip start changes over (epoch, i): the comparison above is per (epoch, i)


def test_shard_index_is_compact(tmp_path):
    """A few tens of bytes an item: 1M items cost ~36 MB per process, not ~300 MB of Python tuples."""
    _, shards = _write(tmp_path, _images(), per_shard=4)
    index = data.ImageTextFolder(str(shards), size=16).entries
    assert isinstance(index, data.TarShards) and len(index) == 10 and len(index.paths) == 3
    assert index.nbytes() / len(index) <= 40
    assert index.shard.dtype == np.int32 and index.offset.dtype == np.int64


def test_bad_shards_are_one_line_errors(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match="not a readable uncompressed .tar"):
        data.ImageTextFolder(str(tmp_path / "a.tar"))
    with tarfile.open(tmp_path / "b.tar", "w") as tar:
        _add(tar, "k.jpg", b"x")
    with pytest.raises(FileNotFoundError, match="k.txt is missing"):
        data.ImageTextFolder(str(tmp_path / "b.tar"))
    with tarfile.open(tmp_path / "c.tar", "w") as tar:
        _add(tar, "k.txt", b"only a caption")
    with pytest.raises(FileNotFoundError, match="no .* members"):
        data.ImageTextFolder(str(tmp_path / "c.tar"))
    with pytest.raises(FileNotFoundError, match="neither a folder, a .jsonl manifest nor .tar shards"):
        data.ImageTextFolder(str(tmp_path / "nowhere.tar"))


def _tarfile_index(paths, exts):
    """An independent reference: the index as tarfile reads the shards one after another, as (N, 5) rows of
    (shard, media offset, media size, caption offset, caption size)."""
    rows = []
    for s, path in enumerate(paths):
        samples = {}
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    d, name = os.path.split(m.name)
                    key, _, ext = name.partition(".")
                    samples.setdefault(os.path.join(d, key), {})[ext.lower()] = (m.offset_data, m.size)
        for members in samples.values():
            media = next((members[e] for e in members if "." + e in exts), None)
            if media is not None:
                rows.append((s, *media, *members["txt"]))
    return np.array(rows)


def _unusual_shards(tmp_path):
    """Shards with what tars hold beyond one plain header a member: a ustar name split into prefix/name, GNU
    long-name members (a name over 100 bytes), pax headers (a long and a non-ASCII name), directory entries, and
    a header with a bad checksum (tarfile ends the shard there); payloads of 0, 1, 511, 512 and 513 bytes."""
    long_dir = "d" * 80 + "/" + "e" * 40  # 121 bytes: ustar writes it as a prefix, GNU as an 'L' member
    shards = {"ustar.tar": (tarfile.USTAR_FORMAT, ["a", f"{long_dir}/b"]),
              "gnu.tar": (tarfile.GNU_FORMAT, ["c", "f" * 120 + "/g"]),
              "pax.tar": (tarfile.PAX_FORMAT, ["h", "g" * 120 + "/i", "ünï/j"])}
    sizes = iter([0, 1, 511, 512, 513] * 10)
    for name, (fmt, keys) in shards.items():
        with tarfile.open(tmp_path / name, "w", format=fmt) as tar:
            d = tarfile.TarInfo(long_dir)
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for key in keys:
                for ext in ("jpg", "json", "txt"):
                    _add(tar, f"{key}.{ext}", os.urandom(next(sizes)))
    raw = bytearray((tmp_path / "ustar.tar").read_bytes())
    with tarfile.open(tmp_path / "ustar.tar") as tar:
        raw[tar.getmembers()[4].offset + 148] ^= 1  # b.jpg's checksum field: b is not a sample
    (tmp_path / "bad-checksum.tar").write_bytes(raw)
    return [str(tmp_path / n) for n in [*shards, "bad-checksum.tar"]]


def test_the_index_equals_tarfiles_on_unusual_shards(tmp_path):
    """The index (headers read directly where they are plain ustar, by tarfile otherwise; one process or several)
    is tarfile's, item for item, on shards with long names, pax headers, directories and a bad header."""
    paths = _unusual_shards(tmp_path)
    for p in paths:
        with tarfile.open(p) as tar:
            want = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        got = data._ustar_files(p)
        assert got == want if p.endswith("/ustar.tar") else got is None, p  # anything unusual: to tarfile
    ref = _tarfile_index(paths, data.IMAGE_EXTS)
    assert len(ref) == 2 + 2 + 3 + 1
    for processes in (1, 2):
        index = data.TarShards(paths, data.IMAGE_EXTS, processes=processes)
        assert np.array_equal(index.shard, ref[:, 0]) and index.shard.dtype == np.int32
        assert np.array_equal(index.offset, ref[:, 1::2]) and np.array_equal(index.size, ref[:, 2::2])
        assert index.read(2, 1) == (tmp_path / "gnu.tar").read_bytes()[ref[2, 3]:ref[2, 3] + ref[2, 4]]


def test_a_bad_shard_is_the_same_one_line_error_in_parallel(tmp_path):
    """A shard cut inside a member's data, or missing a caption: the error tarfile's sequential scan gives, for
    the first bad shard in order, with no worker traceback chained to it."""
    _, shards = _write(tmp_path, _images(), per_shard=4)
    good = str(shards / "shards-000000.tar")
    with tarfile.open(good) as tar:
        cut = tar.getmembers()[1].offset_data + 1  # inside the first image's data
    (tmp_path / "cut.tar").write_bytes((shards / "shards-000000.tar").read_bytes()[:cut])
    with tarfile.open(tmp_path / "nocap.tar", "w") as tar:
        _add(tar, "k.jpg", b"x")
    cut, nocap = str(tmp_path / "cut.tar"), str(tmp_path / "nocap.tar")
    for processes in (1, 2):
        with pytest.raises(ValueError, match=r"^shard .*cut.tar is not a readable uncompressed .tar \(unexpected end "
                                             r"of data\)$") as e:
            data.TarShards([good, cut, nocap], data.IMAGE_EXTS, processes=processes)
        assert e.value.__cause__ is None
        with pytest.raises(FileNotFoundError, match=r"^caption member k.txt is missing in shard .*nocap.tar$"):
            data.TarShards([good, nocap, cut], data.IMAGE_EXTS, processes=processes)


def _scan_on_rank(rank, world, port, paths, out):
    """A rank of a gloo group building the index of paths -> out/rank.npz, or the error it raised -> out/rank.txt."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        index = data.TarShards(paths, data.IMAGE_EXTS, processes=1)
        np.savez(os.path.join(out, f"{rank}.npz"), shard=index.shard, offset=index.offset, size=index.size)
    except (ValueError, FileNotFoundError) as e:
        open(os.path.join(out, f"{rank}.txt"), "w").write(f"{type(e).__name__}: {e}")
    torch.distributed.destroy_process_group()


def test_ranks_share_the_scan_and_agree(tmp_path):
    """In a process group each rank scans every world-th shard: both ranks of 2 hold the index one process builds,
    and a bad shard is the same error on both (the first bad one in order, though another rank scanned it)."""
    _, shards = _write(tmp_path, _images(), per_shard=2)  # 5 shards: rank 0 scans 0, 2, 4 and rank 1 scans 1, 3
    paths = sorted(str(p) for p in shards.iterdir())
    one = data.TarShards(paths, data.IMAGE_EXTS, processes=1)
    mp.spawn(_scan_on_rank, args=(2, _free_port(), paths, str(tmp_path)), nprocs=2)
    for rank in range(2):
        got = np.load(tmp_path / f"{rank}.npz")
        assert all(np.array_equal(got[k], getattr(one, k)) for k in ("shard", "offset", "size"))
    with tarfile.open(tmp_path / "nocap.tar", "w") as tar:
        _add(tar, "k.jpg", b"x")
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    # rank 0 meets nocap.tar (shard 2), rank 1 junk.tar (shard 1): both ranks report junk.tar, the first in order
    bad = [paths[0], str(tmp_path / "junk.tar"), str(tmp_path / "nocap.tar"), paths[1]]
    mp.spawn(_scan_on_rank, args=(2, _free_port(), bad, str(tmp_path)), nprocs=2)
    said = {open(tmp_path / f"{rank}.txt").read() for rank in range(2)}
    assert len(said) == 1 and said.pop().startswith(f"ValueError: shard {tmp_path / 'junk.tar'} is not a readable")


def test_training_on_shards_resumes_exactly(tmp_path):
    """--data shards/: 4 images a step over 10 (one bad) in 2 shards, 2 loader workers; a run split at step 3
    equals the uninterrupted one bit for bit, across the epoch boundary."""
    _, shards = _write(tmp_path, _images())
    args = ("--data", str(shards), "--latent-space", "pixel", "--resolution", "32", "--num-workers", "2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dataset's warning at the 1st bad sample
        full = train_t2i.main(tiny(tmp_path / "full", 5, "--ckpt-every", "5", *args))
        first = train_t2i.main(tiny(tmp_path / "split", 3, "--ckpt-every", "3", *args))
        second = train_t2i.main(tiny(tmp_path / "split", 5, "--ckpt-every", "5", "--resume", *args))
    assert first["loss"] + second["loss"] == full["loss"]
    a, b = load(tmp_path / "full" / "ckpt-0000005"), load(tmp_path / "split" / "ckpt-0000005")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] and a["meta"]["dataset"] == str(shards)


def test_jsonl_manifest_index_is_compact(tmp_path):
    """A manifest's entries read as before ((path, ("text", caption)), paths from the manifest's folder) but cost
    their UTF-8 text plus 16 bytes an item, not a Python tuple of strings each."""
    lines = [{"image": f"imgs/{k:05d}.jpg", "caption": f"caption {k} é" if k % 3 else None} for k in range(1000)]
    lines[5]["image"] = "/abs/x.png"
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    index = data.ImageTextFolder(str(tmp_path / "m.jsonl")).entries
    want = [(os.path.join(str(tmp_path), r["image"]), ("text", r["caption"] or "")) for r in lines]
    assert list(index) == want and index[5][0] == "/abs/x.png"
    text = sum(len(r["image"].encode()) + len((r["caption"] or "").encode()) for r in lines)
    assert index.nbytes() == text + 16 * 1001


def test_a_rewritten_shard_changes_the_cache_fingerprint(tmp_path):
    """A cache records what its data read (cache.content_fingerprint): rewriting a shard, even with the same
    members at the same offsets, must change it, so an old cache of it is refused."""
    import time
    import cache

    shard = tmp_path / "s.tar"

    def write(colour):
        img = tmp_path / "a.png"
        Image.new("RGB", (8, 8), colour).save(img)
        (tmp_path / "a.txt").write_text("a caption")
        with tarfile.open(shard, "w") as tar:
            tar.add(img, arcname="a.png")
            tar.add(tmp_path / "a.txt", arcname="a.txt")

    write((255, 0, 0))
    before = cache.content_fingerprint(data.ImageTextFolder(str(shard), size=8))
    time.sleep(0.01)
    write((0, 0, 255))
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))  # a later modification time, whatever the clock
    assert cache.content_fingerprint(data.ImageTextFolder(str(shard), size=8)) != before
