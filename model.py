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

This file is the model as the paper draws it, in plain PyTorch, and it is what trains and samples. fastpath/
swaps in fused forwards over the same parameters (on by default on CUDA); tests/test_fastpath.py pins them to
the forwards here.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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
    # ~40 to ~10^4 over a long run and training diverged (docs/deviations.md).
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
    "XL": dict(depth=28, width=1152, mlp_width=4608, heads=16),  # GenTron-XL/2 (Table 1: 930.0M; here 830.3M, docs/deviations.md)
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
        """x (B, N, D); mask (B, 1, N, N) bool, True = may attend, or None."""
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

    def heads_qkv(self, x, text, text_mask):
        """x (B T, N, D), text (B, L, D), text_mask (B, L) -> q (B, h, T N, Dh), k, v (B, h, L, Dh) and the key mask
        (B, 1, 1, L). The T frames of a clip share its caption, so their tokens form one query sequence of T N
        against it; each query attends on its own, so this is every frame's cross-attention to the caption."""
        k, v = rearrange(self.kv(text), "b l (two h dh) -> two b h l dh", two=2, h=self.heads)
        q = rearrange(self.q(x), "(b t) n (h dh) -> b h (t n) dh", b=text.shape[0], h=self.heads)
        return self.q_norm(q), self.k_norm(k), v, None if text_mask is None else text_mask[:, None, None, :]

    def forward(self, x, text, text_mask):
        out = F.scaled_dot_product_attention(*self.heads_qkv(x, text, text_mask))  # (B, h, T N, Dh); padding masked
        return self.proj(rearrange(out, "b h (t n) dh -> (b t) n (h dh)", n=x.shape[1]))


def frame_positions(frames, motion_free, x):
    """Sin-cos position of every frame (B T, 1, D): frame t of each clip gets row t. Not in Eq. 4: it tells the
    temporal attention the frames' order. A motion-free clip gets none (Sec. 3.3.2): with the identity mask its
    frames see only themselves, and a frame-dependent offset would still make its frames differ."""
    pos = sincos_1d(torch.arange(frames, device=x.device), x.shape[-1]).repeat(x.shape[0] // frames, 1)  # (B T, D)
    if motion_free is not None:
        pos = pos * (~motion_free).repeat_interleave(frames)[:, None]  # zero for motion-free clips
    return pos[:, None].to(x.dtype)


class TemporalAttention(nn.Module):
    """TempSelfAttn (Sec. 3.3.1, Eq. 3-5): each patch position attends across the T frames of its clip."""

    def __init__(self, dim, heads, qk_norm=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qk_norm)  # attn.proj is zero-initialised: identity at the start of T2V

    def forward(self, x, frames, motion_free=None):
        """x (B T, N, D) -> TempSelfAttn(LN(x)) in the same layout; the block adds it to x (Eq. 4)."""
        n = x.shape[1]
        h = self.norm(x)  # (B T, N, D)
        if frames > 1:  # one frame has no order to tell
            h = h + frame_positions(frames, motion_free, x)
        h = rearrange(h, "(b t) n d -> (b n) t d", t=frames)  # Eq. 3: a sequence of T frames per patch position
        mask = None
        if motion_free is not None:  # Sec. 3.3.2, Fig. 3: a motion-free clip attends with the identity mask, so each
            # frame sees only itself and temporal modelling is off for that sample; the other clips see all frames
            free = motion_free.repeat_interleave(n)[:, None, None, None]  # (B N, 1, 1, 1): each sequence's clip
            mask = torch.eye(frames, dtype=torch.bool, device=x.device) | ~free  # (B N, 1, T, T)
        h = self.attn(h, mask)  # Eq. 4's TempSelfAttn
        return rearrange(h, "(b n) t d -> (b t) n d", n=n)  # Eq. 5: back to frames of N tokens


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # DiT's tanh-GELU


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

    def forward(self, x, c, text=None, text_mask=None, frames=1, motion_free=None):
        """x (B T, N, D); c (B, D), one condition per clip, shared by its frames; text (B, L, D)."""
        mod = self.adaLN_modulation(c).repeat_interleave(frames, dim=0)[:, None]  # (B T, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))  # Fig. 2: self-attention
        if self.cross:
            x = x + self.cross_attn(self.norm2(x), text, text_mask)  # Fig. 2b: cross-attention to the text
        if self.temporal is not None:
            x = x + self.temporal(x, frames, motion_free)  # Fig. 3, Eq. 4: temporal self-attention
        x = x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))  # Fig. 2: pointwise feedforward
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear decoder from tokens back to patches (DiT)."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch * cfg.patch * cfg.in_channels)

    def forward(self, x, c, frames=1):
        shift, scale = self.adaLN_modulation(c).repeat_interleave(frames, dim=0)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B T, N, p*p*Cin)


# -----------------------------------------------------------------------------
# GenTron


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
        zero = lambda linear: (nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias))
        for block in self.blocks:
            zero(block.adaLN_modulation[-1])  # adaLN-zero (DiT): every gate is 0 => each block starts as the identity
            if block.cross:  # an ungated branch: a zero output projection keeps the block the identity (PixArt-a)
                zero(block.cross_attn.proj)
            if block.temporal is not None:  # Sec. 3.3.1: TempSelfAttn's output projection zero => identity
                zero(block.temporal.attn.proj)
        zero(self.final_layer.adaLN_modulation[-1])  # the final layer (DiT): the untrained model predicts eps = 0
        zero(self.final_layer.linear)

    def patchify(self, x):
        """x (B, Cin, H, W) or (B, T, Cin, H, W) -> tokens with their 2D positions (B T, N, D), the patch grid
        (gh, gw) and the frames per clip T (1 for images)."""
        frames = x.shape[1] if x.ndim == 5 else 1
        if frames > 1 and not self.cfg.temporal:
            raise ValueError("this model has no temporal layers: build it with temporal=True for video input")
        if x.ndim == 5:
            x = rearrange(x, "b t c h w -> (b t) c h w")
        gh, gw = x.shape[-2] // self.cfg.patch, x.shape[-1] // self.cfg.patch
        x = rearrange(self.patch_embed(x), "bt d gh gw -> bt (gh gw) d")  # (B T, N, D)
        return x + sincos_2d(gh, gw, x.shape[-1], x.device).to(x.dtype), (gh, gw), frames

    def unpatchify(self, x, grid, frames, video):
        """(B T, N, p*p*Cin) -> (B, Cin, H, W), or (B, T, Cin, H, W) for video input (DiT's patch layout)."""
        p = self.cfg.patch
        x = rearrange(x, "bt (gh gw) (p q c) -> bt c (gh p) (gw q)", gh=grid[0], p=p, q=p)
        return rearrange(x, "(b t) c h w -> b t c h w", t=frames) if video else x

    def forward(self, x, t, text=None, text_mask=None, pooled=None, motion_free=None):
        """Predict the noise eps in x_t. x (B, Cin, H, W) or (B, T, Cin, H, W); t (B,); text (B, L, C);
        text_mask (B, L) bool, True = real token; pooled (B, P); motion_free (B,) bool or None (videos)."""
        video = x.ndim == 5
        x, grid, frames = self.patchify(x)
        c = self.t_embedder(t)  # (B, D): one condition per clip
        if self.pooled_embedder is not None:
            c = c + self.pooled_embedder(pooled)  # Sec. 3.2.1: time + pooled text
        text = self.text_proj(text) if self.text_proj is not None else None  # (B, L, D)
        for block in self.blocks:
            x = block(x, c, text, text_mask, frames, motion_free)
        x = self.final_layer(x, c, frames)  # (B T, N, p*p*Cin)
        return self.unpatchify(x, grid, frames, video)

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
