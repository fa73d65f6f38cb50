"""
GenTron: a diffusion transformer for text-to-image and text-to-video generation
(Chen et al., "Diffusion Transformers for Image and Video Generation", CVPR 2024).

Built on DiT (Peebles & Xie): patchify -> transformer blocks -> linear decoder. GenTron changes
two things (Sec. 3.2.1, Fig. 2): text replaces the class label, either through adaLN-zero alone
(`conditioning="adaln"`, Fig. 2a) or through cross-attention with adaLN kept for time + pooled
text (`conditioning="cross_attn"`, Fig. 2b); and a temporal self-attention layer in every block
turns the image model into a video model (Sec. 3.3.1, Fig. 3, Eq. 3-5).

Shape legend
    B  batch (images, or video clips)     T  frames per clip (1 for images)
    N  image tokens per frame = (H/p)(W/p) D  model width
    L  text tokens                        C  text feature channels   P  pooled text channels
    h  heads                              Dh head width = D / h      p  patch size
Layout: an image batch is x (B, Cin, H, W); a video batch is x (B, T, Cin, H, W), frames inside a
clip. Inside the network every frame is an image: tokens are (B T, N, D), and only the temporal
attention regroups them to (B N, T, D) (Eq. 3-5).
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

from data import compact_caption  # temporary

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

try:
    from fastpath import kernels  # fused Triton kernels; Triton comes with CUDA builds of PyTorch
except ImportError:
    kernels = None

# -----------------------------------------------------------------------------
# Config and the size table (Table 1)


@dataclass
class GenTronConfig:
    depth: int = 28
    width: int = 1152
    mlp_width: int = 4608
    heads: int = 16
    patch: int = 2
    in_channels: int = 4  # SD-VAE latents; 3 for the pixel-space synthetic data
    input_size: int = 32  # latent side: 256px images -> 32x32x4 latents (Sec. 3.2)
    conditioning: str = "cross_attn"  # "cross_attn" (Fig. 2b) or "adaln" (Fig. 2a)
    text_dim: int = 768 + 4096  # CLIP-L + Flan-T5-XXL token channels (text_encoders.py)
    pooled_dim: int = 768  # CLIP-L projected EOS embedding
    pooled_text: bool = True  # Sec. 3.2.1: add pooled text to the time embedding
    temporal: bool = False  # Sec. 3.3.1: TempSelfAttn in every block (T2V)
    num_frames: int = 8  # Sec. 4.1: 8-frame clips
    # Not in the paper (off by default): RMSNorm on each head's queries and keys (QK-norm, Dehghani et al.
    # 2023), which bounds the attention logits. Without it the toy models' self-attention logits grew from
    # ~40 to ~10^4 over a long run and training diverged (README, "Bundled models").
    qk_norm: bool = False

    def __post_init__(self):
        if self.conditioning not in ("cross_attn", "adaln"):
            raise ValueError(f"conditioning must be 'cross_attn' or 'adaln', got {self.conditioning!r}")
        if self.conditioning == "adaln" and not self.pooled_text:
            raise ValueError("conditioning='adaln' needs pooled_text=True: the pooled text is its only text input")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of even width")
        if self.width % 4:  # sincos_2d: half the channels for the row, half for the column, each [cos | sin]
            raise ValueError(f"width {self.width} must be a multiple of 4 (the 2D sin-cos patch positions)")


# Parameter counts (cross_attn, CLIP+T5 text, image model; `count_params` / `param_formula`):
SIZES = {
    "tiny": dict(depth=2, width=64, mlp_width=256, heads=4),  # tests only
    "toy": dict(depth=8, width=128, mlp_width=512, heads=4),  # bundled models, CPU quick start
    "S": dict(depth=12, width=384, mlp_width=1536, heads=6),  # toy runs (DiT-S widths)
    "B": dict(depth=12, width=768, mlp_width=3072, heads=12),  # DiT-B widths
    "XL": dict(depth=28, width=1152, mlp_width=4608, heads=16),  # GenTron-XL/2 (Table 1: 930.0M; here 830.3M, README)
    "G": dict(depth=48, width=1664, mlp_width=6656, heads=16),  # GenTron-G/2 (Table 1: 3083.8M; here 2946.6M)
}


def make_config(size="XL", **overrides):
    """The row `size` of the size table, with any field overridden (e.g. temporal=True)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    return GenTronConfig(**{**SIZES[size], **overrides})


# -----------------------------------------------------------------------------
# Fixed sin-cos embeddings, computed in forward (nothing to initialise; safe on the meta device)


def sincos_1d(pos, dim):
    """Transformer sinusoids of positions pos (...,) -> (..., dim): [cos | sin], as DiT's timestep embedding (its
    position table is [sin | cos], column first: a fixed layout either way, ours for every fixed embedding)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=pos.device) / (dim // 2))
    angles = pos.float()[..., None] * freqs  # (..., dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def sincos_2d(gh, gw, dim, device):
    """2D patch position table (gh*gw, dim): half the channels encode the row, half the column."""
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    return torch.cat([sincos_1d(ys.flatten(), dim // 2), sincos_1d(xs.flatten(), dim // 2)], dim=-1)


def modulate(x, shift, scale):
    # adaLN (DiT): a per-sample affine after a parameter-free LayerNorm. x (B, N, D), shift/scale (B, 1, D)
    return x * (1 + scale) + shift


def add_norm(x, branch, gate, norm, shift=None, scale=None, offset=None, branch_frames=0, h_frames=0):
    """One sub-layer's residual update and the next sub-layer's input, (r, h):
        r = x + gate * branch   (gate None: x + branch; branch None: r = x)
        h = modulate(norm(r), shift, scale), or norm(r) [+ offset] for an affine LayerNorm (shift None)
    x, r (S, N, D); shift, scale, offset: (S, 1, D), one row per group of tokens (image or frame). branch_frames=T:
    the branch comes as (B N, T, D), h_frames=T: h goes as (B N, T, D), each patch position's T frames together
    (the temporal layer's layout, Eq. 3 and 5), so that no pass of its own regroups them. On CUDA one fused Triton
    kernel does it all, forward and backward (kernels.py); this is its math."""
    if kernels is not None and kernels.usable(x):
        a, c = (1 + scale, shift) if shift is not None else (norm.weight, norm.bias)
        c = c if offset is None else c + offset
        return kernels.add_norm(x, branch, gate, a, c, norm.eps, branch_frames, h_frames)
    if branch_frames and branch is not None:
        branch = rearrange(branch, "(b n) t d -> (b t) n d", t=branch_frames, n=x.shape[1])  # Eq. 5
    r = residual(x, branch, gate)
    if shift is not None:
        h = modulate(norm(r), shift, scale)
    else:
        h = norm(r) if offset is None else norm(r) + offset
    return r, rearrange(h, "(b t) n d -> (b n) t d", t=h_frames) if h_frames else h  # Eq. 3


def residual(x, branch, gate):
    """x + gate * branch (gate None: x + branch; branch None: x), a sub-layer's residual update."""
    return x if branch is None else x + (branch if gate is None else gate * branch)


# -----------------------------------------------------------------------------
# Layers, bottom-up: attention, cross-attention, temporal attention, MLP, embedders


def qk_norms(dim, heads, on):
    """(query norm, key norm) over each head's Dh channels when `on` (GenTronConfig.qk_norm), else identities."""
    make = lambda: nn.RMSNorm(dim // heads, eps=1e-6) if on else nn.Identity()
    return make(), make()


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection and PyTorch SDPA (flash when unmasked)."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = qk_norms(dim, heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def heads_qkv(self, x):
        """x (B, N, D) -> q, k, v (B, h, N, Dh), q and k normalised when QK-norm is on."""
        q, k, v = rearrange(self.qkv(x), "b n (three h dh) -> three b h n dh", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x, mask=None):
        x = F.scaled_dot_product_attention(*self.heads_qkv(x), attn_mask=mask)  # (B, h, N, Dh)
        return self.proj(rearrange(x, "b h n dh -> b n (h dh)"))


class CrossAttention(nn.Module):
    """Image tokens are queries, text tokens keys and values (Sec. 3.2.1, Fig. 2b)."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm, self.k_norm = qk_norms(dim, heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, text):
        """text (B, L, D) -> k, v (B, h, L, Dh), k normalised when QK-norm is on. They depend on the caption alone,
        so a sampler computes them once for all its steps (GenTron.encode_text)."""
        k, v = rearrange(self.kv(text), "b l (two h dh) -> two b h l dh", two=2, h=self.heads)
        return self.k_norm(k), v

    def heads_qkv(self, x, text, text_mask, kv=None):
        """x (B T, N, D), text (B, L, D) or its kv = keys_values(text), text_mask (B, L) -> q (B, h, T N, Dh),
        k, v (B, h, L, Dh) and the key mask (B, 1, 1, L) or None. The T frames of a clip share its caption: their
        tokens form one query sequence of T N against the caption's keys and values, which are neither projected
        nor copied per frame. Each query attends on its own, so this is the attention of every frame alone."""
        k, v = kv if kv is not None else self.keys_values(text)
        q = self.q_norm(rearrange(self.q(x), "(b t) n (h dh) -> b h (t n) dh", b=k.shape[0], h=self.heads))
        return q, k, v, None if text_mask is None else text_mask[:, None, None, :]

    def forward(self, x, text, text_mask, kv=None):
        out = F.scaled_dot_product_attention(*self.heads_qkv(x, text, text_mask, kv))  # (B, h, T N, Dh)
        return self.proj(rearrange(out, "b h (t n) dh -> (b t) n (h dh)", n=x.shape[1]))


class TemporalAttention(nn.Module):
    """TempSelfAttn (Sec. 3.3.1, Eq. 3-5): each patch position attends across the T frames of its clip."""

    tile = 128  # query rows per tile of the fused attention kernels (flash, cuDNN); see pack_size

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)  # attn.proj is zero-initialised: identity at the start of T2V

    def positions(self, frames, motion_free, x):
        """The offset added to the normed frames (add_norm): (B T, 1, D), or None for one frame. Not in Eq. 4: a
        sin-cos frame position, so that the attention knows the frames' order. A motion-free clip gets none
        (Sec. 3.3.2): its frames see only themselves, and with a position each would still get its own
        frame-dependent offset, so temporal modelling would not be off. One frame: nothing to order."""
        if frames == 1:
            return None
        pos = sincos_1d(torch.arange(frames, device=x.device), x.shape[-1]).to(x.dtype)  # (T, D)
        pos = pos.repeat(x.shape[0] // frames, 1)  # (B T, D): frame t of every clip
        if motion_free is not None:
            pos = pos * (~motion_free).repeat_interleave(frames)[:, None].to(x.dtype)  # zero for motion-free clips
        return pos[:, None]  # (B T, 1, D)

    def forward(self, h, frames, motion_free=None):
        """h (B N, T, D): each patch position's T frames (Eq. 3), normed, with their positions (the block's add_norm,
        Eq. 4's LN) -> the attention's output in the same layout; the block's next add_norm adds it to the residual
        stream (Eq. 4), back in the frames' layout (Eq. 5)."""
        d = h.shape[-1]
        # The (B N) sequences are only T = 8 frames long; a fused kernel would spend a whole tile of `tile`
        # rows on each. So `pack` consecutive sequences run as one of pack * T tokens, with a block-diagonal
        # mask keeping each frame inside its own sequence: the same attention, ~6x faster when sampling T2V XL/2
        # (README, "Throughput and MFU"). Packing is a reshape: the sequences are contiguous in (B N, T, D).
        pack = self.pack_size(h.shape[0], frames)
        i = torch.arange(pack * frames, device=h.device)
        mask = (i[:, None] // frames) == (i[None, :] // frames)  # (pack T, pack T): same sequence
        if motion_free is not None:
            # Sec. 3.3.2, Fig. 3: a motion-free clip attends with the identity, so every frame sees only itself
            # and temporal modelling is off for that sample. -> (B N / pack, 1, pack T, pack T)
            free = motion_free.repeat_interleave(h.shape[0] // len(motion_free) * frames)  # each query's clip
            free = free.view(-1, pack * frames, 1)
            mask = (mask & ((i[:, None] == i[None, :]) | ~free))[:, None]
        elif pack == 1:
            mask = None  # nothing to mask: the flash kernel
        return self.attn(h.reshape(-1, pack * frames, d), mask).view(-1, frames, d)  # Eq. 4's TempSelfAttn

    def pack_size(self, sequences, frames):
        """The most sequences (at most tile // frames) that divide `sequences` evenly, 1 for long clips."""
        return max(p for p in range(1, max(1, self.tile // frames) + 1) if sequences % p == 0)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        if x.is_cuda and not torch.is_grad_enabled():  # sampling on a GPU: the same math, fused
            return self.fc2(linear_gelu(x, self.fc1))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # DiT's tanh-GELU


def linear_gelu(x, linear):
    """gelu_tanh(linear(x)) with the GELU in the GEMM's epilogue (cuBLASLt), so the (..., 4D) hidden activations
    are written once instead of written, read and written again: 6 of the 90 ms of an XL/2 sampling pass (README,
    "Throughput and MFU"). CUDA and inference only (torch has no backward for it); dtype as autocast would pick."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    h = torch._addmm_activation(linear.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype),
                                linear.weight.to(dtype).t(), use_gelu=True)  # cuBLASLt's GELU is the tanh form
    return h.view(*x.shape[:-1], h.shape[-1])


class TimestepEmbedder(nn.Module):
    """Diffusion step t -> 256 sinusoids -> 2-layer MLP (DiT)."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sincos_1d(t, self.freq_dim).to(self.mlp[0].weight.dtype))


# -----------------------------------------------------------------------------
# The GenTron block (Fig. 2 and 3) and the final layer


class GenTronBlock(nn.Module):
    """adaLN-zero DiT block + cross-attention (Fig. 2b) + temporal self-attention (Fig. 3)."""

    def __init__(self, cfg):
        super().__init__()
        d = cfg.width
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads, cfg.qk_norm)
        self.cross = cfg.conditioning == "cross_attn"
        if self.cross:
            self.norm2 = nn.LayerNorm(d, eps=1e-6)
            self.cross_attn = CrossAttention(d, cfg.heads, cfg.qk_norm)
        self.temporal = TemporalAttention(d, cfg.heads, cfg.qk_norm) if cfg.temporal else None
        self.norm3 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_width)
        # adaLN-zero: shift, scale and gate of self-attention and MLP from the condition c (Fig. 2)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c, text=None, text_mask=None, frames=1, motion_free=None, branch=None, gate=None, kv=None):
        """x (B T, N, D); c (B, D) per clip: modulation is computed once per clip, then shared by frames.
        Returns (x, branch, gate): the MLP's residual update x + gate * branch is left to the next block (or the
        final layer), whose first add_norm applies it in the same pass as its norm; `branch, gate` in are the
        previous block's (None: nothing pending). kv: its cross-attention's keys and values (encode_text) or None."""
        mod = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        if frames > 1:
            mod = mod.repeat_interleave(frames, dim=0)  # (B T, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        # x = x + gate1 * attn(modulate(norm1(x), shift1, scale1)); x = x + cross_attn(norm2(x), text);
        # x = x + temporal(LN(x) + pos); x = x + gate2 * mlp(modulate(norm3(x), shift2, scale2)) - written so that each
        # residual update is one pass with the next sub-layer's norm (add_norm): `branch` waits for it.
        x, h = add_norm(x, branch, gate, self.norm1, shift1, scale1)
        branch, gate = self.attn(h), gate1
        if self.cross:
            x, h = add_norm(x, branch, gate, self.norm2)
            branch, gate = self.cross_attn(h, text, text_mask, kv), None
        regrouped = 0
        if self.temporal is not None:  # Eq. 4: x = x + TempSelfAttn(LN(x) + frame position), per patch position:
            # its input regrouped to (B N, T, D) by this add_norm (Eq. 3) and its output back by the next (Eq. 5)
            x, h = add_norm(x, branch, gate, self.temporal.norm, offset=self.temporal.positions(frames, motion_free, x),
                            h_frames=frames)
            branch, gate, regrouped = self.temporal(h, frames, motion_free), None, frames
        x, h = add_norm(x, branch, gate, self.norm3, shift2, scale2, branch_frames=regrouped)
        return x, self.mlp(h), gate2


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear decoder from tokens back to patches (DiT)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch * cfg.patch * cfg.in_channels)

    def forward(self, x, c, frames=1, branch=None, gate=None):
        """x + gate * branch: the residual stream and the last block's pending MLP update (GenTronBlock)."""
        mod = self.adaLN_modulation(c)[:, None]  # (B, 1, 2D)
        if frames > 1:
            mod = mod.repeat_interleave(frames, dim=0)  # (B T, 1, 2D)
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(add_norm(x, branch, gate, self.norm, shift, scale)[1])


# -----------------------------------------------------------------------------
# GenTron


class TextContext(NamedTuple):
    """The caption's share of a forward pass, which depends on neither x_t nor t (GenTron.encode_text)."""
    pooled: torch.Tensor | None  # (B, D): the pooled-text embedding, added to the time embedding (Sec. 3.2.1)
    text: torch.Tensor | None  # (B, L, D): the text tokens at the model's width (cross-attention only)
    kv: list | None  # per block, its cross-attention's keys and values (B, h, L, Dh) (Fig. 2b), or None
    text_mask: torch.Tensor | None  # (B, L), True = real token


class GenTron(nn.Module):
    def __init__(self, cfg: GenTronConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch, stride=cfg.patch)
        self.t_embedder = TimestepEmbedder(d)
        # Sec. 3.2.1: the pooled text embedding takes the place of DiT's class embedding and is added
        # to the time embedding; it is the only text input of the adaLN variant (Fig. 2a).
        self.pooled_embedder = (
            nn.Sequential(nn.Linear(cfg.pooled_dim, d), nn.SiLU(), nn.Linear(d, d)) if cfg.pooled_text else None
        )
        # Text tokens -> model width, once per clip. With CLIP + T5 each encoder's features sit in
        # their own channel block and the sequences are concatenated (text_encoders.py), so this one
        # Linear is a separate projection per encoder followed by concatenation along the sequence.
        self.text_proj = nn.Linear(cfg.text_dim, d) if cfg.conditioning == "cross_attn" else None
        self.blocks = nn.ModuleList(GenTronBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Every initialisation in one place. In-place only, so it also runs after building on the
        meta device and materialising with to_empty (FSDP2): see train_t2i.py."""
        # DiT: xavier-uniform for every Linear, zero biases; LayerNorm affine back to (1, 0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.RMSNorm):  # QK-norm gains
                nn.init.ones_(m.weight)
        # Patch embedding like a Linear on flattened patches (xavier bound computed, no reshape needed)
        w = self.patch_embed.weight
        bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        # Timestep and pooled-text MLPs: normal(0.02), as DiT's timestep/label embedders
        for mlp in (self.t_embedder.mlp, self.pooled_embedder):
            if mlp is not None:
                nn.init.normal_(mlp[0].weight, std=0.02)
                nn.init.normal_(mlp[2].weight, std=0.02)
        for block in self.blocks:
            # adaLN-zero (DiT): zero modulation => every gate is 0 => each block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross:
                # Ungated branch: zero its output projection so the block is still the identity (PixArt-a)
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
            if block.temporal is not None:
                # Sec. 3.3.1: zero weights and bias of TempSelfAttn's output projection => identity
                nn.init.zeros_(block.temporal.attn.proj.weight)
                nn.init.zeros_(block.temporal.attn.proj.bias)
        # Zero the final layer (DiT): the untrained model predicts eps = 0
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def encode_text(self, text=None, text_mask=None, pooled=None, keys_values=True):
        """What a forward pass computes from the caption alone (6.4% of an XL/2 image's FLOPs), which a sampler runs
        once for all its steps (`context`, diffusion.guided_eps_fn), with the padding its captions share dropped
        first (compact_caption). Training leaves the keys and values to each block (keys_values=False), where
        FSDP2 has gathered its weights, and keeps its captions' shape (no host sync in a compiled step)."""
        p = self.pooled_embedder(pooled) if self.pooled_embedder is not None else None
        if keys_values and self.text_proj is not None:
            text, text_mask = compact_caption(text, text_mask)
        text = self.text_proj(text) if self.text_proj is not None else None  # (B, L, D)
        kv = [block.cross_attn.keys_values(text) for block in self.blocks] if text is not None and keys_values else None
        return TextContext(p, text, kv, text_mask)

    def forward(self, x, t, text=None, text_mask=None, pooled=None, motion_free=None, context=None):
        """Predict the noise eps in x_t. x (B, Cin, H, W) or (B, T, Cin, H, W); t (B,); text (B, L, C);
        text_mask (B, L) bool, True = real token; pooled (B, P); motion_free (B,) bool or None (videos).
        Or, in place of text, text_mask and pooled, context = encode_text(text, text_mask, pooled)."""
        if context is None:
            context = self.encode_text(text, text_mask, pooled, keys_values=False)
        elif not (text is None and text_mask is None and pooled is None):
            raise ValueError("pass the caption as text, text_mask and pooled or as context (encode_text), not both")
        video = x.ndim == 5
        frames = x.shape[1] if video else 1
        if frames > 1 and not self.cfg.temporal:
            raise ValueError("this model has no temporal layers: build it with temporal=True for video input")
        if video:
            x = rearrange(x, "b t c h w -> (b t) c h w")
        gh, gw = x.shape[-2] // self.cfg.patch, x.shape[-1] // self.cfg.patch
        x = rearrange(self.patch_embed(x), "bt d gh gw -> bt (gh gw) d")  # (B T, N, D)
        x = x + sincos_2d(gh, gw, x.shape[-1], x.device).to(x.dtype)

        c = self.t_embedder(t)  # (B, D): one condition per clip
        if context.pooled is not None:
            c = c + context.pooled  # Sec. 3.2.1: time + pooled text

        branch = gate = None  # each block leaves its MLP's residual update to the next one (GenTronBlock.forward)
        for block, kv in zip(self.blocks, context.kv or [None] * len(self.blocks), strict=True):
            x, branch, gate = block(x, c, context.text, context.text_mask, frames, motion_free, branch, gate, kv)
        x = self.final_layer(x, c, frames, branch, gate)  # (B T, N, p*p*Cin)
        p = self.cfg.patch
        x = rearrange(x, "bt (gh gw) (p q c) -> bt c (gh p) (gw q)", gh=gh, p=p, q=p)
        return rearrange(x, "(b t) c h w -> b t c h w", t=frames) if video else x

    def load_t2i_weights(self, state_dict):
        """Sec. 3.3.1: initialise a T2V model from a T2I checkpoint. Shared weights are copied; the new
        temporal layers keep their (zero-output) init. Returns the list of keys that were new."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        if unexpected:
            raise ValueError(f"T2I checkpoint has {len(unexpected)} keys this model lacks, e.g. {unexpected[0]}")
        shared = [k for k in missing if ".temporal." not in k]
        if shared:
            raise ValueError(f"T2I checkpoint is missing {len(shared)} shared weights, e.g. {shared[0]}")
        return missing
