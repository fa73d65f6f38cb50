"""Tests for synthetic.py and data.py: determinism, ground truth, held-out split, real data, cache."""

import os
import re
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import synthetic as S  # noqa: E402

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
    cols = np.array(list(S.COLORS.values()) + [S.BACKGROUND], dtype=float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert d.min() >= 127


def test_shapes_deterministic_and_distinct():
    a, b = S.ShapesDataset(seed=3), S.ShapesDataset(seed=3)
    for i in (0, 1, 999_999):
        assert torch.equal(a[i]["x"], b[i]["x"]) and a[i]["caption"] == b[i]["caption"]
        assert a[i]["meta"] == b[i]["meta"]
    xs = [a[i]["x"] for i in range(50)]
    assert sum(torch.equal(xs[i], xs[i + 1]) for i in range(49)) == 0
    assert not torch.equal(S.ShapesDataset(seed=4)[0]["x"], a[0]["x"])
    assert a[0]["x"].shape == (3, 32, 32) and a[0]["x"].min() >= -1 and a[0]["x"].max() <= 1
    with pytest.raises(IndexError):
        a[len(a)]


def test_moving_deterministic():
    a, b = S.MovingShapesDataset(seed=1), S.MovingShapesDataset(seed=1)
    assert torch.equal(a[7]["x"], b[7]["x"]) and not torch.equal(a[7]["x"], a[8]["x"])
    assert a[7]["x"].shape == (8, 3, 32, 32)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_match_ground_truth(split):
    ds = S.ShapesDataset(split, seed=0)
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
    assert cats == set(S.CATEGORIES)


def test_render_pixels_recover_ground_truth():
    ds = S.ShapesDataset(seed=5)
    bg = np.array(S.BACKGROUND)
    for i in range(200):
        it = ds[i]
        img = ((it["x"].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
        assert np.array_equal(img, S.render(it["meta"]["objects"]))  # dataset == pure renderer
        painted = np.zeros(img.shape[:2], bool)
        for o in it["meta"]["objects"]:
            x, y, r = o["x"], o["y"], o["r"]
            # centre pixel has the object's colour; the bbox is exactly [x-r, x+r) x [y-r, y+r)
            assert tuple(img[y, x]) == S.COLORS[o["color"]]
            m = S.shape_mask(o["shape"], x, y, r, 32)
            ys, xs = np.nonzero(m)
            assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (x - r, x + r, y - r, y + r)
            assert (img[m] == S.COLORS[o["color"]]).all()
            assert not (painted & m).any()  # no overlap
            painted |= m
        assert (img[~painted] == bg).all()
        if len(it["meta"]["objects"]) == 2:  # at least `gap` px apart, so components separate
            a, b = it["meta"]["objects"]
            g = S.geometry(32)[2]
            assert abs(a["x"] - b["x"]) >= a["r"] + b["r"] + g or abs(a["y"] - b["y"]) >= a["r"] + b["r"] + g


def test_shapes_are_pairwise_distinct_templates():
    # at the same centre and size every pair of shapes differs in many pixels (oracle can tell them apart)
    for r in range(*S.geometry(32)[:2]):
        masks = [S.shape_mask(s, 16, 16, r, 32) for s in S.SHAPES]
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):
                assert (masks[i] ^ masks[j]).sum() >= 8, (S.SHAPES[i], S.SHAPES[j], r)


def test_heldout_split():
    assert len(S.HELDOUT_PAIRS) == 8 and not set(S.HELDOUT_PAIRS) & set(S.TRAIN_PAIRS)
    held = set(S.HELDOUT_PAIRS)
    # every colour and every shape is still seen in training
    assert {c for c, _ in S.TRAIN_PAIRS} == set(S.COLORS) and {s for _, s in S.TRAIN_PAIRS} == set(S.SHAPES)
    for split, want in (("train", False), ("heldout", True)):
        img, vid = S.ShapesDataset(split, seed=0), S.MovingShapesDataset(split, seed=0)
        for i in range(1000):
            for o in img.scene(i)["objects"] + vid.scene(i)["objects"]:
                assert ((o["color"], o["shape"]) in held) == want


def test_heldout_prompts():
    for cat in list(S.CATEGORIES) + ["motion"]:
        ps = S.heldout_prompts(cat, 20, seed=0)
        assert len(ps) == 20 and all(m["category"] == cat for _, m in ps)
        assert ps == S.heldout_prompts(cat, 20, seed=0)
        for cap, m in ps:
            assert [tuple(o) for o in parse(cap)[0]] == [(o["color"], o["shape"]) for o in m["objects"]]
            assert all((o["color"], o["shape"]) in S.HELDOUT_PAIRS for o in m["objects"])


def test_moving_shapes_motion():
    ds = S.MovingShapesDataset("train", num_frames=8, seed=2)
    dirs = set()
    for i in range(200):
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
            assert np.array_equal(frame, S.render(objs))
            assert tuple(frame[o["y"], o["x"]]) == S.COLORS[o["color"]]
    assert dirs == set(S.DIRECTIONS)


def test_collate_images_and_videos():
    b = data.collate([S.ShapesDataset()[i] for i in range(3)])
    assert b["x"].shape == (3, 3, 32, 32) and len(b["caption"]) == 3 and len(b["meta"]) == 3
    assert "motion_free" not in b
    v = data.collate([S.MovingShapesDataset()[i] for i in range(2)])
    assert v["x"].shape == (2, 8, 3, 32, 32) and v["motion_free"].dtype == torch.bool
    assert not v["motion_free"].any()
    items = [{"x": torch.zeros(3, 4, 4), "caption": "", "text": torch.ones(5, 6),
              "text_mask": torch.ones(5, dtype=torch.bool), "pooled": torch.ones(7)} for _ in range(2)]
    c = data.collate(items)
    assert c["meta"] is None and c["text"].shape == (2, 5, 6) and c["text_mask"].shape == (2, 5)
    assert c["pooled"].shape == (2, 7)
