"""
Data for GenTron: datasets, batching, latent spaces and the latent/text cache.

- synthetic shapes / moving shapes (built in, no files): see synthetic.py
- real image-text and video-text folders or JSONL manifests (Sec. 4.1: 8 frames at 4 fps)
- joint image-video batches with motion-free pseudo-videos (Sec. 3.3.2, "Putting solutions together")
- latent spaces: pixels (synthetic data) or Stable Diffusion's VAE (real data, Sec. 4.1)
- a cache of precomputed latents and text features, refused if made with other settings

Every dataset item is a dict {"x": tensor, "caption": str, "meta": dict or None, ...};
images are (3, H, W) and videos (T, 3, H, W), floats in [-1, 1].
"""

import torch

from synthetic import (  # noqa: F401  (re-exported: data.ShapesDataset etc.)
    BACKGROUND, CATEGORIES, COLORS, HELDOUT_PAIRS, SHAPES, TRAIN_PAIRS,
    MovingShapesDataset, ShapesDataset, heldout_prompts, render,
)

# -----------------------------------------------------------------------------
# batching

CACHED_KEYS = ("text", "text_mask", "pooled")  # text features read from a cache


def collate(batch):
    """List of items -> {"x", "caption", "meta", ["motion_free"], [cached text features]}.

    "x" is (B, C, H, W) for images or (B, T, C, H, W) for videos; for videos "motion_free" is a
    (B,) bool tensor (True for pseudo-videos of a repeated image, Sec. 3.3.2), False if an item
    does not say. "meta" is the list of ground-truth dicts, or None when no item has one.
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
    return out
