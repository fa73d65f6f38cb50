"""
The oracle benchmark: exact scores of generations of the built-in synthetic data (evaluate.py --oracle, and the
end of a training run on it: final_samples). The synthetic renderer (synthetic.py) draws flat colours from a fixed palette on
black, objects that fill their bounding box and never touch; `detect` inverts it: nearest palette colour per
pixel, connected components, bbox -> centre and half-size, majority colour, shape = best IoU against
synthetic.shape_mask. The scoring rules (per image: single, color, shape, spatial, overall; per clip:
frame_attribute, direction, consistency) and their chance levels are documented with the code, below.
"""

import math
import os

import numpy as np
import torch
from PIL import Image

import fastpath
import pipeline
from checkpoint import write_json
from model import GenTron
from synthetic import CATEGORIES, detect, heldout_prompts

# -----------------------------------------------------------------------------
# Oracle scores of generations against their ground truth, from detect (the oracle benchmark below)
#
# Scores of one image (all reported as fractions in [0, 1]; the table prints x100):
#   single   object accuracy: a detection has the prompt's colour AND shape.
#   color    colour binding: two DISTINCT detections carry exactly the prompt's two (colour, shape) pairs, so
#            drawing "a red circle and a blue square" as a blue circle and a red square fails.
#   shape    shape binding: the same rule (the two objects differ in shape rather than colour).
#   spatial  both objects found as above and the relation holds between their centres with CompBench's rule:
#            "A left of B" iff x_B - x_A > 0 and |dx| > |dy| (likewise right / above / below, y pointing down).
#   overall  mean of color, shape and spatial (the columns of Table 2 this data has; texture: none, "-").
#   colors_placed  diagnostic, not a Table 2 column: over the two-object prompts, two distinct detections carry
#            the prompt's two colours, whatever their shapes (a colour-swapped image passes it). It separates
#            "the colours went to two objects" from "the shapes came out right", which the binding scores need too.
# Videos (one moving object, MovingShapesDataset):
#   frame_attribute  fraction of frames with a detection of the prompt's colour and shape.
#   direction        least-squares fit of the centre track of the largest detection (frames where one exists,
#                    at least 2); the axis with the larger |slope| and its sign give the direction; correct iff it
#                    equals the prompt's and the fitted travel is >= 1/4 of the data's (speed x (T-1)) - a still
#                    object is wrong.
#   consistency      fraction of consecutive frame pairs whose largest detection has the same (colour, shape)
#                    (a missing detection counts as a change): object identity is kept over time.
# Chance levels (a scene of random objects from the 8 x 5 vocabulary): single 1/40 = 2.5% per object in the
# scene; colour / shape binding about 2/40^2 = 0.13%; spatial about a quarter of that; frame attribute 2.5%; direction 25%
# (4 directions); consistency 2.5% for independent frames. tests/test_evaluate.py checks >= 99% on ground-truth
# renders and near these levels on noise.


def relation_holds(a, b, relation):
    """CompBench's centre rule for "a RELATION b": the displacement a -> b along the relation's axis has the
    right sign and dominates the other axis (image y points down)."""
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
    main, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
    return main > 0 and abs(main) > abs(other)


def _matches(dets, o):
    return [i for i, d in enumerate(dets) if d["color"] == o["color"] and d["shape"] == o["shape"]]


def score_image(img, meta):
    """One image against its ground truth -> {"correct": bool, "found": number of prompt objects detected}."""
    dets = detect(img)
    objs = meta["objects"]
    found = [_matches(dets, o) for o in objs]
    out = {"found": sum(bool(f) for f in found), "objects": len(objs)}
    if meta["category"] == "single":
        return {"correct": bool(found[0]), **out}
    # two distinct detections, one per prompt object (and for spatial, the relation between them)
    pairs = [(i, j) for i in found[0] for j in found[1] if i != j]
    if meta["category"] == "spatial":
        pairs = [(i, j) for i, j in pairs if relation_holds(dets[i], dets[j], meta["relation"])]
    colored = [[i for i, d in enumerate(dets) if d["color"] == o["color"]] for o in objs]
    placed = any(i != j for i in colored[0] for j in colored[1])
    return {"correct": bool(pairs), "colors_placed": placed, **out}


def score_images(images, metas):
    """uint8 (B, H, W, 3) images + ground-truth metas -> {category: accuracy, "overall", "object_recall", "n"}."""
    per, placed = {}, []
    found = total = 0
    for img, meta in zip(np.asarray(images), metas):
        s = score_image(img, meta)
        per.setdefault(meta["category"], []).append(s["correct"])
        found, total = found + s["found"], total + s["objects"]
        if "colors_placed" in s:
            placed.append(s["colors_placed"])
    out = {c: float(np.mean(v)) for c, v in per.items()}
    table = [out[c] for c in ("color", "shape", "spatial") if c in out]
    out["overall"] = float(np.mean(table)) if table else None
    out["object_recall"] = found / max(1, total)  # prompt objects detected with the right colour and shape
    out["colors_placed"] = float(np.mean(placed)) if placed else None  # diagnostic (see above)
    out["n"] = {c: len(v) for c, v in per.items()}
    return out


def score_video(frames, meta):
    """One clip (T, H, W, 3) against its ground truth -> {"frame_attribute", "direction", "consistency"}."""
    o, T = meta["objects"][0], len(frames)
    dets = [detect(f) for f in frames]
    attribute = np.mean([bool(_matches(d, o)) for d in dets])
    main = [max(d, key=lambda q: q["area"]) if d else None for d in dets]  # the clip's one object, per frame
    ts = [t for t in range(T) if main[t] is not None]
    correct = False
    if len(ts) >= 2:
        vx = np.polyfit(ts, [main[t]["x"] for t in ts], 1)[0]  # px per frame
        vy = np.polyfit(ts, [main[t]["y"] for t in ts], 1)[0]
        v, axis = (vx, "x") if abs(vx) >= abs(vy) else (vy, "y")
        pred = {("x", True): "right", ("x", False): "left", ("y", True): "down", ("y", False): "up"}[(axis, v > 0)]
        travel = abs(v) * (T - 1)
        correct = pred == meta["direction"] and travel >= 0.25 * meta["speed"] * (T - 1)
    ident = [None if m is None else (m["color"], m["shape"]) for m in main]
    consistency = np.mean([ident[t] is not None and ident[t] == ident[t - 1] for t in range(1, T)]) if T > 1 else 1.0
    return {"frame_attribute": float(attribute), "direction": bool(correct), "consistency": float(consistency)}


def score_videos(videos, metas):
    """uint8 (B, T, H, W, 3) clips + motion metas -> mean frame_attribute, direction, consistency; "n"."""
    scores = [score_video(v, m) for v, m in zip(np.asarray(videos), metas)]
    out = {k: float(np.mean([s[k] for s in scores])) for k in ("frame_attribute", "direction", "consistency")}
    out["n"] = len(scores)
    return out


# -----------------------------------------------------------------------------
# The oracle benchmark: generate held-out compositions, score them with the rules above


def oracle_eval(model, meta, n_per_category=50, seed=0, sampler="dpm++2m", steps=25, cfg=7.5, mfg=1.2,
                device=None, batch_size=64, video=None, frames=None, progress=True, cuda_graph=True):
    """Generate held-out compositions (synthetic.heldout_prompts: colour-shape pairs never seen in training)
    with pipeline.generate and score them. T2I: n prompts per category; T2V: n moving-object prompts."""
    video = model.cfg.temporal if video is None else video
    size = meta.get("resolution") or model.cfg.input_size
    if video:
        frames = frames or meta.get("num_frames") or model.cfg.num_frames
        items = heldout_prompts("motion", n_per_category, seed=seed, size=size, num_frames=frames)
    else:
        items = [it for c in CATEGORIES for it in heldout_prompts(c, n_per_category, seed=seed, size=size)]
    prompts, metas = [p for p, _ in items], [m for _, m in items]
    x = pipeline.generate(model, meta, prompts, seed=seed, sampler=sampler, steps=steps, cfg=cfg, mfg=mfg,
                          frames=frames, video=video, device=device, batch_size=batch_size, progress=progress,
                          cuda_graph=cuda_graph)
    scores = score_videos(x, metas) if video else score_images(x, metas)
    # everything the scores depend on: DDPM's noise also on batch_size (one generator per batch, pipeline.generate)
    settings = dict(kind="t2v" if video else "t2i", n_per_category=n_per_category, seed=seed, sampler=sampler,
                    steps=steps, cfg=cfg, mfg=mfg if video else None, frames=frames, ckpt=meta.get("ckpt"),
                    ema=meta.get("ema"), batch_size=batch_size)
    return {**scores, "settings": settings}


def oracle_table(scores):
    """The Table-2 layout for oracle scores (percent)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
    if "direction" in scores:
        cols = ["Frame attr.", "Direction", "Consistency"]
        return table(cols, [[pct(scores[k]) for k in ("frame_attribute", "direction", "consistency")]])
    cols = ["Color", "Shape", "Texture", "Spatial", "Overall", "Single obj."]
    return table(cols, [[pct(scores.get(k)) for k in ("color", "shape", "texture", "spatial", "overall", "single")]])


def table(cols, rows, first=None):
    """Right-aligned columns under a header line (oracle and CompBench scores)."""
    w = max(12, *(len(c) + 2 for c in cols))
    head = ("" if first is None else f"{first[0]:<24}") + "".join(f"{c:>{w}}" for c in cols)
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        lines.append(("" if first is None else f"{first[i + 1]:<24}") + "".join(f"{v:>{w}}" for v in r))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the end of a training run on the built-in data: samples.png and the oracle's scores (train_t2i.py)


def grid_prompts(data):
    """The built-in data's held-out captions, unique, for the final sample grid: a colour-shape pair, a binding
    and a spatial prompt in turn, or for clips the moving shapes'."""
    if data.frames:
        rows = heldout_prompts("motion", 64, size=data.resolution, num_frames=data.frames)
        return list(dict.fromkeys(c for c, _ in rows))
    cats = [heldout_prompts(cat, 64, size=data.resolution) for cat in ("single", "color", "spatial")]
    return list(dict.fromkeys(c for row in zip(*cats) for c, _ in row))


@torch.no_grad()
def final_samples(cfg, weights, data, meta, out, args, device):
    """RUN_DIR/samples.png (+ samples.txt) from pipeline.generate: DPM-Solver++(2M) with CFG, or for video
    motion-free guidance (Eq. 6) (--num-samples); then the oracle benchmark (oracle.py) on held-out compositions (--eval-n).
    The built-in data only (online or cached); train_t2i.py calls it on rank 0 only."""
    model = GenTron(cfg).to(device).eval()
    model.load_state_dict(weights)
    if not args.readable:
        fastpath.speed_up(model)  # as sample.py loads a model: the captions encoded once, CUDA graphs on a GPU
    meta = {**meta, "encoder": data.encoder, "latent": data.latents}  # the run's meta, encoders already loaded
    kw = dict(seed=args.seed, steps=args.sample_steps, cfg=args.cfg_scale, mfg=getattr(args, "mfg_scale", 1.0),
              device=device, progress=False)
    if args.num_samples:
        prompts = grid_prompts(data)[: args.num_samples]
        x = pipeline.generate(model, meta, prompts, frames=data.frames, **kw).numpy()  # uint8 (n, [T,] H, W, 3)
        Image.fromarray(pipeline.grid_image(x, math.ceil(math.sqrt(len(x))))).save(os.path.join(out, "samples.png"))
        with open(os.path.join(out, "samples.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
        print(f"wrote {out}/samples.png: {len(prompts)} held-out prompts (samples.txt), {args.sample_steps} "
               f"DPM-Solver++ steps, CFG {args.cfg_scale}")
    if args.eval_n:
        scores = oracle_eval(model, meta, args.eval_n, **kw)
        print(f"evaluate.py oracle, {scores['n']} held-out prompt(s) per category:\n{oracle_table(scores)}")
        write_json(os.path.join(out, "oracle.json"), scores)
