"""cache.build_cache on several ranks (simulated by threads on one out_dir, as torchrun's processes on one
filesystem): the same cache as one rank builds, resumable, refused alike on every rank; its progress bar in
items; bf16 storage; and check_flags on a moved encoder folder."""

import json
import os
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import torch  # noqa: E402

import cache  # noqa: E402
import latents  # noqa: E402
import synthetic  # noqa: E402
from text_encoders import load_text_encoder  # noqa: E402


@pytest.fixture(scope="module")
def enc():
    return load_text_encoder("tiny-clip+t5")  # bundled, offline


class Killed(Exception):
    pass


class Dying:
    """The encoder of a rank that is killed on its (fail_after + 1)-th batch; counts the batches it encodes."""

    def __init__(self, enc, fail_after=None):
        self.enc, self.fail_after, self.calls = enc, fail_after, 0
        self.spec, self.text_dim, self.pooled_dim = enc.spec, enc.text_dim, enc.pooled_dim
        self.max_length = enc.max_length

    def __call__(self, captions):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Killed("killed")
        self.calls += 1
        return self.enc(captions)


def on_ranks(world, build, first=None):
    """[build(rank) for each rank], each rank on its own thread (rank `first` started first); a rank's error is
    returned in its place."""
    out = [None] * world

    def run(r):
        try:
            out[r] = build(r)
        except Exception as e:  # noqa: BLE001
            out[r] = e

    threads = {r: threading.Thread(target=run, args=(r,), name=f"rank{r}", daemon=True) for r in range(world)}
    for r in sorted(threads, key=lambda r: r != first):
        threads[r].start()
        time.sleep(0.05 if r == first else 0)
    for t in threads.values():
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads.values()), "a rank still waits"
    return out


def same_items(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys() and x["caption"] == y["caption"] and x["meta"] == y["meta"]
        for k in ("x", "text", "text_mask", "pooled"):
            assert torch.equal(x[k], y[k]), (i, k)


def test_two_ranks_build_the_cache_one_rank_builds(tmp_path, enc, monkeypatch):
    """Rank r writes the shards k % 2 == r, none before meta.json is there (rank 1 starts first and waits);
    the cache equals, item for item, one rank's with 2 loader workers (the same batches: batch_size divides
    the shards)."""
    ds = synthetic.ShapesDataset(seed=0, length=9)  # 5 shards of 2, the last one 1 item
    one = cache.build_cache(ds, str(tmp_path / "one"), enc, latents.PixelSpace(), shard_size=2, batch_size=2,
                            num_workers=2, progress=False)
    writes = []  # (rank, file, whether meta.json was there then)

    def spy(write):
        def written(path, *a, **kw):
            meta_there = os.path.exists(os.path.join(os.path.dirname(path), "meta.json"))
            writes.append((threading.current_thread().name, os.path.basename(path), meta_there))
            return write(path, *a, **kw)
        return written

    monkeypatch.setattr(cache, "atomic_write", spy(cache.atomic_write))  # the shards
    monkeypatch.setattr(cache, "write_json", spy(cache.write_json))  # meta.json
    out = str(tmp_path / "two")
    metas = on_ranks(2, lambda r: cache.build_cache(ds, out, enc, latents.PixelSpace(), shard_size=2, batch_size=2,
                                                    progress=False, rank=r, world=2, poll=0.01), first=1)
    assert metas[0] == metas[1] and metas[0] == one and one["complete"]
    shards = sorted((name, who) for who, name, _ in writes if name.startswith("shard"))
    assert shards == [(f"shard_{k:05d}.pt", f"rank{k % 2}") for k in range(5)]
    assert all(meta_there for who, name, meta_there in writes if name.startswith("shard"))
    assert [w[:2] for w in writes if w[1] == "meta.json"] == [("rank0", "meta.json")] * 2  # incomplete, complete
    same_items(cache.CachedDataset(out), cache.CachedDataset(str(tmp_path / "one")))


def test_killed_two_rank_build_resumes(tmp_path, enc):
    """Both ranks die after their first shard (and leave a half-written one); the resumed 2-rank build encodes
    only the missing shards, each on its own rank, and ends complete and equal to a one-rank build."""
    ds = synthetic.ShapesDataset(seed=3, length=10)  # 5 shards of 2: rank 0 has 0, 2, 4; rank 1 has 1, 3
    out = str(tmp_path / "c")
    build = lambda encs, r: cache.build_cache(ds, out, encs[r], latents.PixelSpace(), shard_size=2, batch_size=2,
                                              progress=False, rank=r, world=2, poll=0.01)
    dying = [Dying(enc, fail_after=1), Dying(enc, fail_after=1)]
    assert all(isinstance(e, Killed) for e in on_ranks(2, lambda r: build(dying, r)))
    (tmp_path / "c" / "shard_00003.pt.tmp999").write_bytes(b"half a shard")  # what a kill mid-write leaves
    assert sorted(os.listdir(out)) == ["meta.json", "shard_00000.pt", "shard_00001.pt", "shard_00003.pt.tmp999"]
    with pytest.raises(ValueError, match="incomplete"):
        cache.CachedDataset(out)
    fresh = [Dying(enc), Dying(enc)]
    on_ranks(2, lambda r: build(fresh, r))
    assert [e.calls for e in fresh] == [2, 1]  # shards 2, 4 on rank 0, shard 3 on rank 1: one batch each
    assert sorted(os.listdir(out)) == ["meta.json"] + [f"shard_{k:05d}.pt" for k in range(5)]
    ref = str(tmp_path / "ref")
    cache.build_cache(ds, ref, enc, latents.PixelSpace(), shard_size=2, batch_size=2, progress=False)
    same_items(cache.CachedDataset(out), cache.CachedDataset(ref))


def test_every_rank_refuses_a_cache_of_other_settings(tmp_path, enc):
    ds = synthetic.ShapesDataset(seed=0, length=4)
    cache.build_cache(ds, str(tmp_path), enc, latents.PixelSpace(), shard_size=2, progress=False)
    errors = on_ranks(2, lambda r: cache.build_cache(ds, str(tmp_path), enc, latents.PixelSpace(), shard_size=2,
                                                     dtype=torch.bfloat16, progress=False, rank=r, world=2, poll=0.01))
    assert all(isinstance(e, ValueError) for e in errors) and str(errors[0]) == str(errors[1])
    assert "dtype='fp32' but 'bf16' is expected" in str(errors[0]) and "\n" not in str(errors[0])


def test_rank_0_names_the_shards_it_waits_for(tmp_path, enc, capsys):
    """A rank that died must not leave rank 0 waiting silently: it prints which shards (of which rank) are
    missing, and finishes once they are there."""
    ds = synthetic.ShapesDataset(seed=0, length=4)
    build = lambda r: cache.build_cache(ds, str(tmp_path), enc, latents.PixelSpace(), shard_size=2, progress=False,
                                        rank=r, world=2, poll=0.01, report_every=0.05)
    done = []
    rank0 = threading.Thread(target=lambda: done.append(build(0)), daemon=True)
    rank0.start()
    printed, deadline = "", time.monotonic() + 20
    while "shard_00001.pt (rank 1)" not in printed and time.monotonic() < deadline:
        time.sleep(0.05)
        printed += capsys.readouterr().out
    assert "for 1 shard(s) of other ranks: shard_00001.pt (rank 1)" in printed and not done
    build(1)  # rank 1, late
    rank0.join(timeout=20)
    assert done and done[0]["complete"]


class Bar:
    """tqdm's stand-in: what the progress bar was told."""

    made = []

    def __init__(self, total=None, initial=0, desc="", disable=False, **kwargs):
        self.total, self.initial, self.desc, self.disable, self.updates = total, initial, desc, disable, []
        Bar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        pass


def test_progress_bar_counts_rank_0s_items(tmp_path, enc, monkeypatch):
    import tqdm

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    ds = synthetic.ShapesDataset(seed=0, length=7)  # shards of 3: [0, 3), [3, 6), [6, 7)
    Bar.made = []
    cache.build_cache(ds, str(tmp_path / "one"), enc, latents.PixelSpace(), shard_size=3, batch_size=2)
    (bar,) = Bar.made
    assert (bar.total, bar.initial, bar.updates, bar.desc, bar.disable) == (7, 0, [2, 1, 2, 1, 1], "cache", False)
    Bar.made = []
    on_ranks(2, lambda r: cache.build_cache(ds, str(tmp_path / "two"), enc, latents.PixelSpace(), shard_size=3,
                                            batch_size=2, rank=r, world=2, poll=0.01))
    shown = [b for b in Bar.made if not b.disable]
    assert len(Bar.made) == 2 and len(shown) == 1  # rank 0's alone
    assert (shown[0].total, shown[0].updates) == (4, [2, 1, 1])  # shards 0 and 2: 3 + 1 items, batch by batch
    assert "rank 0's share" in shown[0].desc
    os.remove(tmp_path / "one" / "shard_00002.pt")  # resumed: the items on disk count as done
    Bar.made = []
    cache.build_cache(ds, str(tmp_path / "one"), enc, latents.PixelSpace(), shard_size=3, batch_size=2)
    assert (Bar.made[0].total, Bar.made[0].initial, Bar.made[0].updates) == (7, 6, [1])


def test_bf16_cache_reads_back_and_trains(tmp_path, enc):
    """A bf16 cache says so in meta.json, stores bf16 and reads back as float32 within bf16's rounding (relative
    error <= 2^-8, round to nearest with 8 significant bits); a cache without the field is fp32; training on the
    bf16 cache gives the fp32 cache's losses to well within 1%."""
    import train_t2i

    ds = synthetic.ShapesDataset(length=8)
    paths = {name: str(tmp_path / name) for name in ("fp32", "bf16")}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        cache.build_cache(ds, paths[name], enc, latents.PixelSpace(), dtype=dtype, progress=False)
        assert json.load(open(os.path.join(paths[name], "meta.json")))["dtype"] == name
    stored = torch.load(os.path.join(paths["bf16"], "shard_00000.pt"), weights_only=True)
    assert all(stored[k].dtype == torch.bfloat16 for k in ("x", "text", "pooled"))
    full, half = cache.CachedDataset(paths["fp32"]), cache.CachedDataset(paths["bf16"])
    for i in range(len(ds)):
        for k in ("x", "text", "pooled"):
            assert half[i][k].dtype == torch.float32
            assert torch.allclose(half[i][k], full[i][k], rtol=2**-8, atol=0), (i, k)
        assert torch.equal(half[i]["text_mask"], full[i]["text_mask"])
    assert not torch.equal(half[0]["text"], full[0]["text"])  # rounded indeed
    meta = json.load(open(os.path.join(paths["fp32"], "meta.json")))
    del meta["dtype"]
    json.dump(meta, open(os.path.join(paths["fp32"], "meta.json"), "w"))  # a cache written without the field
    assert cache.CachedDataset(paths["fp32"]).meta["dtype"] == "fp32"
    run = lambda name: ["--size", "tiny", "--batch-size", "4", "--max-steps", "2", "--num-samples", "0", "--eval-n",
                        "0", "--device", "cpu", "--lr", "1e-3", "--out", str(tmp_path / name), "--data", paths[name]]
    loss = {name: train_t2i.main(run(name))["loss"] for name in paths}
    assert len(loss["bf16"]) == 2 and all(0 < v < 2 for v in loss["bf16"])
    assert torch.allclose(torch.tensor(loss["bf16"]), torch.tensor(loss["fp32"]), rtol=1e-2)


def test_check_flags_accepts_a_moved_folder_not_another_model(tmp_path):
    new = {name: tmp_path / name for name in ("clip", "t5", "vae")}
    for d in new.values():
        d.mkdir()
    meta = {"text_encoder": "clip=/old/clip+t5=/old/t5", "latent_space": "/old/vae", "resolution": 256,
            "num_frames": None, "dataset": "imgs"}
    moved = {"--text-encoder": f"clip={new['clip']}+t5={new['t5']}", "--latent-space": str(new["vae"])}
    cache.check_flags(meta, "c", moved)  # the same models, moved: their shapes are checked when they load
    refused = [
        (meta, {"--text-encoder": f"clip={tmp_path / 'gone'}+t5={new['t5']}"}),  # no such folder
        (meta, {"--text-encoder": f"clip={new['clip']}"}),  # CLIP alone, not CLIP + T5
        (meta, {"--text-encoder": f"clip={new['clip']}+t5"}),  # T5 from the hub, not a folder
        (meta, {"--latent-space": "sd-vae"}),
        ({**meta, "text_encoder": "clip+t5"}, {"--text-encoder": "clip"}),  # hub names
        ({**meta, "text_encoder": "clip+t5"}, {"--text-encoder": f"clip={new['clip']}+t5={new['t5']}"}),
        ({**meta, "text_encoder": "tiny-clip+t5"}, {"--text-encoder": f"clip={new['clip']}+t5={new['t5']}"}),
        ({**meta, "latent_space": "sd-vae"}, {"--latent-space": str(new["vae"])}),
        ({**meta, "latent_space": "pixel"}, {"--latent-space": str(new["vae"])}),
    ]
    for made, given in refused:
        (flag, value), = given.items()
        with pytest.raises(ValueError, match=f"made with {flag} .*, not ") as e:
            cache.check_flags(made, "c", given)
        assert "\n" not in str(e.value) and value in str(e.value) and made[flag[2:].replace("-", "_")] in str(e.value)
