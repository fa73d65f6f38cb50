"""
Sample images and videos from a trained GenTron (DDPM / DDIM / DPM-Solver++ with classifier-free
guidance; for video, motion-free guidance, paper Sec. 3.3.2, Eq. 6).

    python sample.py "a red circle to the left of a blue square"       # the bundled toy T2I model
    python sample.py --video "a cyan square moving right"               # the bundled toy T2V model (GIF)
    python sample.py --ckpt runs/t2i "a panda" --sampler ddim --steps 50 --cfg 7.5 --n-per-prompt 4
    python sample.py --from-json out/samples.json --index 3             # regenerate sample 3 exactly
    python sample.py --ckpt runs/t2i --export assets/gentron_t2i.safetensors   # EMA weights for release

--ckpt takes a run directory (its newest ckpt-*.pt), a ckpt-*.pt file, or a .safetensors export. The model
is rebuilt from the checkpoint's stored config alone; the text encoder and latent space are the ones its
meta names. Outputs: one PNG per image at native resolution (exact pixels) and a grid.png upscaled for
viewing; per video a GIF and, with imageio-ffmpeg, an MP4 (both upscaled) and a native-resolution frame
strip PNG; and samples.json with every setting, the prompt and seed of each sample.
"""

import argparse
import json
import math
import os
import re
import sys

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from tqdm.auto import tqdm

from checkpoint import DTYPES, build_config, export, free_name, read_checkpoint, resolve_checkpoint, write_json
from data import load_latent_space
from diffusion import SAMPLERS, Diffusion, guided_eps_fn, sample
from fastpath.sampling import autocast, cast_matmul_weights, sampling_step
from model import GenTron
from text_encoders import load_text_encoder

ROOT = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {"t2i": os.path.join("assets", "gentron_t2i.safetensors"),  # relative to the repo root
           "t2v": os.path.join("assets", "gentron_t2v.safetensors")}
FPS = 4  # paper Sec. 4.1: clips are 8 frames sampled at 4 fps

# -----------------------------------------------------------------------------
# models: a checkpoint (checkpoint.py) or the bundled one, with its text encoder and latent space


def bundled_path(kind):
    """The bundled model of a kind, or a one-line error that says how to get one."""
    path = os.path.join(ROOT, BUNDLED[kind])
    if not os.path.isfile(path):
        script = "train_t2i.py" if kind == "t2i" else "train_t2v.py"
        raise FileNotFoundError(
            f"bundled model {BUNDLED[kind]} is missing: restore it with `git checkout -- {BUNDLED[kind]}`, or train "
            f"one with `python {script}` and pass --ckpt RUN_DIR (export it with --export {BUNDLED[kind]})")
    return path


def check_mode(temporal, video, source="this model"):
    """A video request needs temporal layers (Sec. 3.3.1). Images from a T2V model are allowed: one frame
    through temporal attention attends only to itself, which is exactly the motion-free path (Sec. 3.3.2)."""
    if video and not temporal:
        raise ValueError(f"{source} is a text-to-image checkpoint (no temporal layers): video needs a T2V "
                         f"checkpoint (train_t2v.py) or the bundled {BUNDLED['t2v']}")


_ENCODERS = {}  # (spec, device) -> frozen TextEncoder: loaded once per process, shared by every model


def text_encoder(spec, device):
    key = (spec, str(device))
    if key not in _ENCODERS:
        _ENCODERS[key] = load_text_encoder(spec, device=device)
    return _ENCODERS[key]


def load_model(path=None, ema=True, device="cpu", video=None):
    """Load a GenTron for sampling -> (model in eval mode, meta).

    path: run dir, .pt or .safetensors; None = the bundled model (T2V if video else T2I). meta is the
    checkpoint's meta (kind, text_encoder, latent_space, resolution, num_frames, dataset) plus "config",
    "step", "ckpt" (the file read) and the loaded frozen parts that generate() uses: "encoder" (a
    text_encoders.TextEncoder) and "latent" (a data.py latent space). On CUDA the Linear and Conv weights
    are stored in bf16 (fastpath.sampling.cast_matmul_weights): run the model under bf16 autocast, as generate() does."""
    file = resolve_checkpoint(path) if path else bundled_path("t2v" if video else "t2i")
    state, config, meta, step = read_checkpoint(file, ema)
    meta = {**meta, "config": config, "step": step, "ckpt": os.path.abspath(file), "ema": ema}
    check_mode(config.get("temporal", False), video, file)
    with torch.device("meta"):  # no init work or memory for weights that are overwritten anyway
        model = GenTron(build_config(config, file))
    state = {k: v.float() for k, v in state.items()}  # exports may be fp16/bf16; fp32 on the CPU
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{file}: weights do not match its config ({len(missing)} missing, e.g. "
                         f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    model = model.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":  # generate() runs it under bf16 autocast, which computes these in bf16
        cast_matmul_weights(model, torch.bfloat16)
    meta["encoder"] = text_encoder(meta["text_encoder"], device)
    meta["latent"] = load_latent_space(meta["latent_space"], device=device)
    enc, cfg = meta["encoder"], model.cfg
    if (enc.text_dim, enc.pooled_dim) != (cfg.text_dim, cfg.pooled_dim):
        raise ValueError(f"{file}: text encoder {meta['text_encoder']!r} gives {enc.text_dim}/{enc.pooled_dim} "
                         f"channels but the model expects text_dim={cfg.text_dim}, pooled_dim={cfg.pooled_dim}")
    return model, meta


# -----------------------------------------------------------------------------
# sampling


def sample_seed(seed, index):
    """Noise seed of sample `index` of a run with base `seed`: a hash, so runs with nearby seeds share nothing,
    and a function of the index alone, so a sample's starting noise never depends on batching."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def to_uint8(x):
    """[-1, 1] floats (..., C, H, W) -> uint8 (..., H, W, C)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "... c h w -> ... h w c")


@torch.no_grad()
def generate(model, meta, prompts, *, seed=0, sampler="dpm++2m", steps=25, cfg=7.5, mfg=1.2, frames=None,
             video=None, device=None, batch_size=16, first_index=0, progress=True, cuda_graph=True):
    """Prompts -> uint8 CPU tensor (B, H, W, 3), or (B, T, H, W, 3) for video.

    video=None follows the model (temporal layers -> clips of `frames` or meta["num_frames"] frames). Sample i
    starts from noise drawn with sample_seed(seed, first_index + i). DDPM's per-step noise comes from one
    generator per batch, so DDPM samples repeat exactly only with the same batch_size (samples.json records
    it). On CUDA each step's forward pass replays a CUDA graph (fastpath.sampling.CUDAGraphStep; cuda_graph=False: eager), with
    the same outputs. meta needs the loaded "encoder" and "latent" (as load_model returns them) or their specs
    "text_encoder" and "latent_space" (as a checkpoint's meta holds them)."""
    video = model.cfg.temporal if video is None else video
    check_mode(model.cfg.temporal, video, meta.get("ckpt", "this model"))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    enc = meta.get("encoder") or text_encoder(meta["text_encoder"], device)
    latent = meta.get("latent") or load_latent_space(meta["latent_space"], device=device)
    c = model.cfg
    shape = (c.in_channels, c.input_size, c.input_size)  # latent of one frame
    if video:
        shape = (frames or meta.get("num_frames") or c.num_frames, *shape)  # (T, C, h, w)
    diffusion = Diffusion(prediction=meta.get("prediction", "eps"))  # checkpoints before v-prediction: eps
    null = [t.to(device) for t in enc([""])]  # the empty caption: the unconditional branch of CFG / MFG

    # bf16 autocast on CUDA; guidance arithmetic and the sampler stay in fp32
    step = sampling_step(model, device, cuda_graph)

    def forward(x, t, context, motion_free=None):  # the captions come as context (encode)
        return step(x, t, context, motion_free).float()

    def encode(**caption):  # the captions' share of every step, computed once per batch (GenTron.encode_text)
        with autocast(device):
            return model.encode_text(**caption)

    net = diffusion.eps_fn(forward)  # v-prediction -> eps; guidance (CFG / MFG) combines eps

    out = []
    starts = range(0, len(prompts), batch_size)
    for b0 in tqdm(starts, desc="batches", disable=not progress or len(starts) == 1):
        batch = list(prompts[b0 : b0 + batch_size])
        n = len(batch)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(seed, first_index + b0 + i)))
                 for i in range(n)]  # drawn on the CPU: the same starting noise on every device
        x = torch.stack(noise).to(device)  # (B, [T,] C, h, w)
        tokens, mask, pooled = (t.to(device) for t in enc(batch))
        cond = dict(text=tokens, text_mask=mask, pooled=pooled)
        uncond = dict(text=null[0].expand(n, -1, -1), text_mask=null[1].expand(n, -1), pooled=null[2].expand(n, -1))
        # Eq. 6 with lambda_T = cfg, lambda_M = mfg; mfg = 1 reduces Eq. 6 to plain CFG (one pass cheaper)
        eps_fn = guided_eps_fn(net, cond, uncond, cfg, mfg if video and mfg != 1.0 else None, encode)
        gen = torch.Generator(device).manual_seed(sample_seed(seed, first_index + b0) + 1)  # DDPM / DDIM(eta>0) noise
        # pixel-space data live in [-1, 1]: clip each step's x_0 estimate (diffusion.clip_denoised)
        z = sample(eps_fn, diffusion, x, sampler, steps, generator=gen, progress=progress, clip=latent.spec == "pixel")
        out.append(to_uint8(latent.decode(z.float())).cpu())
    return torch.cat(out)


# -----------------------------------------------------------------------------
# writing outputs


def slug(prompt, n=48):
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:n] or "empty"


def upscale(img, min_side=128):
    """Nearest-neighbour upscale (H, W, 3) so the short side is >= min_side: 32 px toy samples -> 128 px."""
    k = max(1, math.ceil(min_side / min(img.shape[:2])))
    return img.repeat(k, axis=0).repeat(k, axis=1)


def make_grid(tiles, cols, pad=2):
    """List of equal-size (H, W, 3) uint8 arrays -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) grid on grey."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = t
    return grid


def grid_image(samples, cols):
    """(n, H, W, 3) images or (n, T, H, W, 3) clips, uint8 -> one upscaled grid; a clip is a row of its frames."""
    tiles = [np.concatenate(list(x), axis=1) if x.ndim == 4 else x for x in samples]  # clip: (H, T W, 3)
    return make_grid([upscale(t) for t in tiles], cols if samples.ndim == 4 else 1)


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


def check_settings(s, out_dir, flags=None):
    """A one-line error for each setting (flags or a samples.json's) that would fail, before any work is done.
    flags: the command-line name of a setting where it is not --key (e.g. {"out": "--json"})."""
    flag = lambda key: (flags or {}).get(key, "--" + key.replace("_", "-"))
    for key in ("batch_size", "n_per_prompt", "frames"):
        if s.get(key) is not None and s[key] < 1:
            raise ValueError(f"{flag(key)} must be >= 1, got {s[key]}")
    last = Diffusion().num_steps
    if s.get("steps") is not None and not 1 <= s["steps"] <= last:
        raise ValueError(f"{flag('steps')} must be in [1, {last}], got {s['steps']}")
    if s["seed"] < 0:
        raise ValueError(f"{flag('seed')} must be >= 0, got {s['seed']}")
    for key in ("cfg", "mfg"):
        if not math.isfinite(s[key]):
            raise ValueError(f"{flag(key)} must be a finite number, got {s[key]}")
    try:
        device = torch.device(s["device"])
    except RuntimeError:
        raise ValueError(f"{flag('device')} {s['device']!r} is not a device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"{flag('device')} {s['device']}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                         "(a run recorded on a GPU can be redone with --device cpu, though not bit for bit)")
    folder = out_dir  # it or the nearest folder above it that exists must be a folder we can write into
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if folder and not os.path.isdir(folder):
        raise ValueError(f"{flag('out')} {out_dir}: {folder} is a file, not a folder")
    if not os.access(folder or ".", os.W_OK):
        raise ValueError(f"{flag('out')} {out_dir}: {folder or '.'} is not writable")


def run(settings, prompts, out_dir, only=None, progress=True, cuda_graph=True):
    """Generate samples for a flat prompt list (index i = position) with `settings`, write them and
    samples.json. only = a list of indices to write (the batches that hold them are regenerated).
    cuda_graph: as generate's (the samples are the same either way, so samples.json does not record it)."""
    s = settings
    check_settings(s, out_dir)
    model, meta = load_model(s["ckpt"], ema=s["ema"], device=s["device"], video=s["video"])
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
    save_samples(samples, records, out_dir, cols)
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
    p.add_argument("--ckpt", help="run dir, ckpt-*.pt or .safetensors (default: the bundled model)")
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
    p.add_argument("--out", default=None, help="output folder (default: out, or out-2, out-3, ... where out holds "
                   "an earlier run); a folder that holds an earlier run's samples.json is refused")
    p.add_argument("--eager", action="store_true", help="CUDA: launch each step's kernels from Python instead of "
                   "replaying a CUDA graph (the same samples, slower; for a model changed to sync with the host)")
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
        out = args.out or free_dir(os.path.join(os.path.dirname(args.from_json) or ".", "from_json"))
        _, records = run(settings, prompts, out, only=args.index, cuda_graph=not args.eager)
    else:
        settings = dict(ckpt=args.ckpt, ema=not args.no_ema, video=args.video, sampler=args.sampler,
                        steps=args.steps, cfg=args.cfg, mfg=args.mfg, seed=args.seed, frames=args.frames,
                        n_per_prompt=args.n_per_prompt, batch_size=args.batch_size,
                        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        prompts = [q for q in read_prompts(args) for _ in range(args.n_per_prompt)]
        out = args.out or free_dir("out")
        _, records = run(settings, prompts, out, cuda_graph=not args.eager)
    print(f"wrote {len(records)} sample(s), grid.png and samples.json to {out}")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError) as e:  # OSError: a missing file, a full disk, --export onto a folder
        sys.exit(f"error: {e}")
