"""
What a training run reads (train_t2i.py, train_t2v.py): a dataset encoded online (the frozen text encoder and
latent space each step), a feature cache (cache.py), or random features of the real shapes (`--data bench`);
and the text condition of a batch, with caption dropout to the null caption "" for classifier-free guidance.
The batch order and each step's random draws: fsdp.py.
"""

import dataclasses

import torch
import torch.distributed as dist

import cache
from data import CACHED_KEYS
from latents import load_latent_space
from fsdp import master_process
from text_encoders import compact_caption, load_text_encoder, real_tokens_first


@dataclasses.dataclass
class Data:
    dataset: object  # a map-style dataset; None for "bench"
    spec: str  # what the checkpoint's meta records as the dataset
    text_encoder: str  # text encoder spec
    latent_space: str  # "pixel" | "sd-vae" | a VAE name
    resolution: int  # pixels
    channels: int  # model input (channels, latent_size, latent_size)
    latent_size: int
    text_dim: int
    pooled_dim: int
    text_len: int
    frames: int = None  # clip length for videos
    encoder: object = None  # TextEncoder when captions are encoded on the fly
    latents: object = None  # latent space when images are encoded on the fly (not for cached data)
    null: tuple = None  # (tokens (L, C), mask (L,), pooled (P,)) of "" on the device, real tokens first
    p_motion_free: float = 0.0  # videos: fraction of motion-free pseudo-videos (bench draws its flags with it)


def builtin(spec):
    """Whether a dataset spec names the built-in shapes / moving_shapes data (online, or a cache of it)."""
    return str(spec).split(":")[0] in ("shapes", "moving_shapes")


def online_data(dataset, spec, args, device, frames=None):
    """Captions encoded by the frozen text encoder each step; images by the latent space (pixels: identity)."""
    res = dataset[0]["x"].shape[-1]
    args.text_encoder = args.text_encoder or "tiny-clip+t5"  # the offline toy encoders; full scale: clip+t5
    enc = load_text_encoder(args.text_encoder, device=device)
    if builtin(spec):
        enc.memoize()  # a few thousand distinct captions: encode each once, not every step
    latent = args.latent_space or ("pixel" if builtin(spec) else "sd-vae")
    space = load_latent_space(latent, device=device)
    return Data(dataset, spec, args.text_encoder, space.spec, res, space.channels,
                res // space.downsample, enc.text_dim, enc.pooled_dim, enc.max_length, frames, enc, space)


def cached_data(path, device, frames=None, text_encoder=None):
    """A build_cache directory: latents and text features are read; "" is encoded once for caption dropout, by
    the encoder the cache records, or by `text_encoder` (the same encoder in a moved folder: cache.check_flags)."""
    ds = cache.CachedDataset(path)
    m, item = ds.meta, ds[0]
    text_encoder = text_encoder or m["text_encoder"]
    shapes = (item["text"].shape, item["text_mask"].shape, item["pooled"].shape)
    if master_process():  # only rank 0 loads the text encoder, for the one null caption
        null = [t[0].to(device) for t in load_text_encoder(text_encoder, device=device)([""])]
        null[1] = null[1].to(torch.uint8)
    else:
        null = [torch.empty(s, device=device, dtype=torch.uint8 if i == 1 else torch.float32) for i, s in enumerate(shapes)]
    for t in null:
        dist.broadcast(t, src=0)
    mask = null[1].bool()
    first = real_tokens_first(mask)  # the batches' captions come real tokens first (data.collate)
    null = (null[0][first], mask[first], null[2])
    return Data(ds, m["dataset"], text_encoder, m["latent_space"], m["resolution"], m["latent_channels"],
                item["x"].shape[-1], m["text_dim"], m["pooled_dim"], shapes[0][0], m["num_frames"] or frames, null=null)


def bench_data(args, device, frames=None, p_motion_free=0.0):
    """Random SD-VAE latents and CLIP+T5-shaped text features (120 tokens): no encoders, no files."""
    res, C = args.resolution or 256, 768 + 4096
    null = (torch.zeros(120, C, device=device), torch.ones(120, dtype=torch.bool, device=device),
            torch.zeros(768, device=device))
    return Data(None, "bench", "clip+t5", "sd-vae", res, 4, res // 8, C, 768, 120, frames, null=null,
                p_motion_free=p_motion_free)


def bench_batches(data, micro, device, seed):
    """The same random micro-batch every step, generated on the device (data loading is not timed)."""
    g = torch.Generator(device).manual_seed(seed)
    shape = (micro, *([data.frames] if data.frames else []), data.channels, data.latent_size, data.latent_size)
    batch = {"x": torch.randn(shape, generator=g, device=device), "caption": [""] * micro,
             "text": torch.randn(micro, data.text_len, data.text_dim, generator=g, device=device),
             "text_mask": torch.ones(micro, data.text_len, dtype=torch.bool, device=device),
             "pooled": torch.randn(micro, data.pooled_dim, generator=g, device=device)}
    if data.frames:
        batch["motion_free"] = torch.rand(micro, generator=g, device=device) < data.p_motion_free
    while True:
        yield batch


def text_condition(batch, drop, data, device):
    """{text, text_mask, pooled} for the model; a dropped caption becomes the null caption "" (CFG)."""
    if "text" in batch:  # cached or bench features: swap in the features of "", cut to the batch's positions
        # (data.collate keeps only those its captions need); pinned by the loader, so the host does not wait
        tokens, mask, pooled, d = (v.to(device, non_blocking=True) for v in (*(batch[k] for k in CACHED_KEYS), drop))
        n = tokens.shape[1]
        tokens = torch.where(d[:, None, None], data.null[0][:n], tokens.float())
        mask = torch.where(d[:, None], data.null[1][:n], mask.bool())
        pooled = torch.where(d[:, None], data.null[2], pooled.float())
    else:  # encoded now, then cut the same way (its one host sync: the encoder's own check of the masks has one)
        tokens, mask, pooled = data.encoder(["" if x else c for c, x in zip(batch["caption"], drop.tolist())])
        tokens, mask = compact_caption(tokens, mask)
    return {"text": tokens, "text_mask": mask, "pooled": pooled}
