"""
The public DiT weights as a starting point (GenTron builds on DiT-XL/2, Sec. 3.2): an official facebookresearch/DiT
checkpoint (`DiT-XL-2-256x256.pt`, a plain state dict of its models.py) -> a GenTron state dict, for
`train_t2i.py --init-from` (checkpoint.load_init).

Copied: the patch embedding (DiT's x_embedder.proj), the timestep MLP, each block's self-attention, MLP and adaLN-zero
modulation, and the final layer. DiT's LayerNorms have no weights; its block norm2 (before the MLP) is our norm3.
Dropped: the class table (text takes the label's place, Sec. 3.2.1) and the learned-sigma half of the output: DiT
predicts eps and a variance, 8 channels per patch pixel in (p, q, c) order; GenTron predicts eps, the first 4.
New, initialised as GenTron.init_weights does: the text projection, the pooled-text MLP and the cross-attention, whose
output projection is zero so that the branch adds 0 (as the temporal layers of T2V, Sec. 3.3.1); QK-norm and
temporal layers where the run has them.

The position table. DiT adds a fixed sin-cos table (saved as pos_embed) whose channels are [sin | cos] of the
column, then [sin | cos] of the row (its get_2d_sincos_pos_embed calls the meshgrid's first plane, the column, "h");
ours (model.sincos_2d, computed in forward) is [cos | sin] of the row, then of the column: the same frequencies and
the same (row-major) token order, with the four channel quarters in reverse order. Instead of giving the first block
an input in another order, the conversion reorders the residual stream's channels in every weight that writes it
(rows) or reads it (columns). Weightless LayerNorm and per-channel modulation commute with that permutation, so the
converted model computes DiT's function exactly, with the time embedding alone as the condition (no class
embedding) and zero pooled text (tests/test_dit_init.py).
"""

import dataclasses
import math
import os

import torch

from model import GenTron, sincos_2d

# A state dict does not store the head count: DiT's size table (models.py) gives it per width; ours has the same
# heads at the widths both tables share (S, B, XL)
DIT_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}
# What DiT was trained on (its train.py): SD-VAE latents, eps prediction; a run from it keeps them by default
DIT_META = {"latent_space": "sd-vae", "prediction": "eps"}


def read_dit(path):
    """The state dict of an official DiT checkpoint (known by its keys, not its name), else None: any other file is
    left to the GenTron readers and their messages."""
    if not path.endswith((".pt", ".pth")) or not os.path.isfile(path):
        return None
    for mmap in (True, False):  # (mmap needs torch's zip format; a file saved by torch < 1.6 reads without it)
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:
            sd = None
    return sd if isinstance(sd, dict) and "x_embedder.proj.weight" in sd else None


def dit_config(sd):
    """The GenTronConfig fields that a DiT state dict fixes (heads where DiT's table gives them)."""
    w = sd["x_embedder.proj.weight"]  # (D, Cin, p, p)
    width, cin, p = w.shape[0], w.shape[1], w.shape[-1]
    config = {"depth": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), "width": width,
              "mlp_width": sd["blocks.0.mlp.fc1.weight"].shape[0], "patch": p, "in_channels": cin,
              "input_size": math.isqrt(sd["pos_embed"].shape[1]) * p}  # pos_embed (1, N, D): the grid it trained on
    if width in DIT_HEADS:
        config["heads"] = DIT_HEADS[width]
    return config


def check_dit(sd, cfg, path):
    """Raise a one-line ValueError unless DiT weights `sd` can start this run's model `cfg`: the same depth, widths,
    patch and latent channels (any resolution: positions are computed in forward)."""
    have, want = dit_config(sd), dataclasses.asdict(cfg)
    diff = [k for k in have if k != "input_size" and have[k] != want[k]]
    if diff:
        raise ValueError(f"--init-from {path} is a DiT of another size: "
                         + ", ".join(f"{k} {have[k]} (this run: {want[k]})" for k in diff))
    out = sd["final_layer.linear.weight"].shape[0] // cfg.patch**2
    if out not in (cfg.in_channels, 2 * cfg.in_channels):  # eps, or eps + sigma (learn_sigma=True)
        raise ValueError(f"--init-from {path}: DiT's output has {out} channels per pixel, not {cfg.in_channels} "
                         f"or {2 * cfg.in_channels}")
    d, grid = cfg.width, math.isqrt(sd["pos_embed"].shape[1])
    if not torch.allclose(sd["pos_embed"][0].float(), sincos_2d(grid, grid, d, "cpu")[:, residual_order(d)], atol=1e-4):
        raise ValueError(f"--init-from {path}: pos_embed is not DiT's fixed sin-cos table; this conversion needs it")


def residual_order(width):
    """Our channel k of the residual stream is DiT's channel order[k]: the four quarters of the position table
    ([cos | sin] row, [cos | sin] column vs. DiT's [sin | cos] column, [sin | cos] row) in reverse order. The
    permutation is its own inverse."""
    q = width // 4
    return torch.cat([torch.arange(i * q, (i + 1) * q) for i in (3, 2, 1, 0)])


def convert_dit(sd, cfg, seed):
    """A DiT state dict -> (GenTron state dict for cfg, its keys copied from DiT). The new layers take
    GenTron(cfg)'s seeded init; check_dit first."""
    torch.manual_seed(seed)
    out = GenTron(cfg).state_dict()  # the new layers' init (init_weights), to be overwritten where DiT has weights
    d, p, cin = cfg.width, cfg.patch, cfg.in_channels
    o = residual_order(d)
    rows = lambda w: w[o]  # writes the residual stream: (D, ...) or bias (D,)
    cols = lambda w: w[:, o]  # reads it: (out, D)
    chunks = lambda w: w.unflatten(0, (-1, d))[:, o].flatten(0, 1)  # adaLN: shift/scale/gate, D channels each
    same = lambda w: w  # the condition c and the attention heads are not the residual stream
    final = sd["final_layer.linear.weight"].shape[0] // p**2  # 8 (learn_sigma) or 4 channels per pixel
    eps = lambda w: w.unflatten(0, (p * p, final))[:, :cin].flatten(0, 1)  # (p q c) layout: keep c < cin
    plan = {"patch_embed.weight": ("x_embedder.proj.weight", rows), "patch_embed.bias": ("x_embedder.proj.bias", rows)}
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        plan[f"t_embedder.mlp.{k}"] = (f"t_embedder.mlp.{k}", same)
    for i in range(cfg.depth):  # the block's layers with weights have DiT's names (its weightless norm2 is our norm3)
        for name, w_map, b_map in [("attn.qkv", cols, same), ("attn.proj", rows, rows), ("mlp.fc1", cols, same),
                                   ("mlp.fc2", rows, rows), ("adaLN_modulation.1", chunks, chunks)]:
            for k, f in ((f"blocks.{i}.{name}.weight", w_map), (f"blocks.{i}.{name}.bias", b_map)):
                plan[k] = (k, f)
    plan["final_layer.adaLN_modulation.1.weight"] = ("final_layer.adaLN_modulation.1.weight", chunks)
    plan["final_layer.adaLN_modulation.1.bias"] = ("final_layer.adaLN_modulation.1.bias", chunks)
    plan["final_layer.linear.weight"] = ("final_layer.linear.weight", lambda w: cols(eps(w)))
    plan["final_layer.linear.bias"] = ("final_layer.linear.bias", eps)
    dropped = {"pos_embed", "y_embedder.embedding_table.weight"}  # computed in forward; no classes
    unknown = sorted(set(sd) - {theirs for theirs, _ in plan.values()} - dropped)
    if unknown:  # a DiT variant this conversion does not know: refuse rather than drop weights silently
        raise ValueError(f"the DiT state dict has {len(unknown)} weights this conversion does not map, "
                         f"e.g. {unknown[0]}")
    for ours, (theirs, f) in plan.items():
        w = f(sd[theirs]).to(out[ours].dtype).contiguous()
        if w.shape != out[ours].shape:
            raise ValueError(f"DiT's {theirs} {tuple(sd[theirs].shape)} does not fit our {ours} "
                             f"{tuple(out[ours].shape)}")
        out[ours] = w
    return out, list(plan)
