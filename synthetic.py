"""
Built-in synthetic data: coloured shapes (text-to-image) and moving shapes (text-to-video).

Everything is generated from (seed, split, index), so no files are needed, any index costs O(1)
and a resumed run sees exactly the same samples. The renderer is deliberately simple so that a
rule-based oracle can recover every attribute exactly from a render (`detect`, at the end of this file,
is that inverse; oracle.py's score_* functions are the oracle rules built on it):

- a fixed black background; each object is one flat colour from COLORS, no anti-aliasing;
- every shape fills its bounding box edge to edge: an object of half-size r centred at integer
  (x, y) covers exactly the pixels [x-r, x+r) x [y-r, y+r), so bbox -> centre and r exactly;
- objects never overlap and are at least `gap` pixels apart, so connected components of
  nearest-colour pixels are the objects;
- each object's centre pixel is filled, so its colour can be read there.

Captions follow T2I-CompBench's categories (paper Sec. 4.2, Table 2): colour binding,
shape binding, spatial relations, plus single objects; videos add a motion direction.
Texture (CompBench's third attribute) is left out: a stripe or dot pattern inside a ~12 px
object is not legible at 32x32 and would break the flat-colour recovery above.

Compositional generalisation: the colour-shape pairs in HELDOUT_PAIRS never appear in the
"train" split; the "heldout" split uses only them. Every colour and every shape still appears
in training, just never together in those pairs.
"""

import functools
from collections import deque

import numpy as np
import torch

# -----------------------------------------------------------------------------
# vocabulary and rendering

# Well separated RGB colours: the closest two (orange/yellow) are 127 apart in RGB,
# so a nearest-colour detector is unambiguous even on a noisy generation.
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (160, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUND = (0, 0, 0)
RELATIONS = ("left of", "right of", "above", "below")  # "A to the left of B", "A above B"
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # image y points down
CATEGORIES = ("single", "color", "shape", "spatial")

# One held-out shape per colour (colour i with shape i mod 5): 8 of the 40 pairs.
HELDOUT_PAIRS = tuple((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLORS))
TRAIN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)


MIN_SIZE = 17  # below, the smallest objects (half-size 2) of circle, diamond and cross have the same pixels


def geometry(size):
    """Object half-sizes, minimum gap between objects and video speed, in pixels, for an image side."""
    if size < MIN_SIZE:
        raise ValueError(f"the shapes need images of at least {MIN_SIZE} px (got {size}): smaller, circle, diamond "
                         "and cross render alike and the oracle cannot tell them apart")
    r_min, r_max = max(2, round(size * 5 / 32)), max(2, round(size * 7 / 32))  # 5..7 px at 32
    gap = max(1, size // 16)  # 2 px at 32
    speed = max(1, size // 16)  # px per frame; 8 frames travel 14 px at 32
    return r_min, r_max, gap, speed


@functools.lru_cache(maxsize=8)
def _pixel_centres(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return yy, xx


def shape_mask(shape, x, y, r, size):
    """Boolean (size, size) mask of one shape with centre (x, y) and half-size r (bbox [x-r, x+r))."""
    yy, xx = _pixel_centres(size)
    u, v = xx - x, yy - y  # pixel centres relative to the object centre
    inside = (np.abs(u) < r) & (np.abs(v) < r)  # the bounding box
    if shape == "circle":
        m = u**2 + v**2 <= r**2
    elif shape == "square":
        m = inside
    elif shape == "triangle":  # pointing up: 2 px wide at the top row, full width at the bottom
        m = np.abs(u) <= (v + r + 0.5) / 2
    elif shape == "diamond":
        m = np.abs(u) + np.abs(v) <= r
    elif shape == "cross":  # plus sign with arms 2r/3 thick
        m = (np.abs(u) <= r / 3) | (np.abs(v) <= r / 3)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m & inside


def render(objects, size=32):
    """Pure renderer: list of {"color", "shape", "x", "y", "r"} -> uint8 (size, size, 3) image."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        img[shape_mask(o["shape"], o["x"], o["y"], o["r"], size)] = COLORS[o["color"]]
    return img


NAMES = [None, *COLORS]  # colour labels: 0 is the background (render_batch paints labels, detect reads them)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.uint8)  # (9, 3): RGB of each label


@functools.lru_cache(maxsize=8)
def _stamps(R):
    """(shapes, R + 1, 2R, 2R) bool: shape_mask of every shape and half-size r <= R, centred in a 2R x 2R window."""
    return np.stack([[shape_mask(s, R, R, r, 2 * R) for r in range(R + 1)] for s in SHAPES])


def render_batch(scenes, size=32):
    """Batched `render` for data loading: B object lists (integer centres inside the image, as the datasets
    draw them) -> uint8 (B, size, size, 3), equal to np.stack([render(s, size) for s in scenes]).

    shape_mask only looks at pixel-centre offsets from the object centre (exact half-integers in float64)
    and is empty outside the bbox, so an object is the shape_mask of its (shape, r) drawn once in a
    2R x 2R window and pasted with its top-left at (x - R, y - R); the whole batch pastes at once."""
    objs = [(b, j, o) for b, scene in enumerate(scenes) for j, o in enumerate(scene)]  # (scene, order, object)
    R = max([o["r"] for _, _, o in objs], default=1)  # window half-side: the largest object
    P = size + 2 * R  # labels are padded by R per side, so every window lies inside
    label = np.zeros((len(scenes), P, P), np.uint8)  # index into PALETTE, 0 = background
    if objs:
        b, j, x, y, r = (np.array(v) for v in zip(*[(b, j, o["x"], o["y"], o["r"]) for b, j, o in objs]))
        if min(x.min(), y.min()) < 0 or max(x.max(), y.max()) > size:
            raise ValueError(f"render_batch needs object centres inside the {size}x{size} image")
        stamp = _stamps(R)[[SHAPES.index(o["shape"]) for _, _, o in objs], r]  # (N, 2R, 2R)
        color = np.array([NAMES.index(o["color"]) for _, _, o in objs], np.uint8)[:, None, None]  # (N, 1, 1)
        # flat index into label of each window pixel: scene b, padded row y + dy, padded column x + dx
        w = np.arange(2 * R)
        flat = ((b[:, None, None] * P + y[:, None, None] + w[:, None]) * P + x[:, None, None] + w)  # (N, 2R, 2R)
        for k in range(j.max() + 1):  # every scene's k-th object, in render's order (later objects on top)
            m = stamp & (j == k)[:, None, None]  # one object per scene here, so no pixel is written twice
            label.reshape(-1)[flat[m]] = np.broadcast_to(color, stamp.shape)[m]  # reshape of contiguous: a view
    return np.take(PALETTE, label[:, R : R + size, R : R + size], axis=0)  # crop the pad; (B, H, W, 3)


def to_tensor(img):
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1]; one image or a whole batch."""
    return torch.from_numpy(img).movedim(-1, -3).float() / 127.5 - 1.0  # (..., 3, H, W)


# -----------------------------------------------------------------------------
# captions


def phrase(o):
    """'a red circle' / 'an orange square'."""
    article = "an" if o["color"][0] in "aeiou" else "a"
    return f"{article} {o['color']} {o['shape']}"


def caption_for(meta):
    """The caption of a scene, a pure function of its ground truth."""
    objs, cat = meta["objects"], meta["category"]
    if cat == "single":
        return phrase(objs[0])
    if cat in ("color", "shape"):
        return f"{phrase(objs[0])} and {phrase(objs[1])}"
    if cat == "spatial":
        rel = meta["relation"]
        rel = f"to the {rel}" if rel in ("left of", "right of") else rel
        return f"{phrase(objs[0])} {rel} {phrase(objs[1])}"
    if cat == "motion":
        return f"{phrase(objs[0])} moving {meta['direction']}"
    raise ValueError(f"unknown category {cat!r}")


# -----------------------------------------------------------------------------
# scene sampling


def _rng(seed, split, index):
    # independent stream per (seed, split, index): any item is O(1) and reproducible
    return np.random.default_rng([seed, {"train": 0, "heldout": 1}[split], index])


def _pairs(split):
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return TRAIN_PAIRS if split == "train" else HELDOUT_PAIRS


def _placements_ok(rs, xys, gap, relation):
    """Which candidate layouts of two objects are valid: rs (K, 2) half-sizes, xys (K, 2, 2) centres.
    Bounding boxes at least `gap` pixels apart along x or y; for a relation "A REL B", the centres are
    separated along its axis, which clearly dominates the other."""
    reach = rs.sum(1) + gap  # (K,)
    d = xys[:, 1] - xys[:, 0]  # (K, 2): displacement from A to B
    ok = (np.abs(d) >= reach[:, None]).any(1)
    if relation:
        axis, sign = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}[relation]
        main, other = sign * d[:, axis], d[:, 1 - axis]
        ok &= (main >= reach) & (2 * np.abs(other) <= main)
    return ok


def sample_scene(rng, category, pairs, size=32):
    """Ground truth of one image: {"category", "objects", "relation"}; objects use only `pairs`."""
    r_min, r_max, gap, _ = geometry(size)
    n = 1 if category == "single" else 2
    while True:
        # attributes: colour binding needs two colours, shape binding two shapes, spatial two
        # distinguishable objects (so the caption names each one unambiguously)
        idx = rng.integers(len(pairs), size=n)
        if n == 2 and idx[0] == idx[1]:
            continue
        chosen = [pairs[i] for i in idx.tolist()]
        if category == "color" and chosen[0][0] == chosen[1][0]:
            continue
        if category == "shape" and chosen[0][1] == chosen[1][1]:
            continue
        break
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))] if category == "spatial" else None
    for _ in range(100):  # rejection sampling of positions, 64 candidate layouts per draw; the first valid one wins
        rs = rng.integers(r_min, r_max + 1, size=(64, n))
        xys = rng.integers(0, 1 << 30, size=(64, n, 2)) % (size - 2 * rs[..., None] + 1) + rs[..., None]  # inside
        ok = _placements_ok(rs, xys, gap, relation) if n == 2 else np.ones(64, bool)
        if ok.any():
            k = int(ok.argmax())
            objs = [{"color": c, "shape": s, "x": int(p[0]), "y": int(p[1]), "r": int(ri)}
                    for (c, s), ri, p in zip(chosen, rs[k], xys[k])]
            return {"category": category, "objects": objs, "relation": relation}
    raise RuntimeError(f"could not place objects for {category!r} at size {size}")


def sample_motion(rng, pairs, num_frames=8, size=32):
    """Ground truth of one clip: one object moving at constant speed, inside the frame throughout."""
    r_min, r_max, _, speed = geometry(size)
    c, s = pairs[int(rng.integers(len(pairs)))]
    direction = str(rng.choice(list(DIRECTIONS)))
    r = int(rng.integers(r_min, r_max + 1))
    travel = speed * (num_frames - 1)
    if 2 * r + travel > size:
        raise ValueError(f"{num_frames} frames at {speed} px/frame do not fit in {size} px")
    dx, dy = DIRECTIONS[direction]
    # start so that start + travel along the motion axis stays in [r, size - r]
    x0 = int(rng.integers(r + travel * (dx < 0), size - r - travel * (dx > 0) + 1))
    y0 = int(rng.integers(r + travel * (dy < 0), size - r - travel * (dy > 0) + 1))
    frames = [[{"color": c, "shape": s, "x": x0 + dx * speed * t, "y": y0 + dy * speed * t, "r": r}]
              for t in range(num_frames)]
    return {"category": "motion", "objects": frames[0], "frames": frames,
            "direction": direction, "speed": speed, "relation": None}


# -----------------------------------------------------------------------------
# datasets


class ShapesDataset(torch.utils.data.Dataset):
    """Text-to-image shapes: item i -> {"x": (3, H, W) in [-1, 1], "caption", "meta"}."""

    def __init__(self, split="train", size=32, seed=0, length=1_000_000, categories=CATEGORIES):
        self.pairs = _pairs(split)
        for c in categories:
            if c not in CATEGORIES:
                raise ValueError(f"unknown category {c!r}; expected one of {CATEGORIES}")
        geometry(size)  # a size too small for the oracle is refused here, not in the first batch
        self.split, self.size, self.seed, self.length = split, size, seed, length
        self.categories = tuple(categories)
        self.spec = f"shapes:{split}:size={size}:seed={seed}:{'+'.join(self.categories)}"  # for cache meta

    def __len__(self):
        return self.length

    def scene(self, i):
        """Ground truth of item i without rendering it."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = _rng(self.seed, self.split, i)
        category = self.categories[int(rng.integers(len(self.categories)))]
        return sample_scene(rng, category, self.pairs, self.size)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """Items of a whole batch: DataLoader (torch >= 2.1) calls this with the batch's indices. Scenes are
        drawn per index as above; rendering and the float conversion are batched (render_batch)."""
        metas = [self.scene(i) for i in indices]
        x = to_tensor(render_batch([m["objects"] for m in metas], self.size))  # (B, 3, H, W)
        return [{"x": xi, "caption": caption_for(m), "meta": m} for xi, m in zip(x, metas)]


class MovingShapesDataset(torch.utils.data.Dataset):
    """Text-to-video moving shapes: item i -> {"x": (T, 3, H, W) in [-1, 1], "caption", "meta"}.

    meta["frames"][t] is the object list of frame t; the object moves meta["speed"] pixels per
    frame in meta["direction"]. One object per clip: two moving objects would need collision
    handling and a caption with two motions, which the toy oracle does not need.
    """

    def __init__(self, split="train", num_frames=8, size=32, seed=0, length=1_000_000):
        self.pairs = _pairs(split)
        geometry(size)
        self.split, self.num_frames, self.size, self.seed, self.length = split, num_frames, size, seed, length
        self.spec = f"moving_shapes:{split}:size={size}:frames={num_frames}:seed={seed}"  # for cache meta

    def __len__(self):
        return self.length

    def scene(self, i):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return sample_motion(_rng(self.seed, self.split, i), self.pairs, self.num_frames, self.size)

    def __getitem__(self, i):
        return self.__getitems__([i])[0]

    def __getitems__(self, indices):
        """Items of a whole batch, all B x T frames rendered at once (see ShapesDataset)."""
        metas = [self.scene(i) for i in indices]
        frames = render_batch([objs for m in metas for objs in m["frames"]], self.size)  # (B T, H, W, 3)
        x = to_tensor(frames).unflatten(0, (len(metas), self.num_frames)).contiguous()  # (B, T, 3, H, W)
        return [{"x": xi, "caption": caption_for(m), "meta": m} for xi, m in zip(x, metas)]


def heldout_prompts(category, n, seed=0, size=32, num_frames=8):
    """n (caption, meta) pairs of held-out compositions for evaluation; category in CATEGORIES or "motion"."""
    if category == "motion":
        ds = MovingShapesDataset("heldout", num_frames=num_frames, size=size, seed=seed)
    else:
        ds = ShapesDataset("heldout", size=size, seed=seed, categories=(category,))
    return [(caption_for(m), m) for m in (ds.scene(i) for i in range(n))]


# -----------------------------------------------------------------------------
# Exact recovery: a rule-based detector that inverts render (the oracle of oracle.py)

MIN_SHAPE_IOU = 0.5  # below this the blob is no shape of the vocabulary


def components(mask):
    """4-connected components of a bool (H, W) mask -> list of (ys, xs) index arrays."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, ys, xs = deque([(y0, x0)]), [], []
        while queue:  # breadth-first flood fill
            y, x = queue.popleft()
            ys.append(y)
            xs.append(x)
            for v, u in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    queue.append((v, u))
        out.append((np.array(ys), np.array(xs)))
    return out


def opening(mask):
    """Morphological opening with a 2x2 square: keeps exactly the pixels that lie in some all-True 2x2 block.
    Every rendered shape is a union of such blocks (so renders pass unchanged), while isolated speckles,
    1-pixel lines and spurs that generation noise attaches to an object are removed."""
    full = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]  # (H-1, W-1): block with top-left here
    out = np.zeros_like(mask)
    for dy in (0, 1):
        for dx in (0, 1):
            out[dy : dy + full.shape[0], dx : dx + full.shape[1]] |= full
    return out


def detect(img):
    """uint8 (H, W, 3) render or generation -> list of {"color", "shape", "x", "y", "r", "area", "iou"}.

    Exact on renders (bbox [x-r, x+r) gives centre and r; the majority colour is the flat colour). For
    generations: a 2x2 opening drops speckles, components smaller than a third of the smallest object or
    larger than twice the largest are ignored, and a blob whose best template IoU is < MIN_SHAPE_IOU gets
    shape None."""
    size = img.shape[0]
    r_min, r_max, _, _ = geometry(size)
    min_area = min(shape_mask(s, r_min, r_min, r_min, 2 * r_min).sum() for s in SHAPES) / 3
    dist = ((img[:, :, None, :].astype(np.float32) - PALETTE.astype(np.float32)) ** 2).sum(-1)  # (H, W, 9)
    label = dist.argmin(-1)  # nearest palette entry per pixel
    objects = []
    for ys, xs in components(opening(label > 0)):
        if len(ys) < min_area:
            continue
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # bbox [x0, x1) x [y0, y1)
        r = max(x1 - x0, y1 - y0) / 2
        if r > 2 * r_max:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        color = NAMES[np.bincount(label[ys, xs], minlength=len(NAMES))[1:].argmax() + 1]  # majority colour
        blob = np.zeros(label.shape, bool)
        blob[ys, xs] = True
        ious = {}
        for s in SHAPES:
            t = shape_mask(s, cx, cy, r, size)
            ious[s] = (blob & t).sum() / (blob | t).sum()
        shape = max(ious, key=ious.get)
        objects.append({"color": color, "shape": shape if ious[shape] >= MIN_SHAPE_IOU else None,
                        "x": float(cx), "y": float(cy), "r": float(r), "area": len(ys), "iou": float(ious[shape])})
    return objects
