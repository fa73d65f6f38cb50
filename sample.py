"""
Sample images and videos from a trained GenTron (DDPM / DDIM / DPM-Solver++ with classifier-free
guidance; for video, motion-free guidance, paper Sec. 3.3.2, Eq. 6).

    python sample.py "a red circle to the left of a blue square"       # the bundled toy T2I model
    python sample.py --video "a cyan square moving right"               # the bundled toy T2V model (GIF)
    python sample.py --ckpt runs/t2i "a panda" --sampler ddim --steps 50 --cfg 7.5 --n-per-prompt 4
    python sample.py --from-json out/samples.json --index 3             # regenerate sample 3 exactly
    python sample.py --ckpt runs/t2i --export assets/gentron_t2i.safetensors   # EMA weights for release

--ckpt takes a run directory (its newest checkpoint), one checkpoint (RUN/ckpt-NNNNNNN), or a .safetensors export. The model
is rebuilt from the checkpoint's stored config alone; the text encoder and latent space are the ones its
meta names. Outputs: one PNG per image at native resolution (exact pixels) and a grid.png upscaled for
viewing; per video a GIF and, with imageio-ffmpeg, an MP4 (both upscaled) and a native-resolution frame
strip PNG; and samples.json with every setting, the prompt and seed of each sample.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from checkpoint import DTYPES, check_writable, export, free_name, out_of_space, space_report, write_json
from diffusion import SAMPLERS
from pipeline import check_settings, generate, grid_image, load_model, sample_seed, upscale

FPS = 4  # paper Sec. 4.1: clips are 8 frames sampled at 4 fps

# -----------------------------------------------------------------------------
# writing outputs


def slug(prompt, n=48):
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:n] or "empty"


def write_mp4(path, frames, fps=FPS):
    """(T, H, W, 3) uint8 -> H.264 MP4 through imageio-ffmpeg (optional). Returns False when it is missing."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return False
    h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(path, (w, h), fps=fps, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)  # start the generator
    for f in frames:
        writer.send(np.ascontiguousarray(f))
    writer.close()
    return True


def save_samples(samples, records, out_dir, cols):
    """Write every sample (see the module docstring) and fill each record's file names."""
    os.makedirs(out_dir, exist_ok=True)
    mp4 = True
    for x, rec in zip(samples.numpy(), records):
        stem = f"{rec['index']:04d}_{slug(rec['prompt'])}"
        if x.ndim == 3:  # image (H, W, 3): native pixels, what evaluate.py reads
            Image.fromarray(x).save(os.path.join(out_dir, stem + ".png"))
            rec["file"] = stem + ".png"
        else:  # video (T, H, W, 3)
            strip = np.concatenate(list(x), axis=1)  # frames left to right, (H, T W, 3), native pixels
            Image.fromarray(strip).save(os.path.join(out_dir, stem + "_strip.png"))
            big = [Image.fromarray(upscale(f)) for f in x]
            big[0].save(os.path.join(out_dir, stem + ".gif"), save_all=True, append_images=big[1:],
                        duration=1000 // FPS, loop=0)
            rec.update(file=stem + "_strip.png", gif=stem + ".gif")
            if mp4 and write_mp4(os.path.join(out_dir, stem + ".mp4"), np.stack([np.asarray(b) for b in big])):
                rec["mp4"] = stem + ".mp4"
            else:
                mp4 = False
    Image.fromarray(grid_image(samples.numpy(), cols)).save(os.path.join(out_dir, "grid.png"))
    return mp4



def run(settings, prompts, out_dir, only=None, progress=True, cuda_graph=True, fast=True):
    """Generate samples for a flat prompt list (index i = position) with `settings`, write them and
    samples.json. only = a list of indices to write (the batches that hold them are regenerated).
    cuda_graph: as generate's; fast: as load_model's (the same math either way, so samples.json records neither)."""
    s = settings
    check_settings(s, out_dir)
    check_writable(out_dir)  # before minutes of sampling: --out /proc/x, a read-only or full disk
    model, meta = load_model(s["ckpt"], ema=s["ema"], device=s["device"], video=s["video"], fast=fast,
                             text_encoder=s.get("text_encoder"), latent_space=s.get("latent_space"))
    if s.get("step") is not None and s["step"] != meta["step"]:  # a replay (--from-json) of another checkpoint
        raise ValueError(f"the run sampled step {s['step']} ({s.get('ckpt_file')}), but {meta['ckpt']} is step "
                         f"{meta['step']}: the recorded checkpoint is gone, so the samples cannot be remade")
    if meta["kind"] == "t2v" and not s["video"] and progress:
        print("note: T2V checkpoint sampled as images (one frame = the motion-free path); add --video for clips")
    s.update(ckpt_file=meta["ckpt"], step=meta["step"], kind=meta["kind"], text_encoder=meta["text_encoder"],
             latent_space=meta["latent_space"], resolution=meta.get("resolution"))
    bs = s["batch_size"]
    wanted = sorted(set(range(len(prompts)) if only is None else only))
    for i in wanted:
        if not 0 <= i < len(prompts):
            raise ValueError(f"index {i} is out of range: the run has {len(prompts)} samples")
    samples, records = [], []
    for b0 in sorted({i // bs * bs for i in wanted}):  # replay whole batches: bit-identical on the same device
        x = generate(model, meta, prompts[b0 : b0 + bs], seed=s["seed"], sampler=s["sampler"], steps=s["steps"],
                     cfg=s["cfg"], mfg=s["mfg"], frames=s["frames"], video=s["video"], batch_size=bs,
                     first_index=b0, progress=progress, cuda_graph=cuda_graph)
        for j in range(x.shape[0]):
            if b0 + j in wanted:
                samples.append(x[j])
                records.append({"index": b0 + j, "prompt": prompts[b0 + j], "sample": (b0 + j) % s["n_per_prompt"],
                                "noise_seed": sample_seed(s["seed"], b0 + j)})
    samples = torch.stack(samples)
    cols = s["n_per_prompt"] if s["n_per_prompt"] > 1 else min(8, len(records))
    try:
        save_samples(samples, records, out_dir, cols)
    except OSError as e:  # the disk filled up while sampling
        if not out_of_space(e):
            raise
        k = upscale(np.zeros(samples.shape[-3:], np.uint8)).shape[0] // samples.shape[-3]  # the viewing upscale
        need = lambda: samples.numel() * (1 + 2 * k * k)  # at most: native PNGs, the grid and GIFs, uncompressed
        raise OSError(f"could not write the samples to {out_dir}: "
                      f"{space_report(os.path.join(out_dir, 'grid.png'), need)}") from None
    write_json(os.path.join(out_dir, "samples.json"), {"settings": s, "num_samples": len(prompts), "samples": records})
    return samples, records


SETTINGS = ("ckpt", "ema", "video", "sampler", "steps", "cfg", "mfg", "seed", "frames", "n_per_prompt", "batch_size",
            "device")  # what samples.json must record to redo a run
NUMBER, MAYBE = (int, float), type(None)
TYPES = dict(ckpt=(str, MAYBE), ema=bool, video=bool, sampler=str, steps=int, cfg=NUMBER, mfg=NUMBER, seed=int,
             frames=(int, MAYBE), n_per_prompt=int, batch_size=int, device=str)  # of each setting in samples.json
GIVEN = ("prompt", "prompts", "ckpt", "video", "sampler", "steps", "cfg", "mfg", "seed", "n_per_prompt", "batch_size",
         "frames", "no_ema")  # the flags that --from-json takes from samples.json instead


def wrong_types(settings):
    """The settings (of a samples.json) whose values have the wrong JSON type, e.g. steps "25" (a bool is no int)."""
    return [f"{k}={settings[k]!r}" for k, t in TYPES.items()
            if not isinstance(settings[k], t) or (isinstance(settings[k], bool) and t is not bool)]


def free_dir(base):
    """base, or base-2, base-3, ...: the first folder that holds no earlier run's samples.json."""
    return free_name(base, lambda folder: os.path.exists(os.path.join(folder, "samples.json")))


def read_prompts(args):
    blank = [i + 1 for i, text in enumerate(args.prompt) if not text.strip()]
    if blank:  # (a prompt file's blank lines are skipped instead)
        raise ValueError(f"prompt {blank[0]} is empty: give each prompt some text")
    prompts = list(args.prompt)
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise FileNotFoundError(f"prompt file {args.prompts} {'is a folder' if os.path.isdir(args.prompts) else 'does not exist'}")
        with open(args.prompts, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the prompt
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError('give at least one prompt, e.g. python sample.py "a red circle above a blue square"')
    return prompts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--ckpt", help="run dir, one of its ckpt-NNNNNNN checkpoints, or a .safetensors export (default: the bundled model)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--video", action="store_true", help="text-to-video (needs a T2V checkpoint)")
    p.add_argument("--sampler", default="dpm++2m", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DPM-Solver++ is good at ~20-25)")
    p.add_argument("--cfg", type=float, default=7.5, help="text guidance lambda_T (Sec. 3.3.2: 7.5)")
    p.add_argument("--mfg", type=float, default=1.2, help="motion guidance lambda_M for video, Eq. 6 (1.0 = plain CFG)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: the checkpoint's)")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA weights")
    p.add_argument("--text-encoder", metavar="SPEC", help="replaces the checkpoint's text encoder, e.g. after its folder "
                   "moved: 'clip=/new/clip+t5=/new/t5' (text_encoders.py); must give the same text_dim / pooled_dim")
    p.add_argument("--latent-space", metavar="NAME_OR_DIR", help="replaces the checkpoint's latent space: sd-vae, a "
                   "diffusers AutoencoderKL hub name or a local folder (e.g. after it moved); same channels and "
                   "downsampling")
    p.add_argument("--out", default=None, help="output folder (default: out, or out-2, out-3, ... where out holds "
                   "an earlier run); a folder that holds an earlier run's samples.json is refused")
    p.add_argument("--eager", action="store_true", help="CUDA: launch each step's kernels from Python instead of "
                   "replaying a CUDA graph (the same samples, slower; for a model changed to sync with the host)")
    p.add_argument("--readable", action="store_true", help="run model.py's forwards as written, without fastpath's "
                   "fused ones and CUDA graphs (the same math, slower)")
    p.add_argument("--device", help="default: cuda if available, else cpu (--from-json: the recorded device)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's); 1 is fastest for the "
                   "toy models on a busy machine")
    p.add_argument("--export", metavar="OUT.safetensors", help="write --ckpt's EMA weights and metadata, then exit")
    p.add_argument("--export-dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--from-json", metavar="samples.json", help="regenerate samples of an earlier run exactly")
    p.add_argument("--index", type=int, action="append", help="with --from-json: only these sample indices")
    args = p.parse_args(argv)
    if args.out and os.path.exists(os.path.join(args.out, "samples.json")):  # never overwrite an earlier run
        raise ValueError(f"--out {args.out} holds an earlier run (samples.json): choose another folder")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars for the tiny encoders
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0: PyTorch's default), got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.export:
        if not args.ckpt:
            raise ValueError("--export needs --ckpt RUN_DIR_OR_FILE")
        size = export(args.ckpt, args.export, args.export_dtype)
        print(f"wrote {args.export} ({size / 2**20:.2f} MiB, EMA weights, {args.export_dtype})")
        return
    if args.index and not args.from_json:
        raise ValueError("--index picks samples of a --from-json replay; without --from-json there are none to pick")
    if args.from_json:
        given = [name for name in GIVEN if (getattr(args, name) or None) != (p.get_default(name) or None)]
        if given:  # they would be ignored: the replay takes every setting from samples.json
            raise ValueError(f"--from-json replays the settings in {args.from_json}; drop "
                             + ", ".join("the prompts" if n in ("prompt", "prompts") else "--" + n.replace("_", "-")
                                         for n in given))
        if not os.path.isfile(args.from_json):
            raise FileNotFoundError(f"{args.from_json} {'is a folder' if os.path.isdir(args.from_json) else 'does not exist'}")
        try:
            with open(args.from_json) as f:
                rec = json.load(f)
            settings = rec["settings"]
            missing = [k for k in SETTINGS if k not in settings]
            if missing:
                raise KeyError(f"settings lack {', '.join(missing)}")
            wrong = wrong_types(settings)
            if wrong:
                raise TypeError(f"settings of the wrong type: {', '.join(wrong)}")
            prompts = [None] * rec["num_samples"]
            for r in rec["samples"]:
                if not 0 <= r["index"] < len(prompts):
                    raise IndexError(f"sample index {r['index']} outside 0..{len(prompts) - 1}")
                prompts[r["index"]] = r["prompt"]
            if not prompts:
                raise ValueError("no samples")
        except (KeyError, TypeError, IndexError, ValueError) as e:  # ValueError: not JSON
            raise ValueError(f"{args.from_json} is not a samples.json written by sample.py "
                             f"({type(e).__name__}: {e})") from None
        if None in prompts:  # a partial JSON (itself a reproduction): only its own samples can be remade
            raise ValueError(f"{args.from_json} lists {sum(x is not None for x in prompts)} of {len(prompts)} "
                             "samples; use the samples.json of the original run")
        if os.path.isfile(settings.get("ckpt_file") or ""):
            settings["ckpt"] = settings["ckpt_file"]  # the exact file, not a run dir's newest checkpoint now
        if args.device:
            settings["device"] = args.device  # numerics differ across devices: exact only on the recorded one
        for k in ("text_encoder", "latent_space"):  # the recorded ones (load_model checks them), or the moved ones
            settings[k] = getattr(args, k) or settings.get(k)
        out = args.out or free_dir(os.path.join(os.path.dirname(args.from_json) or ".", "from_json"))
        _, records = run(settings, prompts, out, only=args.index, cuda_graph=not args.eager, fast=not args.readable)
    else:
        settings = dict(ckpt=args.ckpt, ema=not args.no_ema, video=args.video, sampler=args.sampler,
                        steps=args.steps, cfg=args.cfg, mfg=args.mfg, seed=args.seed, frames=args.frames,
                        n_per_prompt=args.n_per_prompt, batch_size=args.batch_size,
                        text_encoder=args.text_encoder, latent_space=args.latent_space,
                        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        prompts = [q for q in read_prompts(args) for _ in range(args.n_per_prompt)]
        out = args.out or free_dir("out")
        _, records = run(settings, prompts, out, cuda_graph=not args.eager, fast=not args.readable)
    print(f"wrote {len(records)} sample(s), grid.png and samples.json to {out}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError) as e:  # OSError: a missing file, a full disk, --export onto a folder
        sys.exit(f"error: {e}")
