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
from PIL import Image

import data
import train_t2i
from test_train import load, tiny


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
    (PyAV / imageio-ffmpeg, optional) reads bytes as it reads a path (test_data's decode test)."""
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
    a, b = load(tmp_path / "full" / "ckpt-0000005.pt"), load(tmp_path / "split" / "ckpt-0000005.pt")
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
