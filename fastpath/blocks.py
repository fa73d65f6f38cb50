"""
Fused forwards for model.py's modules: the same parameters and the same math, in fewer passes over memory.

`speed_up(model)` changes the class of every module it has a fused form for (GenTronBlock -> FusedBlock and so
on); parameter names, state dicts and checkpoints stay those of model.py. The pieces:

- fused residual + norm (`add_norm`): each sub-layer's residual update and the next sub-layer's LayerNorm (+ adaLN
  modulate) in one pass, a Triton kernel on CUDA (fastpath/kernels.py), forward and backward. For that the block
  hands its MLP's update to the next block (or the final layer) instead of adding it itself.
- the temporal regrouping of Eq. 3 and 5 done inside those passes, and the T-frame sequences packed into
  sequences of up to 128 tokens with a block-diagonal mask, so the attention kernels fill their tiles.
- GELU in the first MLP GEMM's epilogue (cuBLASLt) when sampling on CUDA.
- the caption's share of a step (pooled-text MLP, text projection, every block's cross-attention keys and values)
  computed once per batch of prompts (`FusedGenTron.encode_text`) instead of at every denoising step, with the
  padding the prompts share dropped first (text_encoders.compact_caption).
tests/test_fastpath.py pins every piece to the readable model, outputs and gradients.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

import model
import text_encoders

try:
    from fastpath import kernels  # Triton comes with CUDA builds of PyTorch
except ImportError:
    kernels = None


def add_norm(x, branch, gate, norm, shift=None, scale=None, offset=None, branch_frames=0, h_frames=0):
    """One sub-layer's residual update and the next sub-layer's input, (r, h):
        r = x + gate * branch   (gate None: x + branch; branch None: r = x)
        h = modulate(norm(r), shift, scale), or norm(r) [+ offset] for an affine LayerNorm (shift None)
    x, r (S, N, D); shift, scale, offset (S, 1, D). branch_frames = T: the branch comes as (B N, T, D); h_frames = T:
    h goes as (B N, T, D) (the temporal layer's layout, Eq. 3 and 5). On CUDA one Triton kernel; this is its math."""
    if kernels is not None and kernels.usable(x):
        a, c = (1 + scale, shift) if shift is not None else (norm.weight, norm.bias)
        c = c if offset is None else c + offset
        return kernels.add_norm(x, branch, gate, a, c, norm.eps, branch_frames, h_frames)
    if branch_frames and branch is not None:
        branch = rearrange(branch, "(b n) t d -> (b t) n d", t=branch_frames, n=x.shape[1])  # Eq. 5
    r = residual(x, branch, gate)
    h = model.modulate(norm(r), shift, scale) if shift is not None else norm(r) if offset is None else norm(r) + offset
    return r, rearrange(h, "(b t) n d -> (b n) t d", t=h_frames) if h_frames else h  # Eq. 3


def residual(x, branch, gate):
    """x + gate * branch (gate None: x + branch; branch None: x), a sub-layer's residual update."""
    return x if branch is None else x + (branch if gate is None else gate * branch)


def linear_gelu(x, linear):
    """gelu_tanh(linear(x)) with the GELU in the GEMM's epilogue (cuBLASLt): the (..., 4D) hidden activations are
    written once instead of written, read and written again. CUDA inference only (no backward); dtype as autocast."""
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    h = torch._addmm_activation(linear.bias.to(dtype), x.reshape(-1, x.shape[-1]).to(dtype),
                                linear.weight.to(dtype).t(), use_gelu=True)  # cuBLASLt's GELU is the tanh form
    return h.view(*x.shape[:-1], h.shape[-1])


class TextContext(NamedTuple):
    """The caption's share of a forward pass, which depends on neither x_t nor t (FusedGenTron.encode_text)."""
    pooled: torch.Tensor | None  # (B, D): the pooled-text embedding, added to the time embedding (Sec. 3.2.1)
    text: torch.Tensor | None  # (B, L, D): the text tokens at the model's width (cross-attention only)
    kv: list | None  # per block, its cross-attention's keys and values (B, h, L, Dh) (Fig. 2b), or None
    text_mask: torch.Tensor | None  # (B, L), True = real token


class FusedMLP(model.MLP):
    def forward(self, x):
        if x.is_cuda and not torch.is_grad_enabled():  # sampling on a GPU: the GELU in the GEMM's epilogue
            return self.fc2(linear_gelu(x, self.fc1))
        return super().forward(x)


class FusedCrossAttention(model.CrossAttention):
    """Takes the caption's keys and values precomputed (kv = keys_values(text)) as well as the text itself."""

    def keys_values(self, text):
        k, v = rearrange(self.kv(text), "b l (two h dh) -> two b h l dh", two=2, h=self.heads)  # (B, h, L, Dh)
        return self.k_norm(k), v

    def forward(self, x, text, text_mask, kv=None):
        k, v = kv if kv is not None else self.keys_values(text)
        q = self.q_norm(rearrange(self.q(x), "(b t) n (h dh) -> b h (t n) dh", b=k.shape[0], h=self.heads))
        mask = None if text_mask is None else text_mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T N, Dh)
        return self.proj(rearrange(out, "b h (t n) dh -> (b t) n (h dh)", n=x.shape[1]))


class FusedTemporalAttention(model.TemporalAttention):
    """Eq. 4's attention on h already regrouped to (B N, T, D) (Eq. 3, by add_norm), output in that layout."""

    tile = 128  # query rows per tile of the fused attention kernels (flash, cuDNN); 0: no packing

    def forward(self, h, frames, motion_free=None):
        d = h.shape[-1]
        # The (B N) sequences are only T = 8 frames long; a fused kernel would spend a whole tile on each. So `pack`
        # consecutive sequences run as one of pack * T tokens, a block-diagonal mask keeping each frame inside its
        # own sequence: the same attention. Packing is a reshape: the sequences are contiguous in (B N, T, D).
        pack = self.pack_size(h.shape[0], frames)
        i = torch.arange(pack * frames, device=h.device)
        mask = (i[:, None] // frames) == (i[None, :] // frames)  # (pack T, pack T): same sequence
        if motion_free is not None:  # Sec. 3.3.2: the identity mask for motion-free clips
            free = motion_free.repeat_interleave(h.shape[0] // len(motion_free) * frames)  # each query's clip
            mask = (mask & ((i[:, None] == i[None, :]) | ~free.view(-1, pack * frames, 1)))[:, None]
        elif pack == 1:
            mask = None  # nothing to mask: the flash kernel
        return self.attn(h.reshape(-1, pack * frames, d), mask).view(-1, frames, d)

    def pack_size(self, sequences, frames):
        """The most sequences (at most tile // frames) that divide `sequences` evenly, 1 for long clips."""
        return max(p for p in range(1, max(1, self.tile // frames) + 1) if sequences % p == 0)


class FusedBlock(model.GenTronBlock):
    def forward(self, x, c, text=None, text_mask=None, frames=1, motion_free=None, branch=None, gate=None, kv=None):
        """GenTronBlock.forward with each residual update done in one pass with the next sub-layer's norm. Returns
        (x, branch, gate): the MLP's update x + gate * branch is left to the next block or the final layer;
        `branch, gate` in are the previous block's (None: nothing pending). kv: precomputed keys and values."""
        mod = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        if frames > 1:
            mod = mod.repeat_interleave(frames, dim=0)  # (B T, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)
        x, h = add_norm(x, branch, gate, self.norm1, shift1, scale1)
        branch, gate = self.attn(h), gate1
        if self.cross:
            x, h = add_norm(x, branch, gate, self.norm2)
            branch, gate = self.cross_attn(h, text, text_mask, kv), None
        regrouped = 0
        if self.temporal is not None:  # LN + frame position, regrouped to (B N, T, D) in the same pass (Eq. 3)
            pos = model.frame_positions(frames, motion_free, x) if frames > 1 else None
            x, h = add_norm(x, branch, gate, self.temporal.norm, offset=pos, h_frames=frames)
            branch, gate, regrouped = self.temporal(h, frames, motion_free), None, frames  # back by the next (Eq. 5)
        x, h = add_norm(x, branch, gate, self.norm3, shift2, scale2, branch_frames=regrouped)
        return x, self.mlp(h), gate2


class FusedFinalLayer(model.FinalLayer):
    def forward(self, x, c, frames=1, branch=None, gate=None):
        """x + gate * branch: the stream and the last block's pending MLP update (FusedBlock)."""
        shift, scale = self.adaLN_modulation(c).repeat_interleave(frames, dim=0)[:, None].chunk(2, dim=-1)
        return self.linear(add_norm(x, branch, gate, self.norm, shift, scale)[1])


class FusedGenTron(model.GenTron):
    def encode_text(self, text=None, text_mask=None, pooled=None, keys_values=True):
        """What a forward pass computes from the caption alone, which a sampler runs once for all its steps
        (diffusion.guided_eps_fn's `encode`), after dropping the padding its captions share (text_encoders.compact_caption,
        one host sync). Training leaves the keys and values to each block (keys_values=False), where FSDP2 has
        gathered its weights, and keeps its captions' shape (no host sync in a compiled step)."""
        p = self.pooled_embedder(pooled) if self.pooled_embedder is not None else None
        if keys_values and self.text_proj is not None:
            text, text_mask = text_encoders.compact_caption(text, text_mask)
        text = self.text_proj(text) if self.text_proj is not None else None  # (B, L, D)
        kv = [block.cross_attn.keys_values(text) for block in self.blocks] if text is not None and keys_values else None
        return TextContext(p, text, kv, text_mask)

    def forward(self, x, t, text=None, text_mask=None, pooled=None, motion_free=None, context=None):
        """GenTron.forward, or with context = encode_text(text, text_mask, pooled) in place of the caption."""
        if context is None:
            context = self.encode_text(text, text_mask, pooled, keys_values=False)
        elif not (text is None and text_mask is None and pooled is None):
            raise ValueError("pass the caption as text, text_mask and pooled or as context (encode_text), not both")
        video = x.ndim == 5
        x, grid, frames = self.patchify(x)
        c = self.t_embedder(t)  # (B, D)
        if context.pooled is not None:
            c = c + context.pooled  # Sec. 3.2.1: time + pooled text
        branch = gate = None  # each block leaves its MLP's residual update to the next one (FusedBlock)
        for block, kv in zip(self.blocks, context.kv or [None] * len(self.blocks), strict=True):
            x, branch, gate = block(x, c, context.text, context.text_mask, frames, motion_free, branch, gate, kv)
        return self.unpatchify(self.final_layer(x, c, frames, branch, gate), grid, frames, video)


FUSED = {model.GenTron: FusedGenTron, model.GenTronBlock: FusedBlock, model.FinalLayer: FusedFinalLayer,
         model.CrossAttention: FusedCrossAttention, model.TemporalAttention: FusedTemporalAttention,
         model.MLP: FusedMLP}
READABLE = {fast: plain for plain, fast in FUSED.items()}


def speed_up(net, fused=True, pack=True, gelu=True):
    """Give `net` (a model.GenTron) the fused forwards, in place: the same modules and parameters, another class.
    pack=False: temporal sequences one at a time; gelu=False: the MLP as model.py writes it. Returns net."""
    for m in net.modules():
        fast = FUSED.get(type(m))
        if fast is not None and (fused or fast is FusedMLP) and (gelu or fast is not FusedMLP):
            m.__class__ = fast
        if isinstance(m, FusedTemporalAttention) and not pack:
            m.tile = 0
    return net


def readable(net):
    """Undo speed_up: every module back to model.py's class. In place; returns net."""
    for m in net.modules():
        m.__class__ = READABLE.get(type(m), type(m))
    return net
