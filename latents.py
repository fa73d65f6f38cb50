"""
Latent spaces: where the diffusion runs. Pixels for the built-in synthetic data (3x32x32, the token geometry of
256px latents), or Stable Diffusion's VAE for real images and videos (Sec. 4.1: 256px -> 32x32x4 latents), its
scaling, channels and downsampling read from the VAE's config. `load_latent_space(spec)` gives either; videos go
through the image codec frame by frame.
"""

import os
import textwrap

import torch
from einops import rearrange


def _fold(fn, x):
    # videos (B, T, C, H, W) go through an image codec frame by frame: fold T into B
    if x.dim() == 5:
        b = x.shape[0]
        y = fn(rearrange(x, "b t c h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b t c h w", b=b)
    return fn(x)


class PixelSpace:
    """Identity 'latent space' for the 3x32x32 synthetic data."""

    spec, channels, downsample = "pixel", 3, 1

    def encode(self, x):
        return x

    def decode(self, z):
        return z


SD_VAE = "stabilityai/sd-vae-ft-ema"  # what --latent-space sd-vae loads


def latent_spec(name):
    """The name that runs and caches record for a latent space: "sd-vae" for SD_VAE under either spelling, so
    that a cache, the checkpoints trained on it and the flags of a later run compare equal."""
    return "sd-vae" if name == SD_VAE else name


def vae_layout(config, name):
    """(scale, shift, channels, downsample) of a diffusers AutoencoderKL from its config, so SD's (0.18215, 4
    channels, /8), SDXL's (0.13025) and 16-channel VAEs (SD3 / FLUX, with a shift) each get their own; a VAE
    whose config does not say them, or that normalises each channel separately, is refused."""
    config = dict(config or {})  # diffusers' FrozenDict, or a plain dict
    scale, channels, blocks = (config.get(k) for k in ("scaling_factor", "latent_channels", "block_out_channels"))
    if not isinstance(scale, (int, float)) or not isinstance(channels, int) or not blocks:
        raise ValueError(f"VAE {name!r} has no scaling_factor, latent_channels and block_out_channels in its config: "
                         "expected a diffusers AutoencoderKL")
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise ValueError(f"VAE {name!r} normalises its latents per channel (latents_mean / latents_std), which "
                         "this latent space does not implement: use a VAE with one scaling_factor")
    # z = (mean - shift) * scale gives latents of ~unit variance; each block after the first halves H and W
    return float(scale), float(config.get("shift_factor") or 0.0), channels, 2 ** (len(blocks) - 1)


class SDVAE:
    """A diffusers AutoencoderKL (optional; Stable Diffusion's by default): 3xHxW in [-1, 1] <-> CxhxW latents
    with the channels, downsampling and scaling its config gives (vae_layout)."""

    def __init__(self, name=SD_VAE, device="cpu", dtype=torch.float32, sample=False, vae=None):
        self.spec, self.device, self.dtype, self.sample = latent_spec(name), torch.device(device), dtype, sample
        if vae is None:
            try:
                from diffusers import AutoencoderKL
            except ImportError:
                raise ImportError("the SD VAE needs `pip install diffusers`") from None
            try:
                vae = AutoencoderKL.from_pretrained(name)
            except Exception as e:  # offline / wrong name: say which model, why (one line) and how to provide it
                cause = textwrap.shorten(f"{type(e).__name__}: {e}", 200)
                hint = ("expected an AutoencoderKL saved with save_pretrained()" if os.path.isdir(name) else
                        "no such folder: if it moved, pass its new path with --latent-space"
                        if os.path.isabs(name) or name.startswith((".", "~")) else
                        f"run once with network access to cache it, or `hf download {name} --local-dir DIR` "
                        "and pass --latent-space DIR")
                raise OSError(f"could not load VAE {name!r} ({cause}); {hint}") from None
        self.scale, self.shift, self.channels, self.downsample = vae_layout(getattr(vae, "config", None), name)
        self.vae = vae.to(self.device, dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, x):
        def enc(x):
            dist = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
            z = dist.sample() if self.sample else dist.mean  # mean: deterministic, cacheable
            return (z.float() - self.shift) * self.scale
        return _fold(enc, x)

    @torch.no_grad()
    def decode(self, z):
        def dec(z):
            z = z.to(self.device, self.dtype) / self.scale + self.shift
            return self.vae.decode(z).sample.float().clamp(-1, 1)
        return _fold(dec, z)


def load_latent_space(spec="pixel", device="cpu", dtype=torch.float32):
    """'pixel' | 'sd-vae' (stabilityai/sd-vae-ft-ema) | any diffusers AutoencoderKL hub name or local folder."""
    if spec == "pixel":
        return PixelSpace()
    return SDVAE(SD_VAE if spec == "sd-vae" else spec, device=device, dtype=dtype)
