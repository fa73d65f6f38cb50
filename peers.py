"""
DiT-XL/2 (Peebles & Xie, 2023) and PixArt-XL/2 (Chen et al., 2023) built by their own published code, so that
bench.py times them in the same harness as GenTron (`bench.py --peer dit|pixart --peer-repo PATH`). Nothing
else imports this file.

- DiT: `models.py` of a clone of github.com/facebookresearch/DiT (needs timm). Class-conditional: it gets a
  class label where GenTron gets a caption.
- PixArt: `diffusion/model/nets/PixArt.py` and `PixArt_blocks.py` of a clone of
  github.com/PixArt-alpha/PixArt-alpha (needs timm), loaded on their own: the package around them imports
  mmcv and the samplers, which the model does not use. It gets 120 T5-XXL positions with no padding mask
  (PixArt's path without a mask). Where xformers is not installed, its attention calls run on PyTorch's
  scaled_dot_product_attention (`memory_efficient_attention` below: the same math).
"""

import importlib.util
import logging
import os
import sys
import types

import torch
import torch.nn.functional as F

PEERS = {"dit": "DiT-XL/2 (facebookresearch/DiT models.py)",
         "pixart": "PixArt-XL/2 (PixArt-alpha diffusion/model/nets/PixArt.py)"}


class BlockDiagonalMask:
    """xformers.ops.fmha.BlockDiagonalMask.from_seqlens: the i-th block of queries attends to the i-th block of
    keys, sequences packed one after another along the token axis."""

    def __init__(self, q_lens, kv_lens):
        self.q_lens, self.kv_lens = list(q_lens), list(kv_lens)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, q_seqlen if kv_seqlen is None else kv_seqlen)


def memory_efficient_attention(q, k, v, p=0.0, attn_bias=None):
    """xformers.ops.memory_efficient_attention on (1 or B, tokens, heads, head width) inputs, by SDPA. Packed
    blocks of equal lengths (what PixArt passes without a padding mask) are a batch of plain attentions."""
    shape = q.shape
    if attn_bias is not None:
        q_lens, kv_lens = attn_bias.q_lens, attn_bias.kv_lens
        if len(set(q_lens)) > 1 or len(set(kv_lens)) > 1:
            raise NotImplementedError("this stand-in takes blocks of equal lengths only (no padding mask)")
        q = q.reshape(len(q_lens), q_lens[0], *q.shape[2:])
        k = k.reshape(len(kv_lens), kv_lens[0], *k.shape[2:])
        v = v.reshape(len(kv_lens), kv_lens[0], *v.shape[2:])
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p)
    return out.transpose(1, 2).reshape(shape)  # xformers' output has the queries' shape


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package(name, **attributes):
    module = types.ModuleType(name)
    module.__path__ = []
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def pixart_module(repo):
    """PixArt.py as a module, its imports of the surrounding package answered by the files it needs."""
    if importlib.util.find_spec("xformers") is None:
        ops = _package("xformers.ops", memory_efficient_attention=memory_efficient_attention,
                       fmha=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask))
        _package("xformers", ops=ops)
    registry = types.SimpleNamespace(register_module=lambda: (lambda f: f))
    # modules named by their full dotted names resolve without their parents (our diffusion.py stays)
    _package("diffusion.model.builder", MODELS=registry)
    _package("diffusion.utils.logger", get_root_logger=lambda *a, **k: logging.getLogger("PixArt"))
    nets = os.path.join(repo, "diffusion", "model")
    _load("diffusion.model.utils", os.path.join(nets, "utils.py"))
    _load("diffusion.model.nets.PixArt_blocks", os.path.join(nets, "nets", "PixArt_blocks.py"))
    return _load("diffusion.model.nets.PixArt", os.path.join(nets, "nets", "PixArt.py"))


class Peer(torch.nn.Module):
    """A peer's XL/2 called with bench.py's inputs (x, t, text, ...); returns the predicted noise's 4 channels
    (both peers also predict the variance in 4 more)."""

    def __init__(self, name, repo, latent_size):
        super().__init__()
        if name not in PEERS:
            raise ValueError(f"peer must be one of {', '.join(PEERS)}, got {name!r}")
        self.name = name
        if name == "dit":
            path = os.path.join(repo, "models.py")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{repo} holds no models.py: pass a clone of facebookresearch/DiT")
            self.net = _load("dit_models", path).DiT_XL_2(input_size=latent_size)
        else:
            if not os.path.isfile(os.path.join(repo, "diffusion", "model", "nets", "PixArt.py")):
                raise FileNotFoundError(f"{repo} holds no diffusion/model/nets/PixArt.py: pass a clone of "
                                        "PixArt-alpha/PixArt-alpha")
            self.net = pixart_module(repo).PixArt_XL_2(input_size=latent_size)
        self.text_dim = 4096 if name == "pixart" else None  # T5-XXL

    def forward(self, x, t, text=None, **_):
        if self.name == "dit":
            out = self.net(x, t, t % 1000)  # any class labels
        else:
            out = self.net(x, t, text[:, None])  # (B, 1, 120, 4096), no mask
        return out[:, :4]
