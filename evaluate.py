"""
Evaluation of GenTron: an exact oracle benchmark on the built-in synthetic data, and the real-model metrics
of the paper (T2I-CompBench, Sec. 4.2 and Tables 2-3; CLIP score and FID, Table 4).

    python evaluate.py --oracle                                 # bundled T2I model, held-out compositions
    python evaluate.py --oracle --video --ckpt runs/t2v         # per-frame attributes, motion, consistency
    python evaluate.py --compbench T2I-CompBench/examples/dataset --ckpt runs/t2i --images out/compbench
    python evaluate.py --compbench T2I-CompBench/examples/dataset --images out/compbench   # score existing images
    python evaluate.py --clip-score out/                        # a sample.py output folder (images or videos)
    python evaluate.py --fid out/ --ref data/coco_val_imgs      # needs `pip install 'torch-fidelity>=0.4'`
    python evaluate.py --fid out/ --ref data/coco_val_imgs --inception-weights weights-inception-2015-12-05-6726825d.pth
    python evaluate.py --attention-logits --ckpt runs/t2i       # largest attention logit per block (stability)

The oracle benchmark's scoring rules are in oracle.py, the real-model metrics (T2I-CompBench through
transformers, CLIP score, FID) in metrics.py; this file is their command line, with the attention-logit probe.
"""

import argparse
import os
import sys

import torch

from checkpoint import check_writable, free_name, write_json
from metrics import (BLIP_VQA, CLIP_B32, CLIP_L14, COMPBENCH, DETECTOR, clip_eval, compbench,
                     compbench_generate, fid)
from model import CrossAttention
from oracle import oracle_eval, oracle_table, table

# -----------------------------------------------------------------------------
# The attention-logit probe (--attention-logits)


@torch.no_grad()
def attention_logit_max(model, *args, **kwargs):
    """The largest attention logit |q.k| / sqrt(Dh) of every attention layer during model(*args, **kwargs),
    masked positions excluded -> {"self": [per block], "cross": [...], "temporal": [...]}. Their growth is
    the instability that qk_norm prevents (docs/bundled-models.md, "Why QK-norm"); evaluate.py --attention-logits."""
    found, hooks = {}, []

    def record(name):
        def hook(attn, inputs, output):
            if isinstance(attn, CrossAttention):
                q, k, _, mask = attn.heads_qkv(*inputs[:3])  # (x, text, text_mask[, kv])
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
    attention-logit growth that diverged our long toy runs shows up here first (docs/bundled-models.md,
    "Why QK-norm")."""
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



def compbench_table(scores):
    names = {"color": "Color", "shape": "Shape", "texture": "Texture", "spatial": "Spatial",
             "non_spatial": "Non-spatial", "complex": "Complex", "mean": "Mean"}
    return table(list(names.values()), [[f"{100 * scores[k]:.2f}" if k in scores else "-" for k in names]])


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", help="run dir, one of its ckpt-NNNNNNN checkpoints, or a .safetensors export (default: the bundled model)")
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
    p.add_argument("--inception-weights", metavar="PATH", help="--fid: local copy of torch-fidelity's Inception "
                   "weights (weights-inception-2015-12-05-6726825d.pth), for offline machines (default: fetched once)")
    p.add_argument("--attention-logits", action="store_true",
                   help="largest attention logit |q.k|/sqrt(Dh) per block on noised training data (built-in data)")
    p.add_argument("--sampler", default="dpm++2m")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--mfg", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--text-encoder", metavar="SPEC", help="with --ckpt: replaces its text encoder (sample.py --text-encoder)")
    p.add_argument("--latent-space", metavar="NAME_OR_DIR", help="with --ckpt: replaces its latent space: sd-vae, a "
                   "diffusers AutoencoderKL hub name or local folder (sample.py --latent-space)")
    p.add_argument("--eager", action="store_true", help="CUDA: sample without CUDA graphs (sample.py --eager)")
    p.add_argument("--readable", action="store_true", help="model.py's forwards as written (sample.py --readable)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="where to write the scores (default: out/<mode>.json or inside the scored folder)")
    args = p.parse_args(argv)
    if sum(map(bool, (args.oracle, args.compbench, args.clip_score, args.fid, args.attention_logits))) != 1:
        p.error("choose exactly one of --oracle, --compbench, --clip-score, --fid, --attention-logits")
    for name in ("n", "n_per_prompt", "max_prompts", "batch_size"):  # --steps: diffusion.py checks its range
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.inception_weights and not args.fid:
        p.error("--inception-weights is for --fid")
    from pipeline import check_settings

    try:  # the checks sample.py makes: seed, steps, finite guidance scales, a device this machine has
        check_settings(dict(seed=args.seed, steps=args.steps, cfg=args.cfg, mfg=args.mfg, device=args.device),
                       os.path.dirname(os.path.abspath(args.json)) if args.json else "", flags={"out": "--json"})
    except ValueError as e:
        p.error(str(e))
    if args.json and os.path.exists(args.json):  # scores never replace a file (a samples.json, earlier scores)
        p.error(f"--json {args.json} exists: choose another path")
    # where the scores (and --compbench --ckpt's images) will go: writable, before any model is loaded or run
    if args.json:
        check_writable(os.path.dirname(os.path.abspath(args.json)), "--json")
    elif args.oracle or args.attention_logits:
        check_writable("out", "the default score folder")
    if args.compbench and args.ckpt and args.images:
        check_writable(args.images, "--images")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # progress bars of our own loops only

    if args.oracle or args.attention_logits:
        from pipeline import load_model
        model, meta = load_model(args.ckpt, ema=not args.no_ema, device=args.device, video=args.video or None,
                                 fast=not args.readable, text_encoder=args.text_encoder, latent_space=args.latent_space)
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

            model, meta = load_model(args.ckpt, ema=not args.no_ema, device=args.device, fast=not args.readable,
                                     text_encoder=args.text_encoder, latent_space=args.latent_space)
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
        scores = fid(args.fid, args.ref, args.device, args.inception_weights)
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
