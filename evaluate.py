"""
Evaluation of GenTron: an exact oracle benchmark on the built-in synthetic data, and the real-model metrics
of the paper (T2I-CompBench, Sec. 4.2 and Tables 2-3; CLIP score and FID, Table 4).

    python evaluate.py --oracle                                 # bundled T2I model, held-out compositions
    python evaluate.py --oracle --video --ckpt runs/t2v         # per-frame attributes, motion, consistency
    python evaluate.py --compbench T2I-CompBench/examples/dataset --ckpt runs/t2i --images out/compbench
    python evaluate.py --compbench T2I-CompBench/examples/dataset --images out/compbench   # score existing images
    python evaluate.py --clip-score out/                        # a sample.py output folder (images or videos)
    python evaluate.py --fid out/ --ref data/coco_val_imgs      # needs `pip install 'torch-fidelity>=0.4'`
    python evaluate.py --attention-logits --ckpt runs/t2i       # largest attention logit per block (stability)

Oracle. The synthetic renderer (synthetic.py) draws flat colours from a fixed palette on black, objects that
fill their bounding box and never touch; `detect` inverts it: nearest palette colour per pixel, connected
components, bbox -> centre and half-size, majority colour, shape = best IoU against synthetic.shape_mask.
The scoring rules (per image: single, color, shape, spatial, overall; per clip: frame_attribute, direction,
consistency) and their chance levels are documented with the code, below.

The real-model metrics (T2I-CompBench through transformers, CLIP score, FID) are in metrics.py; this file is
their command line too.
"""

import argparse
import os
import sys

import numpy as np
import torch

from checkpoint import free_name, write_json
from metrics import (BLIP_VQA, CLIP_B32, CLIP_L14, COMPBENCH, DETECTOR, clip_eval, compbench,
                     compbench_generate, fid)
from model import CrossAttention
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
    from pipeline import generate

    video = model.cfg.temporal if video is None else video
    size = meta.get("resolution") or model.cfg.input_size
    if video:
        frames = frames or meta.get("num_frames") or model.cfg.num_frames
        items = heldout_prompts("motion", n_per_category, seed=seed, size=size, num_frames=frames)
    else:
        items = [it for c in CATEGORIES for it in heldout_prompts(c, n_per_category, seed=seed, size=size)]
    prompts, metas = [p for p, _ in items], [m for _, m in items]
    x = generate(model, meta, prompts, seed=seed, sampler=sampler, steps=steps, cfg=cfg, mfg=mfg, frames=frames,
                 video=video, device=device, batch_size=batch_size, progress=progress, cuda_graph=cuda_graph)
    scores = score_videos(x, metas) if video else score_images(x, metas)
    # everything the scores depend on: DDPM's noise also on batch_size (one generator per batch, pipeline.generate)
    settings = dict(kind="t2v" if video else "t2i", n_per_category=n_per_category, seed=seed, sampler=sampler,
                    steps=steps, cfg=cfg, mfg=mfg if video else None, frames=frames, ckpt=meta.get("ckpt"),
                    ema=meta.get("ema"), batch_size=batch_size)
    return {**scores, "settings": settings}


@torch.no_grad()
def attention_logit_max(model, *args, **kwargs):
    """The largest attention logit |q.k| / sqrt(Dh) of every attention layer during model(*args, **kwargs),
    masked positions excluded -> {"self": [per block], "cross": [...], "temporal": [...]}. Their growth is
    the instability that qk_norm prevents (README, "Bundled models"); evaluate.py --attention-logits."""
    found, hooks = {}, []

    def record(name):
        def hook(attn, inputs, output):
            if isinstance(attn, CrossAttention):
                q, k, _, mask = attn.heads_qkv(*inputs)
            else:  # self-attention: (x,) or (x, mask)
                q, k, _ = attn.heads_qkv(inputs[0])
                mask = inputs[1] if len(inputs) > 1 else None
            logits = q.float() @ k.float().transpose(-1, -2) / q.shape[-1] ** 0.5
            if mask is not None:
                logits = logits.masked_fill(~mask, 0)
            found.setdefault(name, []).append(logits.abs().max().item())
        return hook

    for block in model.blocks:
        hooks.append(block.attn.register_forward_hook(record("self")))
        if block.cross:
            hooks.append(block.cross_attn.register_forward_hook(record("cross")))
        if block.temporal is not None:
            hooks.append(block.temporal.attn.register_forward_hook(record("temporal")))
    try:
        model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return found


def attention_logits(model, meta, n=64, seed=0, device="cpu"):
    """attention_logit_max on n training samples of the built-in data, noised at t ~ U{0..999}: the
    attention-logit growth that diverged our long toy runs shows up here first (README, "Bundled models")."""
    from diffusion import Diffusion
    from synthetic import MovingShapesDataset, ShapesDataset

    size = meta.get("resolution") or model.cfg.input_size
    if meta.get("latent_space") != "pixel":
        raise ValueError("--attention-logits draws its inputs from the built-in data: a pixel-space model needed")
    ds = MovingShapesDataset(num_frames=model.cfg.num_frames, size=size, seed=seed) if model.cfg.temporal \
        else ShapesDataset(size=size, seed=seed)
    items = ds.__getitems__(list(range(n)))
    g = torch.Generator().manual_seed(seed)
    x0 = torch.stack([it["x"] for it in items])
    t = torch.randint(0, 1000, (n,), generator=g)
    xt = Diffusion().q_sample(x0, t, torch.randn(x0.shape, generator=g))
    text, mask, pooled = meta["encoder"]([it["caption"] for it in items])
    inputs = dict(x=xt, t=t, text=text, text_mask=mask, pooled=pooled)  # T2V: every clip a motion clip
    cuda = torch.device(device).type == "cuda"  # as sampling runs it (load_model keeps bf16 weights on CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        return attention_logit_max(model, **{k: v.to(device) for k, v in inputs.items()})


def oracle_table(scores):
    """The Table-2 layout for oracle scores (percent)."""
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
    if "direction" in scores:
        cols = ["Frame attr.", "Direction", "Consistency"]
        return _table(cols, [[pct(scores[k]) for k in ("frame_attribute", "direction", "consistency")]])
    cols = ["Color", "Shape", "Texture", "Spatial", "Overall", "Single obj."]
    return _table(cols, [[pct(scores.get(k)) for k in ("color", "shape", "texture", "spatial", "overall", "single")]])


def _table(cols, rows, first=None):
    w = max(12, *(len(c) + 2 for c in cols))
    head = ("" if first is None else f"{first[0]:<24}") + "".join(f"{c:>{w}}" for c in cols)
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        lines.append(("" if first is None else f"{first[i + 1]:<24}") + "".join(f"{v:>{w}}" for v in r))
    return "\n".join(lines)


def compbench_table(scores):
    names = {"color": "Color", "shape": "Shape", "texture": "Texture", "spatial": "Spatial",
             "non_spatial": "Non-spatial", "complex": "Complex", "mean": "Mean"}
    return _table(list(names.values()), [[f"{100 * scores[k]:.2f}" if k in scores else "-" for k in names]])


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="run dir, ckpt-*.pt or .safetensors (default: the bundled model)")
    p.add_argument("--oracle", action="store_true", help="exact benchmark on held-out synthetic compositions")
    p.add_argument("--video", action="store_true", help="with --oracle: the T2V benchmark")
    p.add_argument("--n", type=int, default=50, help="--oracle: prompts per category; --attention-logits: samples")
    p.add_argument("--compbench", metavar="PROMPT_DIR", help="T2I-CompBench prompt folder (color_val.txt, ...)")
    p.add_argument("--images", help="--compbench: image folder ({category}/samples/*.png); written first with --ckpt")
    p.add_argument("--categories", default=",".join(COMPBENCH), help="--compbench: comma-separated")
    p.add_argument("--n-per-prompt", type=int, default=10, help="--compbench with --ckpt: images per prompt (10)")
    p.add_argument("--max-prompts", type=int, default=None, help="--compbench with --ckpt: first N prompts")
    p.add_argument("--blip", default=BLIP_VQA)
    p.add_argument("--clip", default=None, help=f"CLIP model (default {CLIP_B32} for CompBench, {CLIP_L14} else)")
    p.add_argument("--detector", default=DETECTOR)
    p.add_argument("--clip-score", metavar="SAMPLE_DIR", help="CLIP score of a sample.py output folder")
    p.add_argument("--fid", metavar="GEN_DIR", help="FID of an image folder against --ref")
    p.add_argument("--ref", help="--fid: reference image folder")
    p.add_argument("--attention-logits", action="store_true",
                   help="largest attention logit |q.k|/sqrt(Dh) per block on noised training data (built-in data)")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--mfg", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--eager", action="store_true", help="CUDA: sample without CUDA graphs (sample.py --eager)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="where to write the scores (default: out/<mode>.json or inside the scored folder)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.oracle, args.compbench, args.clip_score, args.fid, args.attention_logits))) != 1:
        p.error("choose exactly one of --oracle, --compbench, --clip-score, --fid, --attention-logits")
    for name in ("n", "n_per_prompt", "max_prompts", "batch_size"):  # --steps: diffusion.py checks its range
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from pipeline import check_settings

    try:  # the checks sample.py makes: seed, steps, finite guidance scales, a device this machine has
        check_settings(dict(seed=args.seed, steps=args.steps, cfg=args.cfg, mfg=args.mfg, device=args.device),
                       os.path.dirname(os.path.abspath(args.json)) if args.json else "", flags={"out": "--json"})
    except ValueError as e:
        p.error(str(e))
    if args.json and os.path.exists(args.json):  # scores never replace a file (a samples.json, earlier scores)
        p.error(f"--json {args.json} exists: choose another path")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars of our own loops only

    if args.oracle or args.attention_logits:
        from pipeline import load_model
        model, meta = load_model(args.ckpt, ema=not args.no_ema, device=args.device, video=args.video or None)
    if args.oracle:
        scores = oracle_eval(model, meta, args.n, args.seed, args.sampler, args.steps, args.cfg, args.mfg,
                             args.device, args.batch_size, video=args.video, cuda_graph=not args.eager)
        table, default = oracle_table(scores), os.path.join("out", f"oracle_{scores['settings']['kind']}.json")
    elif args.attention_logits:
        scores = attention_logits(model, meta, args.n, args.seed, args.device)
        table = "\n".join(f"{kind:<9} " + " ".join(f"{v:8.1f}" for v in vals) for kind, vals in scores.items())
        table = f"largest attention logit per block (step {meta['step']}):\n{table}"
        default = os.path.join("out", "attention_logits.json")
    elif args.compbench:
        cats = [c.strip() for c in args.categories.split(",") if c.strip()]
        bad = [c for c in cats if c not in COMPBENCH]
        if bad or not args.images:
            raise ValueError(f"--compbench needs --images DIR and categories from {', '.join(COMPBENCH)} (got {bad})")
        if args.ckpt:
            from pipeline import load_model

            model, meta = load_model(args.ckpt, ema=not args.no_ema, device=args.device)
            compbench_generate(model, meta, args.compbench, args.images, cats, args.n_per_prompt, args.max_prompts,
                               seed=args.seed, sampler=args.sampler, steps=args.steps, cfg=args.cfg,
                               batch_size=args.batch_size, cuda_graph=not args.eager)
            del model
        scores = compbench(args.compbench, args.images, cats, args.device, args.blip, args.clip or CLIP_B32,
                           args.detector)
        table, default = compbench_table(scores), os.path.join(args.images, "compbench.json")
    elif args.clip_score:
        scores = clip_eval(args.clip_score, args.clip or CLIP_L14, args.device)
        table, default = "\n".join(f"{k}: {v:.2f}" for k, v in scores.items() if k != "n"), \
            os.path.join(args.clip_score, "clip_score.json")
    else:
        if not args.ref:
            raise ValueError("--fid needs --ref REFERENCE_IMAGE_FOLDER")
        scores = fid(args.fid, args.ref, args.device)
        table, default = f"FID: {scores['fid']:.2f}", os.path.join(args.fid, "fid.json")
    print(table)
    path = args.json or free_name(default)  # the default never replaces an earlier run's scores
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json(path, scores)  # atomic: a crash never leaves half a score file
    print(f"wrote {path}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
