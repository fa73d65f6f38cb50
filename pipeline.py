"""
The sampling runtime: load a GenTron checkpoint (or a bundled model) with its text encoder and latent space,
and generate images or videos from prompts with classifier-free guidance (for video, motion-free guidance,
paper Sec. 3.3.2, Eq. 6). sample.py is its command line; evaluate.py and the end of a training run call it too.
"""

import dataclasses
import math
import os
import warnings

import numpy as np
import torch
from einops import rearrange
from tqdm.auto import tqdm

from checkpoint import build_config, checkpoints, is_run_dir, newest_good, read_checkpoint, resolve_checkpoint
from latents import latent_spec, load_latent_space
from diffusion import Diffusion, guided_eps_fn, sample
import fastpath
from fastpath.blocks import FusedGenTron
from fastpath.sampling import autocast, cast_matmul_weights, sampling_step
from model import GenTron
from text_encoders import load_text_encoder

ROOT = os.path.dirname(os.path.abspath(__file__))
BUNDLED = {"t2i": os.path.join("assets", "gentron_t2i.safetensors"),  # relative to the repo root
           "t2v": os.path.join("assets", "gentron_t2v.safetensors")}

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


def _text_encoder(spec, device):
    key = (spec, str(device))
    if key not in _ENCODERS:
        _ENCODERS[key] = load_text_encoder(spec, device=device)
    return _ENCODERS[key]


def check_parts(config, resolution, encoder, latent, source="this model"):
    """A text encoder and latent space for a model (its own, or --text-encoder / --latent-space given after the
    folders moved) must have the shapes it was trained with: text_dim / pooled_dim, and latent channels and
    downsampling (resolution / input_size). config: the model's config as a dict; latent None: not checked."""
    if (encoder.text_dim, encoder.pooled_dim) != (config["text_dim"], config["pooled_dim"]):
        raise ValueError(f"{source}: text encoder {encoder.spec!r} gives text_dim={encoder.text_dim}, pooled_dim="
                         f"{encoder.pooled_dim}; the model was trained with text_dim={config['text_dim']}, "
                         f"pooled_dim={config['pooled_dim']}")
    if latent is None:
        return
    down = resolution // config["input_size"] if resolution else latent.downsample  # unrecorded: not checked
    if (latent.channels, latent.downsample) != (config["in_channels"], down):
        raise ValueError(f"{source}: latent space {latent.spec!r} gives {latent.channels} channels at 1/"
                         f"{latent.downsample} size; the model was trained on {config['in_channels']} at 1/{down}")


def load_model(path=None, ema=True, device="cpu", video=None, fast=True, text_encoder=None, latent_space=None):
    """Load a GenTron for sampling -> (model in eval mode, meta).

    path: run dir, checkpoint or .safetensors; None = the bundled model (T2V if video else T2I). meta is the
    checkpoint's meta (kind, text_encoder, latent_space, resolution, num_frames, dataset) plus "config",
    "step", "ckpt" (the file read) and the loaded frozen parts that generate() uses: "encoder" (a
    text_encoders.TextEncoder) and "latent" (a data.py latent space). text_encoder, latent_space: specs that
    replace the recorded ones (a moved model folder), checked against the model's shapes (check_parts); meta
    then records them. fast: with fastpath's fused forwards (the same math; False: model.py's as written), and
    on CUDA with the Linear and Conv weights stored in bf16 (fastpath.sampling.cast_matmul_weights): run the
    model under bf16 autocast, as generate() does."""
    file = resolve_checkpoint(path) if path else bundled_path("t2v" if video else "t2i")
    ckpt = None
    if path and is_run_dir(path):  # a run folder: its newest checkpoint that verifies (as --resume takes)
        file, ckpt = newest_good(checkpoints(path), flag="--ckpt")
    state, config, meta, step = read_checkpoint(file, ema, ckpt)
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
    if fast:
        fastpath.speed_up(model)
        if torch.device(device).type == "cuda":  # generate() runs it under bf16 autocast, which computes these in bf16
            cast_matmul_weights(model, torch.bfloat16)
    meta["text_encoder"] = text_encoder or meta["text_encoder"]
    meta["latent_space"] = latent_spec(latent_space) if latent_space else meta["latent_space"]
    meta["encoder"] = _text_encoder(meta["text_encoder"], device)
    meta["latent"] = load_latent_space(meta["latent_space"], device=device)
    check_parts(dataclasses.asdict(model.cfg), meta.get("resolution"), meta["encoder"], meta["latent"], file)
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
    it). A model with fastpath's forwards (load_model's default) encodes each batch's captions once, and on CUDA
    replays each step's forward pass as a CUDA graph (fastpath.sampling.CUDAGraphStep; cuda_graph=False: eager),
    with the same outputs. meta needs the loaded "encoder" and "latent" (as load_model returns them) or their specs
    "text_encoder" and "latent_space" (as a checkpoint's meta holds them)."""
    for name, scale in (("cfg", cfg), ("mfg", mfg)):  # the CLIs refuse bad scales earlier (check_settings)
        check_guidance(scale, name, warn=True)
    video = model.cfg.temporal if video is None else video
    check_mode(model.cfg.temporal, video, meta.get("ckpt", "this model"))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    enc = meta.get("encoder") or _text_encoder(meta["text_encoder"], device)
    latent = meta.get("latent") or load_latent_space(meta["latent_space"], device=device)
    c = model.cfg
    shape = (c.in_channels, c.input_size, c.input_size)  # latent of one frame
    if video:
        shape = (frames or meta.get("num_frames") or c.num_frames, *shape)  # (T, C, h, w)
    diffusion = Diffusion(prediction=meta.get("prediction", "eps"))  # checkpoints before v-prediction: eps
    enc.check_prompts(prompts)  # one warning line for unknown words, one for prompts cut at the token limit
    null = [t.to(device) for t in enc([""])]  # the empty caption: the unconditional branch of CFG / MFG

    # bf16 autocast on CUDA; guidance arithmetic and the sampler stay in fp32
    if isinstance(model, FusedGenTron):
        step = sampling_step(model, device, cuda_graph)

        def forward(x, t, context, motion_free=None):  # the captions come as context (encode)
            return step(x, t, context, motion_free).float()

        def encode(**caption):  # the captions' share of every step, computed once per batch
            with autocast(device):
                return model.encode_text(**caption)
    else:  # model.py as written: the whole forward pass at every step
        def forward(x, t, **caption):
            with autocast(device):
                return model(x, t, **caption).float()

        encode = None

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
# grids and settings (sample.py writes its outputs with these; training's final grid and evaluate.py use them)


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


# Guidance scales. The paper samples at lambda_T = 7.5 and lambda_M = 1.2 (Sec. 3.3.2); common practice stays
# within ~1-15. Eq. 6 extrapolates eps by the scale: by ~20 samples saturate, and at 100 and beyond the step's
# eps is so far off that the sample is noise, returned as success. So: refuse |scale| > 100 (or non-finite) as a
# typo, warn above 20. Negative and small scales stay allowed: guiding away from a prompt is a real use.
MAX_GUIDANCE, WARN_GUIDANCE = 100.0, 20.0


def check_guidance(scale, name="cfg", warn=False):
    """A one-line error for a non-finite or |scale| > MAX_GUIDANCE guidance scale; warn: a warning above WARN_GUIDANCE."""
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite number, got {scale}")
    if abs(scale) > MAX_GUIDANCE:
        raise ValueError(f"{name} must be in [-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}], got {scale:g} (beyond it the "
                         "samples are noise; the paper samples at 7.5 for text, 1.2 for motion)")
    if warn and abs(scale) > WARN_GUIDANCE:
        warnings.warn(f"{name} {scale:g} is far outside the usual 1-15: expect saturated, broken samples", stacklevel=3)


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
        check_guidance(s[key], flag(key))
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
