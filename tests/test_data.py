"""Tests for synthetic.py and data.py: determinism, ground truth, held-out split, real data, cache."""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cache  # noqa: E402
import data  # noqa: E402
import latents  # noqa: E402
import fsdp  # noqa: E402
import synthetic  # noqa: E402

# -----------------------------------------------------------------------------
# an independent caption parser (does not use synthetic.caption_for)

_OBJ = r"an? (\w+) (\w+)"
_PATTERNS = [
    ("spatial", re.compile(rf"^{_OBJ} (?:to the )?(left of|right of|above|below) {_OBJ}$")),
    ("motion", re.compile(rf"^{_OBJ} moving (left|right|up|down)$")),
    ("pair", re.compile(rf"^{_OBJ} and {_OBJ}$")),
    ("single", re.compile(rf"^{_OBJ}$")),
]


def parse(caption):
    for kind, pat in _PATTERNS:
        m = pat.match(caption)
        if m:
            g = m.groups()
            if kind == "spatial":
                return [(g[0], g[1]), (g[3], g[4])], g[2]
            if kind == "motion":
                return [(g[0], g[1])], g[2]
            if kind == "pair":
                return [(g[0], g[1]), (g[2], g[3])], None
            return [(g[0], g[1])], None
    raise AssertionError(f"unparseable caption {caption!r}")


def test_colors_are_well_separated():
    # a nearest-colour detector needs a margin between every pair of colours and the background
    cols = np.array(list(synthetic.COLORS.values()) + [synthetic.BACKGROUND], dtype=float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() >= 127


def test_shapes_deterministic_and_distinct():
    a, b = synthetic.ShapesDataset(seed=3), synthetic.ShapesDataset(seed=3)
    for i in (0, 1, 999_999):
        assert torch.equal(a[i]["x"], b[i]["x"]) and a[i]["caption"] == b[i]["caption"]
        assert a[i]["meta"] == b[i]["meta"]
    xs = [a[i]["x"] for i in range(50)]
    assert sum(torch.equal(xs[i], xs[i + 1]) for i in range(49)) == 0
    assert not torch.equal(synthetic.ShapesDataset(seed=4)[0]["x"], a[0]["x"])
    assert a[0]["x"].shape == (3, 32, 32) and a[0]["x"].min() >= -1 and a[0]["x"].max() <= 1
    with pytest.raises(IndexError):
        a[len(a)]


def test_moving_deterministic():
    a, b = synthetic.MovingShapesDataset(seed=1), synthetic.MovingShapesDataset(seed=1)
    assert torch.equal(a[7]["x"], b[7]["x"]) and not torch.equal(a[7]["x"], a[8]["x"])
    assert a[7]["x"].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_ground_truth(split):
    ds = synthetic.ShapesDataset(split, seed=0)
    cats = set()
    for i in range(400):
        it = ds[i]
        m = it["meta"]
        objs, rel = parse(it["caption"])
        cats.add(m["category"])
        assert objs == [(o["color"], o["shape"]) for o in m["objects"]]
        assert rel == m["relation"]
        if m["category"] == "color":
            assert objs[0][0] != objs[1][0]
        if m["category"] == "shape":
            assert objs[0][1] != objs[1][1]
        if m["category"] == "spatial":
            a, b = m["objects"]
            dx, dy = b["x"] - a["x"], b["y"] - a["y"]
            # the stated relation holds on centres and its axis dominates
            main, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
            assert main > 0 and abs(other) <= main / 2
    assert cats == set(synthetic.CATEGORIES)


def test_render_pixels_recover_ground_truth():
    ds = synthetic.ShapesDataset(seed=5)
    bg = np.array(synthetic.BACKGROUND)
    for i in range(200):
        it = ds[i]
        img = ((it["x"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(img, synthetic.render(it["meta"]["objects"]))  # dataset == pure renderer
        painted = np.zeros(img.shape[:2], bool)
        for o in it["meta"]["objects"]:
            x, y, r = o["x"], o["y"], o["r"]
            # centre pixel has the object's colour; the bbox is exactly [x-r, x+r) x [y-r, y+r)
            assert tuple(img[y, x]) == synthetic.COLORS[o["color"]]
            m = synthetic.shape_mask(o["shape"], x, y, r, 32)
            ys, xs = np.nonzero(m)
            assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x - r, x + r, y - r, y + r)
            assert (img[m] == synthetic.COLORS[o["color"]]).all()
            assert not (painted & m).any()  # no overlap
            painted |= m
        assert (img[~painted] == bg).all()
        if len(it["meta"]["objects"]) == 2:  # at least `gap` px apart, so components separate
            a, b = it["meta"]["objects"]
            g = synthetic.geometry(32)[2]
            assert abs(a["x"] - b["x"]) >= a["r"] + b["r"] + g or abs(a["y"] - b["y"]) >= a["r"] + b["r"] + g


def test_shapes_are_pairwise_distinct_templates():
    # at the same centre and size every pair of shapes differs in many pixels (oracle can tell them apart)
    for r in range(*synthetic.geometry(32)[:2]):
        masks = [synthetic.shape_mask(s, 16, 16, r, 32) for s in synthetic.SHAPES]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert (masks[i] ^ masks[j]).sum() >= 8, (synthetic.SHAPES[i], synthetic.SHAPES[j], r)


def test_sizes_too_small_for_the_oracle_are_refused():
    """Under 17 px the smallest objects of three shapes render alike (the oracle scores its own renders ~70%
    at 16, 100% from 17 on): refused at construction."""
    for ds in (synthetic.ShapesDataset, synthetic.MovingShapesDataset):
        with pytest.raises(ValueError, match="at least 17 px"):
            ds(size=16)
    metas = [m for c in synthetic.CATEGORIES for _, m in synthetic.heldout_prompts(c, 10, size=17)]
    x = torch.from_numpy(np.stack([synthetic.render(m["objects"], 17) for m in metas]))
    from oracle import score_images
    assert score_images(x, metas)["overall"] == 1.0


def test_heldout_split():
    assert len(synthetic.HELDOUT_PAIRS) == 8 and not set(synthetic.HELDOUT_PAIRS) & set(synthetic.TRAIN_PAIRS)
    held = set(synthetic.HELDOUT_PAIRS)
    # every colour and every shape is still seen in training
    assert {c for c, _ in synthetic.TRAIN_PAIRS} == set(synthetic.COLORS) and {s for _, s in synthetic.TRAIN_PAIRS} == set(synthetic.SHAPES)
    for split, want in (("train", False), ("heldout", True)):
        img, vid = synthetic.ShapesDataset(split, seed=0), synthetic.MovingShapesDataset(split, seed=0)
        for i in range(1000):
            for o in img.scene(i)["objects"] + vid.scene(i)["objects"]:
                assert ((o["color"], o["shape"]) in held) == want


def test_heldout_prompts():
    for cat in list(synthetic.CATEGORIES) + ["motion"]:
        ps = synthetic.heldout_prompts(cat, 20, seed=0)
        assert len(ps) == 20 and all(m["category"] == cat for _, m in ps)
        assert ps == synthetic.heldout_prompts(cat, 20, seed=0)
        for cap, m in ps:
            assert [tuple(o) for o in parse(cap)[0]] == [(o["color"], o["shape"]) for o in m["objects"]]
            assert all((o["color"], o["shape"]) in synthetic.HELDOUT_PAIRS for o in m["objects"])


def test_moving_shapes_motion():
    ds = synthetic.MovingShapesDataset("train", num_frames=8, seed=2)
    dirs = set()
    for i in range(100):
        it = ds[i]
        m = it["meta"]
        (obj,), direction = parse(it["caption"])
        assert obj == (m["objects"][0]["color"], m["objects"][0]["shape"]) and direction == m["direction"]
        dirs.add(direction)
        dx, dy = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        for t, objs in enumerate(m["frames"]):
            o = objs[0]
            r = o["r"]
            # constant speed in the stated direction, fully inside the frame
            assert o["x"] == m["frames"][0][0]["x"] + dx * m["speed"] * t
            assert o["y"] == m["frames"][0][0]["y"] + dy * m["speed"] * t
            assert r <= o["x"] <= 32 - r and r <= o["y"] <= 32 - r
            # the rendered frame has the object's colour at the stated centre, background at the old one
            frame = ((it["x"][t] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
            assert np.array_equal(frame, synthetic.render(objs))
            assert tuple(frame[o["y"], o["x"]]) == synthetic.COLORS[o["color"]]
    assert dirs == set(synthetic.DIRECTIONS)


def test_collate_images_and_videos():
    b = data.collate([synthetic.ShapesDataset()[i] for i in range(3)])
    assert b["x"].shape == (3, 3, 32, 32) and len(b["caption"]) == 3 and len(b["meta"]) == 3
    assert "motion_free" not in b
    v = data.collate([synthetic.MovingShapesDataset()[i] for i in range(2)])
    assert v["x"].shape == (2, 8, 3, 32, 32) and v["motion_free"].dtype == torch.bool
    assert not v["motion_free"].any()
    items = [{"x": torch.zeros(3, 4, 4), "caption": "", "text": torch.ones(5, 6),
              "text_mask": torch.ones(5, dtype=torch.bool), "pooled": torch.ones(7)} for _ in range(2)]
    c = data.collate(items)
    assert c["meta"] is None and c["text"].shape == (2, 5, 6) and c["text_mask"].shape == (2, 5)
    assert c["pooled"].shape == (2, 7)


def _same_items(a, b):
    # same values bit for bit and the same memory layout, same captions, same ground truth
    return (len(a) == len(b) and all(torch.equal(p["x"], q["x"]) and p["x"].stride() == q["x"].stride()
                                     for p, q in zip(a, b))
            and [p["caption"] for p in a] == [q["caption"] for q in b] and [p["meta"] for p in a] == [q["meta"] for q in b])


def _reference_item(ds, i):
    """Item i rendered on its own by the reference renderer (render, one frame at a time)."""
    meta = ds.scene(i)
    if "frames" in meta:
        x = torch.stack([synthetic.to_tensor(synthetic.render(objs, ds.size)) for objs in meta["frames"]])  # (T, 3, H, W)
    else:
        x = synthetic.to_tensor(synthetic.render(meta["objects"], ds.size))  # (3, H, W)
    return {"x": x, "caption": synthetic.caption_for(meta), "meta": meta}


@pytest.mark.parametrize("size", [32, 64, 20])
def test_batched_fetch_equals_per_item(size):
    # __getitems__ renders a whole batch at once (render_batch); every item must equal the reference
    # renderer's bit for bit, and indexing one item (a batch of one) too
    rng = np.random.default_rng(size)
    for split in ("train", "heldout"):
        ds = synthetic.ShapesDataset(split, size=size)
        idx = [int(i) for i in rng.integers(len(ds), size=150)] + [0, len(ds) - 1]
        ref = [_reference_item(ds, i) for i in idx]
        assert {it["meta"]["category"] for it in ref} == set(synthetic.CATEGORIES)  # one- and two-object scenes
        assert _same_items(ds.__getitems__(idx), ref) and _same_items([ds[i] for i in idx[:20]], ref[:20])
        vs = synthetic.MovingShapesDataset(split, size=size, num_frames=4 if size == 20 else 8)
        idx = [int(i) for i in rng.integers(len(vs), size=24)]
        ref = [_reference_item(vs, i) for i in idx]
        assert {it["meta"]["direction"] for it in ref} == set(synthetic.DIRECTIONS)
        assert _same_items(vs.__getitems__(idx), ref) and _same_items([vs[i] for i in idx[:5]], ref[:5])
    assert ds.__getitems__([]) == []


def test_render_batch_overlap_clipping_and_empty():
    # beyond what the datasets draw: overlapping objects (the later one on top, as in render), shapes cut
    # off at the border, an empty scene
    o = lambda s, c, x, y, r: {"shape": s, "color": c, "x": x, "y": y, "r": r}  # noqa: E731
    pair = [o("circle", "red", 1, 2, 7), o("square", "blue", 5, 4, 4)]
    border = [o(s, c, x, y, r) for s, c, x, y, r in zip(synthetic.SHAPES, synthetic.COLORS, (0, 32, 16, 9, 30), (31, 0, 16, 27, 5),
                                                         (3, 9, 6, 2, 5))]
    scenes = [pair, pair[::-1], [], border]
    out = synthetic.render_batch(scenes, 32)
    assert np.array_equal(out, np.stack([synthetic.render(s, 32) for s in scenes]))
    assert not np.array_equal(out[0], out[1])  # the order matters here, and is kept
    assert (out[0] == synthetic.COLORS["blue"]).all(-1).sum() == 64  # the 8x8 square drawn last is whole
    with pytest.raises(ValueError, match="inside"):
        synthetic.render_batch([[o("circle", "red", -1, 5, 3)]], 32)


def test_dataloader_batches_same_with_and_without_batched_fetch(monkeypatch):
    # DataLoader calls __getitems__ for a batch_sampler (torch >= 2.1, _MapDatasetFetcher): its collated
    # batches must be identical to those of the reference renderer's items
    calls = []
    render_batch = synthetic.render_batch
    monkeypatch.setattr(synthetic, "render_batch", lambda *a: calls.append(1) or render_batch(*a))
    perm = np.random.default_rng(1).permutation(4000)
    batches = [perm[a:b].tolist() for a, b in ((0, 64), (64, 65), (100, 300))]
    for make in (synthetic.ShapesDataset, synthetic.MovingShapesDataset):
        ds = make()
        n = len(calls)
        got = list(torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=data.collate))
        assert len(calls) == n + len(batches)  # the batched path ran once per batch
        ref = [data.collate([_reference_item(ds, i) for i in b]) for b in batches]
        for g, r in zip(got, ref, strict=True):
            assert g.keys() == r.keys() and g["caption"] == r["caption"] and g["meta"] == r["meta"]
            assert torch.equal(g["x"], r["x"]) and g["x"].stride() == r["x"].stride()
            assert torch.equal(g.get("motion_free", torch.ones(1)), r.get("motion_free", torch.ones(1)))


# -----------------------------------------------------------------------------
# real image / video data


def _png(path, color, w=64, h=32):
    from PIL import Image
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (255, 0, 0)  # red borders are cropped away by the centre crop
    img[:, (w - h) // 2:(w + h) // 2] = color
    Image.fromarray(img).save(path)


def _folder_with_bad_files(root):
    colors = [(0, 255, 0), (0, 0, 255), (255, 255, 0)]
    names = ["a.png", "b_trunc.png", "c.png", "d_text.jpg", "e_empty.png", "f.png"]
    for n in names:
        with open(root / (n.rsplit(".", 1)[0] + ".txt"), "w") as f:
            f.write("" if n == "f.png" else f" caption {n}\n")
    for n, c in zip(["a.png", "c.png", "f.png"], colors):
        _png(root / n, c)
    _png(root / "b_trunc.png", (9, 9, 9))
    raw = (root / "b_trunc.png").read_bytes()
    (root / "b_trunc.png").write_bytes(raw[: len(raw) // 2])  # truncated
    (root / "d_text.jpg").write_text("not an image")  # wrong format
    (root / "e_empty.png").write_bytes(b"")  # unreadable
    return colors


def _colour_index(x, colors):
    """Which of colors the (3, H, W) item shows, every pixel of it (the crop keeps exactly the centre square)."""
    rgb = ((x + 1) * 127.5).round().permute(1, 2, 0).reshape(-1, 3)
    hits = [k for k, c in enumerate(colors) if (rgb == torch.tensor(c, dtype=rgb.dtype)).all()]
    assert len(hits) == 1
    return hits[0]


def test_image_folder_skips_and_counts_bad_files(tmp_path):
    """The three bad files (truncated PNG, text named .jpg, zero bytes) are counted, 3, not 1; the warning comes
    at 1 bad file (the next at 10)."""
    colors = _folder_with_bad_files(tmp_path)
    ds = data.ImageTextFolder(str(tmp_path), size=32)
    assert len(ds) == 6
    with pytest.warns(UserWarning) as rec:
        items = [ds[i] for i in range(len(ds))]
    msgs = [str(r.message) for r in rec]
    assert len(msgs) == 1 and "skipped 1 unreadable" in msgs[0] and "b_trunc.png" in msgs[0], msgs
    assert ds.num_bad == 3
    # good files are their own items; a bad file's slot is refilled with a readable one, the same every time
    got = [_colour_index(it["x"], colors) for it in items]
    assert [got[k] for k in (0, 2, 5)] == [0, 1, 2]
    with pytest.warns(UserWarning):
        again = data.ImageTextFolder(str(tmp_path), size=32)
        assert got == [_colour_index(again[i]["x"], colors) for i in range(6)]
    assert items[0]["caption"] == "caption a.png" and items[5]["caption"] == ""  # empty file -> null caption
    assert items[2]["meta"] is None
    with warnings_as_errors():  # known-bad files are not re-counted or re-warned
        ds[1]
    assert ds.num_bad == 3


def _print_warnings(worker_id):
    """A forked worker inherits pytest's warning recorder, whose records never reach the test: print them."""
    import warnings
    warnings.simplefilter("always")
    warnings.showwarning = lambda msg, *a, **k: print(msg, file=sys.stderr, flush=True)


def test_bad_files_counted_exactly_over_workers(tmp_path, capfd):
    """Two DataLoader workers (separate processes) over 12 bad files: the main process sees 12, and the warnings
    say 1 and 10 once each."""
    colors = _folder_with_bad_files(tmp_path)
    for k in range(9):  # 3 + 9 = 12 bad files
        (tmp_path / f"z{k}.png").write_bytes(b"")
        (tmp_path / f"z{k}.txt").write_text("z")
    ds = data.ImageTextFolder(str(tmp_path), size=8)
    n = len(ds)
    sampler = fsdp.DistributedBatches(n, 5, 1, 0, 1, seed=0, pos=(0, 0), per_epoch=ds.per_epoch)
    capfd.readouterr()  # before the workers start: they load (and warn) as soon as the iterator exists
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=2, collate_fn=data.collate,
                                              worker_init_fn=_print_warnings))
    for _ in range(3 * (n // 5)):  # three epochs (the last partial batch of each is dropped)
        batch = next(loader)
        assert batch["x"].shape == (5, 3, 8, 8)
    del loader
    err = capfd.readouterr().err
    assert ds.num_bad == 12
    assert err.count("skipped 1 unreadable") == 1 and err.count("skipped 10 unreadable") == 1, err
    assert "skipped 12 unreadable" not in err  # between the powers of ten: no warning
    assert len(colors) == 3


class warnings_as_errors:
    def __enter__(self):
        import warnings
        self.ctx = warnings.catch_warnings()
        self.ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *a):
        self.ctx.__exit__(*a)


def test_image_folder_resizes_shorter_side(tmp_path):
    _png(tmp_path / "a.png", (0, 255, 0), w=128, h=64)
    (tmp_path / "a.txt").write_text("x")
    x = data.ImageTextFolder(str(tmp_path), size=16)[0]["x"]
    assert x.shape == (3, 16, 16)
    # 128x64 -> 32x16, centre 16 columns: green, with red only possibly bleeding into the outer column
    g = torch.tensor([-1.0, 1.0, -1.0])
    assert torch.allclose(x[:, :, 2:14].permute(1, 2, 0), g.expand(16, 12, 3), atol=0.02)


def test_image_folder_follows_exif_orientation(tmp_path):
    """A phone photo is stored sideways with an EXIF orientation tag; it must train upright. Stored: left half
    red, right half blue; tag 6 = turn 90 degrees clockwise to display, so red ends up on top."""
    from PIL import Image
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16], img[:, 16:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Image().getexif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "a.png", exif=exif)
    (tmp_path / "a.txt").write_text("x")
    x = data.ImageTextFolder(str(tmp_path), size=32)[0]["x"]
    assert x[0, :12].mean() > 0.9 and x[2, :12].mean() < -0.9  # top rows red
    assert x[2, -12:].mean() > 0.9 and x[0, -12:].mean() < -0.9  # bottom rows blue


def test_jsonl_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png", (0, 0, 255))
    with open(tmp_path / "m.jsonl", "w") as f:
        f.write('{"image": "imgs/a.png", "caption": "a blue thing"}\n\n')
        f.write('{"image": "imgs/missing.png", "caption": ""}\n')
        f.write('{"image": "imgs/a.png", "caption": ""}\n')
    ds = data.ImageTextFolder(str(tmp_path / "m.jsonl"), size=32)
    assert len(ds) == 3 and ds[0]["caption"] == "a blue thing" and ds[2]["caption"] == ""
    with pytest.warns(UserWarning):
        assert ds[1]["caption"] == ""  # missing file is skipped to the next item
    (tmp_path / "bad.jsonl").write_text('{"image": "imgs/a.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        data.ImageTextFolder(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"image": "imgs/a.png", "caption": "ok"}\n{"image": \n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        data.ImageTextFolder(str(tmp_path / "bad.jsonl"))
    for line in ('{"image": null, "caption": "x"}', '{"image": "imgs/a.png", "caption": 7}',
                 '{"image": "imgs/a.png", "caption": ["a", "b"]}'):  # at startup, not at the first batch
        (tmp_path / "bad.jsonl").write_text('{"image": "imgs/a.png", "caption": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:2: 'image' must be a path and 'caption' a string"):
            data.ImageTextFolder(str(tmp_path / "bad.jsonl"))


def test_missing_caption_and_empty_folder_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.ImageTextFolder(str(tmp_path))  # empty folder
    _png(tmp_path / "a.png", (0, 0, 255))
    with pytest.raises(FileNotFoundError, match=r"a\.txt"):
        data.ImageTextFolder(str(tmp_path))  # missing caption
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.ImageTextFolder(str(tmp_path / "nowhere"))


def test_frame_indices():
    # paper Sec. 4.1: 8 frames at 4 fps from 24 fps video -> every 6th source frame
    assert data.frame_indices(240, 24, 8, 4, offset=0.0) == [0, 6, 12, 18, 24, 30, 36, 42]
    assert data.frame_indices(240, 24, 8, 4, offset=1.0) == [197, 203, 209, 215, 221, 227, 233, 239]
    assert data.frame_indices(43, 24, 8, 4, offset=0.7) == [0, 6, 12, 18, 24, 30, 36, 42]  # exactly fits
    assert data.frame_indices(240, 8, 8, 4, offset=0.0) == [0, 2, 4, 6, 8, 10, 12, 14]
    short = data.frame_indices(15, 24, 8, 4)  # too short: evenly over the whole video
    assert short[0] == 0 and short[-1] == 14 and short == sorted(short)
    with pytest.raises(ValueError):
        data.frame_indices(0, 24)


def _write_mp4(path, n=48, fps=24):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    w = imageio.get_writer(str(path), fps=fps, codec="libx264", quality=10, macro_block_size=1,
                           ffmpeg_log_level="error")
    for k in range(n):
        w.append_data(np.full((16, 24, 3), 5 * k, np.uint8))  # frame k has grey level 5k
    w.close()


def test_video_decode_samples_the_right_frames(tmp_path):
    _write_mp4(tmp_path / "v.mp4")
    for offset, want in ((0.0, range(0, 43, 6)), (1.0, range(5, 48, 6))):
        frames = data.read_clip(str(tmp_path / "v.mp4"), 8, 4, offset)
        got = [float(f.mean()) for f in frames]
        assert np.allclose(got, [5 * k for k in want], atol=2.5), got
    (tmp_path / "v.txt").write_text("grey")
    (tmp_path / "w.mp4").write_bytes(b"\x00" * 100)  # corrupt video
    (tmp_path / "w.txt").write_text("bad")
    ds = data.VideoTextFolder(str(tmp_path), size=8, num_frames=8, target_fps=4)
    with pytest.warns(UserWarning):
        it = ds[1]  # w.mp4 is bad -> wraps around to v.mp4
    assert it["x"].shape == (8, 3, 8, 8) and it["caption"] == "grey" and ds.num_bad == 1
    levels = ((it["x"].mean(dim=(1, 2, 3)) + 1) * 127.5).numpy()
    assert (np.diff(levels) > 25).all()  # 6 source frames apart = 30 grey levels per sampled frame


# -----------------------------------------------------------------------------
# joint image-video batches (Sec. 3.3.2)


def test_joint_dataset_pseudo_videos():
    T = 4
    videos = [{"x": torch.randn(T, 3, 2, 2), "caption": f"v{i}", "meta": None} for i in range(5000)]
    images = [{"x": torch.randn(3, 2, 2), "caption": f"i{i}", "meta": None} for i in range(7)]
    ds = data.JointImageVideoDataset(videos, images, p_motion_free=0.3, num_frames=T, seed=0)
    flags = []
    for i in range(len(ds)):
        it = ds[i]
        flags.append(it["motion_free"])
        if it["motion_free"]:
            img = images[int(it["caption"][1:])]["x"]
            assert it["x"].shape == (T, 3, 2, 2) and all(torch.equal(f, img) for f in it["x"])
        else:
            assert it["x"] is videos[i]["x"]
    assert abs(np.mean(flags) - 0.3) < 0.02  # 5000 draws: std 0.0065
    assert [ds[i]["motion_free"] for i in range(50)] == flags[:50]  # deterministic
    # with the synthetic datasets, through collate
    sd = data.JointImageVideoDataset(synthetic.MovingShapesDataset(num_frames=8), synthetic.ShapesDataset(categories=("single",)),
                                     p_motion_free=0.5, num_frames=8)
    b = data.collate([sd[i] for i in range(8)])
    assert b["x"].shape == (8, 8, 3, 32, 32)
    for x, mf in zip(b["x"], b["motion_free"]):
        assert bool((x == x[:1]).all()) == bool(mf)  # only pseudo-videos are static
    assert 0 < b["motion_free"].sum() < 8
    # the DataLoader's batched fetch gives the same items as indexing one by one
    idx = [int(i) for i in np.random.default_rng(1).permutation(400)[:64]]
    for a, ref in zip(sd.__getitems__(idx), [sd[i] for i in idx]):
        assert torch.equal(a["x"], ref["x"]) and a["caption"] == ref["caption"] and a["meta"] == ref["meta"]
        assert a["motion_free"] == ref["motion_free"]
    assert {a["motion_free"] for a in sd.__getitems__(idx)} == {True, False}


# -----------------------------------------------------------------------------
# latent spaces


class FakeVAE(torch.nn.Module):
    """AutoencoderKL-shaped stand-in: 'latent' = every 8th pixel plus a 4th channel."""

    config = {"scaling_factor": 0.18215, "latent_channels": 4, "block_out_channels": [8, 8, 8, 8]}  # SD's: /8

    def encode(self, x):
        mean = torch.cat([x[:, :, ::8, ::8], x[:, :1, ::8, ::8]], dim=1)
        dist = type("D", (), {"mean": mean, "sample": lambda self: mean})()
        return type("O", (), {"latent_dist": dist})()

    def decode(self, z):
        return type("O", (), {"sample": z[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3)})()


def test_joint_draws_change_every_epoch_and_clips_move(tmp_path, monkeypatch):
    """Training asks per_epoch datasets for index epoch * n + i (fsdp.DistributedBatches). The joint dataset then
    draws motion-free slots and images anew each epoch, so with p = 0.5 three epochs train on ~7/8 of the videos
    (1 - 0.5^3), not the same half every epoch, and a video folder starts each clip elsewhere each epoch."""
    T, n = 2, 2000
    videos = [{"x": torch.zeros(T, 3, 2, 2), "caption": f"v{i}", "meta": None} for i in range(n)]
    images = [{"x": torch.zeros(3, 2, 2), "caption": f"i{i}", "meta": None} for i in range(n)]
    ds = data.JointImageVideoDataset(videos, images, p_motion_free=0.5, num_frames=T, seed=0)
    sampler = fsdp.DistributedBatches(n, 100, 1, 0, 1, seed=0, pos=(0, 0), per_epoch=ds.per_epoch)
    seen, batches = [], iter(sampler)
    for epoch in range(3):
        items = [it for _ in range(n // 100) for it in ds.__getitems__(next(batches))]
        seen.append({it["caption"] for it in items})
    used = lambda prefix, k: len({c for s in seen[:k] for c in s if c[0] == prefix}) / n
    assert 0.45 < used("v", 1) < 0.55 and 0.84 < used("v", 3) < 0.91  # 1/2, then 7/8 of the videos
    assert used("i", 3) > 0.6  # 3 x n/2 image draws with replacement: 1 - e^-1.5 = 78% of the images
    # a video folder: the same video gets another start each epoch (read_clip's offset), the same one again
    # for the same (epoch, i), so a resumed run is identical
    for name in ("a", "b"):
        (tmp_path / f"{name}.mp4").write_bytes(b"")
        (tmp_path / f"{name}.txt").write_text(name)
    offsets = []
    monkeypatch.setattr(data, "read_clip", lambda path, k, fps, offset: offsets.append(offset) or [np.zeros((4, 4, 3), np.uint8)] * k)
    monkeypatch.setattr(data, "_video_plugin", lambda: None)  # no decoding here: runs without imageio-ffmpeg too
    vf = data.VideoTextFolder(str(tmp_path), size=4, num_frames=2)
    assert vf.per_epoch and vf[1]["caption"] == vf[2 + 1]["caption"] == "b"
    vf[1]
    assert offsets[0] != offsets[1] and offsets[0] == offsets[2]


def test_latent_spaces():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    px = latents.load_latent_space("pixel")
    assert px.channels == 3 and torch.equal(px.decode(px.encode(x)), x)
    vae = latents.SDVAE("fake", vae=FakeVAE())
    z = vae.encode(x)
    assert z.shape == (2, 4, 2, 2) and torch.equal(z, FakeVAE().encode(x).latent_dist.mean * 0.18215)
    assert torch.allclose(vae.decode(z), x[:, :, ::8, ::8].repeat_interleave(8, 2).repeat_interleave(8, 3))
    v = torch.rand(2, 3, 3, 16, 16) * 2 - 1  # (B, T, C, H, W): frames folded into the batch
    zv = vae.encode(v)
    assert zv.shape == (2, 3, 4, 2, 2) and torch.equal(zv[1, 2], vae.encode(v[1, 2:3])[0])
    assert vae.decode(zv).shape == v.shape


def test_optional_dependencies_fail_clearly():
    try:
        import diffusers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="diffusers"):
            latents.load_latent_space("sd-vae")


# -----------------------------------------------------------------------------
# cache


class StubEncoder:
    """Text encoder stand-in with the TextEncoder interface: deterministic features from the characters."""

    spec, text_dim, pooled_dim, max_length = "stub", 6, 4, 5

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, captions):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("killed")
        codes = torch.tensor([[float(sum(map(ord, c))) % 97] for c in captions])  # (B, 1)
        tokens = codes[:, :, None] * torch.arange(1.0, 31.0).view(1, 5, 6) / 97  # (B, L, C)
        mask = torch.arange(5)[None] < torch.tensor([[len(c.split())] for c in captions])  # (B, L)
        return tokens, mask, codes.repeat(1, 4) / 97  # pooled (B, P)


def test_cache_round_trip_and_refusal(tmp_path):
    ds = synthetic.ShapesDataset(seed=1, length=10)
    enc, px = StubEncoder(), latents.PixelSpace()
    meta = cache.build_cache(ds, str(tmp_path), enc, px, shard_size=4, batch_size=3, progress=False)
    assert meta["complete"] and sorted(os.listdir(tmp_path)) == ["meta.json"] + [f"shard_0000{k}.pt" for k in range(3)]
    expect = cache.cache_spec(enc, px, 32, None, ds.spec)
    cd = cache.CachedDataset(str(tmp_path), expect)
    assert len(cd) == 10
    for i in range(10):
        it, ref = cd[i], ds[i]
        tok, mask, pooled = enc([ref["caption"]])
        assert torch.equal(it["x"], ref["x"]) and it["caption"] == ref["caption"] and it["meta"] == ref["meta"]
        assert torch.equal(it["text"], tok[0] * mask[0, :, None]) and torch.equal(it["text_mask"], mask[0])
        assert torch.equal(it["pooled"], pooled[0])  # the real tokens at their positions; the padding rows 0
    # on disk only the real tokens: shard 1's captions have 3, 3, 7 and 3 words, so it keeps 14 of its 4 x 5 rows
    shard = torch.load(tmp_path / "shard_00001.pt", weights_only=True)
    assert shard["text"].shape == (14, 6) and shard["text_start"].tolist() == [0, 3, 6, 11, 14]
    old = {k: v for k, v in shard.items() if k != "text_start"}  # the layout before: all L positions
    old["text"] = torch.stack([cd[i]["text"] for i in range(4, 8)])
    (tmp_path / "old").mkdir()
    for name in os.listdir(tmp_path):
        if name.startswith(("meta", "shard")):
            shutil.copy(tmp_path / name, tmp_path / "old" / name)
    torch.save(old, tmp_path / "old" / "shard_00001.pt")
    old_cd = cache.CachedDataset(str(tmp_path / "old"), expect)  # still read, item for item the same
    assert all(torch.equal(old_cd[i]["text"], cd[i]["text"]) for i in range(10))
    b = data.collate([cd[i] for i in range(4)])
    assert b["text"].shape == (4, 5, 6) and b["text_mask"].dtype == torch.bool and b["pooled"].shape == (4, 4)
    # any other encoder / latent space / resolution is refused, naming the field
    for field, value in (("latent_space", "stabilityai/sd-vae-ft-ema"), ("text_encoder", "clip"), ("resolution", 64)):
        with pytest.raises(ValueError, match=f"{field}="):
            cache.CachedDataset(str(tmp_path), {**expect, field: value})
    with pytest.raises(FileNotFoundError):
        cache.CachedDataset(str(tmp_path / "none"))
    with open(tmp_path / "shard_00002.pt", "r+b") as f:
        f.truncate(100)  # damaged after the cache was complete: refused when opened, naming the shard
    with pytest.raises(ValueError, match="cache shard .*shard_00002.pt is damaged"):
        cache.CachedDataset(str(tmp_path), expect)


def test_cache_of_changed_files_is_refused(tmp_path):
    """A cache records a fingerprint of its files and captions: rebuilding into it after a caption was edited
    (same number of items) is refused, instead of training on the old features."""
    src = tmp_path / "imgs"
    src.mkdir()
    for name, color in (("a", (0, 0, 255)), ("b", (0, 255, 0))):
        _png(src / f"{name}.png", color)
        (src / f"{name}.txt").write_text(f"a {name} thing")
    build = lambda: cache.build_cache(data.ImageTextFolder(str(src), size=8), str(tmp_path / "c"), StubEncoder(),
                                     latents.PixelSpace(), shard_size=2, progress=False)
    build()
    build()  # unchanged files: the complete cache is kept
    (src / "a.txt").write_text("a red circle")
    with pytest.raises(ValueError, match="content="):
        build()
    assert cache.content_fingerprint(synthetic.ShapesDataset()) is None  # synthetic data: its spec says it all


def test_the_sd_vae_has_one_name_in_caches_checkpoints_and_flags(tmp_path):
    """--latent-space sd-vae loads stabilityai/sd-vae-ft-ema. Caches recorded the long name and checkpoints the
    short one, so a child run or a resume on such a cache, inheriting "sd-vae", was refused by the cache. Both
    spellings are one name now, also for caches written before."""
    assert latents.SDVAE(vae=FakeVAE()).spec == latents.SDVAE(latents.SD_VAE, vae=FakeVAE()).spec == "sd-vae"
    assert latents.SDVAE("my/vae", vae=FakeVAE()).spec == "my/vae"
    src = tmp_path / "imgs"
    src.mkdir()
    for name, color in (("a", (0, 0, 255)), ("b", (0, 255, 0))):
        _png(src / f"{name}.png", color)
        (src / f"{name}.txt").write_text(f"a {name} thing")
    path = str(tmp_path / "c")
    cache.build_cache(data.ImageTextFolder(str(src), size=16), path, StubEncoder(), latents.SDVAE(vae=FakeVAE()),
                      progress=False)
    meta = json.load(open(os.path.join(path, "meta.json")))
    assert meta["latent_space"] == "sd-vae"
    json.dump({**meta, "latent_space": latents.SD_VAE}, open(os.path.join(path, "meta.json"), "w"))  # an older cache
    for flag in ("sd-vae", latents.SD_VAE):
        cache.check_flags(cache.CachedDataset(path).meta, path, {"--latent-space": latents.latent_spec(flag)})
    with pytest.raises(ValueError, match="made with --latent-space sd-vae, not pixel"):
        cache.check_flags(cache.CachedDataset(path).meta, path, {"--latent-space": "pixel"})


def test_cache_knows_its_motion_free_fraction_however_written():
    meta = {"num_frames": 8, "text_encoder": "t", "latent_space": "pixel", "resolution": 32}
    for p in (0.5, 1e-05, 0.0):
        made = {**meta, "dataset": f"vids+imgs:p_motion_free={p}"}  # as train_t2v.py writes it
        cache.check_flags(made, "c", {"--p-motion-free": p})
        with pytest.raises(ValueError, match=f"made with --p-motion-free {p}, not 0.25"):
            cache.check_flags(made, "c", {"--p-motion-free": 0.25})


def test_cache_killed_run_is_refused_then_resumed(tmp_path):
    ds = synthetic.MovingShapesDataset(num_frames=4, seed=0, length=6)
    with pytest.raises(KeyboardInterrupt):  # dies while encoding the second shard
        cache.build_cache(ds, str(tmp_path), StubEncoder(fail_after=2), latents.PixelSpace(),
                         shard_size=4, batch_size=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "shard_00000.pt"]
    with pytest.raises(ValueError, match="incomplete"):
        cache.CachedDataset(str(tmp_path))
    with pytest.raises(ValueError, match="shard_size="):  # resuming with other settings is refused
        cache.build_cache(ds, str(tmp_path), StubEncoder(), latents.PixelSpace(), shard_size=3, progress=False)
    (tmp_path / "shard_00001.pt.tmp123").write_bytes(b"half a shard")  # what a kill mid-write leaves
    enc = StubEncoder()
    cache.build_cache(ds, str(tmp_path), enc, latents.PixelSpace(), shard_size=4, batch_size=2, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "shard_00000.pt", "shard_00001.pt"]
    assert enc.calls == 1  # only the missing shard (2 items, 1 batch) was encoded
    cd = cache.CachedDataset(str(tmp_path), {"num_frames": 4, "latent_space": "pixel"})
    assert torch.equal(cd[5]["x"], ds[5]["x"]) and cd[5]["x"].shape == (4, 3, 32, 32)
    assert cd[5]["motion_free"].dtype == torch.bool and not cd[5]["motion_free"]


def test_cache_never_touches_files_it_did_not_write(tmp_path):
    """--cache may name any folder: only the temp files of our own killed writes are removed, a folder of other
    files is refused before anything is written, and an image folder with a meta.json of its own is not a cache;
    a damaged or foreign meta.json beside shards is a one-line error naming the file."""
    ds = synthetic.ShapesDataset(seed=1, length=4)
    mine = tmp_path / "work"
    mine.mkdir()
    for name in ("notes.tmp.txt", "email.tmpl"):
        (mine / name).write_text("keep me")
    with pytest.raises(ValueError, match=r"work holds other files \((notes.tmp.txt|email.tmpl)\) and no cache"):
        cache.build_cache(ds, str(mine), StubEncoder(), latents.PixelSpace(), progress=False)
    assert sorted(os.listdir(mine)) == ["email.tmpl", "notes.tmp.txt"]
    c = tmp_path / "c"
    cache.build_cache(ds, str(c), StubEncoder(), latents.PixelSpace(), shard_size=2, progress=False)
    (c / "notes.tmp.txt").write_text("keep me")
    (c / "meta.json.tmp99").write_text("{")  # a killed write of ours
    cache.build_cache(ds, str(c), StubEncoder(), latents.PixelSpace(), shard_size=2, progress=False)
    assert sorted(os.listdir(c)) == ["meta.json", "notes.tmp.txt", "shard_00000.pt", "shard_00001.pt"]
    assert cache.is_cache(str(c)) and not cache.is_cache(str(mine))
    (mine / "meta.json").write_text('{"source": "flickr"}')  # an image folder's own metadata
    assert not cache.is_cache(str(mine))
    (c / "meta.json").write_text('{"num_items": 4')  # truncated
    assert cache.is_cache(str(c))  # shards beside it: a damaged cache, and said so
    with pytest.raises(ValueError, match=r"c/meta.json is damaged \(.*\): build the cache again$"):
        cache.CachedDataset(str(c))
    (c / "meta.json").write_text('{"num_items": 4}')
    with pytest.raises(ValueError, match=r"c/meta.json has no 'text_encoder': not the meta.json of a cache"):
        cache.CachedDataset(str(c))


def test_cache_with_real_text_encoder(tmp_path):
    # the TextEncoder plugs into build_cache (tiny offline encoders; skipped if unavailable); CLIP + T5 captions
    # have padding between their two parts, and the cache puts each real token back at its position
    te = pytest.importorskip("text_encoders")
    try:
        enc = te.load_text_encoder("tiny-clip+t5")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"tiny text encoder unavailable: {e}")
    ds = synthetic.ShapesDataset(seed=0, length=3)
    cache.build_cache(ds, str(tmp_path), enc, latents.PixelSpace(), shard_size=2, progress=False)
    cd = cache.CachedDataset(str(tmp_path), cache.cache_spec(enc, latents.PixelSpace(), 32, None, ds.spec))
    tok, mask, pooled = enc([ds[2]["caption"]])
    assert torch.allclose(cd[2]["text"], tok[0].cpu()) and torch.equal(cd[2]["text_mask"], mask[0].bool().cpu())


def fake_video(monkeypatch, n, duration):
    """read_clip's decoder replaced by n frames of grey level k % 256 at 24 fps, with this header duration."""
    class Reader:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def metadata(self):
            return {"fps": 24.0, "duration": duration}

        def iter(self):
            for k in range(n):
                yield np.full((2, 2, 3), k % 256, np.uint8)

    fake = type("iio", (), {"imopen": staticmethod(lambda *a, **k: Reader())})
    monkeypatch.setattr(data, "_video_plugin", lambda: (fake, "x"))


@pytest.mark.parametrize("duration", [None, 2.0, 3.0])
def test_read_clip_without_or_with_wrong_duration(monkeypatch, duration):
    # headers may lack the duration (decode everything) or over-state it (resample from what exists)
    fake_video(monkeypatch, 48, duration)
    got = [int(f[0, 0, 0]) for f in data.read_clip("v.mp4", 8, 4, offset=1.0)]
    assert got == list(range(5, 48, 6))


def test_read_clip_keeps_only_the_frames_it_returns(monkeypatch):
    """A long video is not held in memory: of the frames decoded up to the clip's last, only the clip's stay."""
    kept = []
    fake_video(monkeypatch, 1000, 1000 / 24)
    decode = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a, **k: kept.append(decode(*a, **k)) or kept[-1])
    clip = data.read_clip("v.mp4", 8, 4, offset=1.0)
    assert len(clip) == 8 and len(kept) == 1 and sorted(kept[0]) == data.frame_indices(1000, 24, 8, 4, 1.0)


def test_image_modes_thin_images_linked_folders_and_bom_captions(tmp_path):
    """16-bit grey is scaled, not clipped to white; transparent pixels are white, not their hidden colour; a
    2000 x 1 image is cropped before it is resized; linked subfolders are read; a caption file's BOM is not text."""
    from PIL import Image
    ramp = (np.arange(64, dtype=np.uint16)[None].repeat(8, 0) * 1024)  # 0 .. 64512: mean grey 0.49
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as img:
        assert img.mode == "I;16"
        x = data.resize_center_crop(img, 8)
    assert abs(float(x.mean() + 1) / 2 - 0.49) < 0.05
    as_int32 = data.resize_center_crop(Image.fromarray(ramp.astype(np.int32)), 8)  # mode "I": the same grey
    assert Image.fromarray(ramp.astype(np.int32)).mode == "I" and torch.equal(as_int32, x)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 255  # green, fully transparent
    assert torch.allclose(data.resize_center_crop(Image.fromarray(rgba, "RGBA"), 4), torch.ones(3, 4, 4))
    assert data.resize_center_crop(Image.new("RGB", (2000, 1), (0, 0, 255)), 16).shape == (3, 16, 16)
    real, root = tmp_path / "part2", tmp_path / "data"
    for d in (real, root / "part1"):
        d.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(d / "a.png")
        (d / "a.txt").write_bytes("\ufeffa red circle".encode("utf-8"))
    (root / "part2").symlink_to(real)
    (root / "part1" / "up").symlink_to(root)  # a loop: walked once
    ds = data.ImageTextFolder(str(root), size=4)
    assert len(ds) == 2 and ds.caption(0) == ds.caption(1) == "a red circle"


def test_other_ranks_wait_for_the_cache_on_its_file(tmp_path):
    """Under torchrun, ranks other than 0 wait for rank 0's cache build by polling meta.json (a collective would
    time out on a long build): they go on only once it is marked complete."""
    import json
    import threading
    import time

    done = []
    waiter = threading.Thread(target=lambda: done.append(cache.wait_until_complete(str(tmp_path), poll=0.01)),
                              daemon=True)
    waiter.start()
    time.sleep(0.2)
    (tmp_path / "meta.json").write_text(json.dumps({"complete": False}))  # a build under way
    time.sleep(0.2)
    assert not done
    (tmp_path / "meta.json").write_text(json.dumps({"complete": True}))
    waiter.join(timeout=5)
    assert done == [None]
