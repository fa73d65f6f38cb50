"""
How a trained GenTron runs for sampling: one denoising step's forward pass, on a GPU stored in bf16 and replayed
as a CUDA graph. pipeline.generate (sample.py, evaluate.py, the end of a training run) and bench.py run it so.

- `cast_matmul_weights`: the Linear and Conv weights stored in bf16, which autocast computes them in anyway.
- `CUDAGraphStep`: the step recorded once and replayed. Eagerly, an XL/2 step at sample.py's default batch (16
  prompts, CFG batch 32) is bound by launching its ~500 kernels from Python; replayed it ran 3.3x faster on an
  H100, with the same kernels and so the same samples (docs/performance.md, "Optimisations in the code").
- `sampling_step`: the step itself, under bf16 autocast on CUDA, replayed or not.
"""

import weakref
from contextlib import nullcontext

import torch
import torch.nn as nn

from fastpath.blocks import TextContext


def cast_matmul_weights(model, dtype=torch.bfloat16):
    """Store every Linear's and Conv2d's weight and bias in `dtype`, for inference under autocast to `dtype`.
    Autocast computes these layers in `dtype` anyway, so the outputs are the same; it just no longer casts
    every fp32 weight on every forward pass (2.6% of an XL/2 sampling pass on an H100: docs/performance.md,
    "Optimisations in the code"). Norm gains stay fp32, as autocast runs norms in fp32. In place; returns the model."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(dtype)
    return model


def autocast(device):
    """bf16 autocast on CUDA (fp32 on the CPU), without autocast's cache of cast weights, which a CUDA graph must
    not hold (the weights are bf16 already: cast_matmul_weights)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def sampling_step(model, device, cuda_graph=True):
    """step(x, t, context, motion_free) -> the model's prediction (bf16 on CUDA), the captions given as
    context = model.encode_text(...). On CUDA replayed as a CUDA graph unless cuda_graph=False."""
    device = torch.device(device)

    def step(x, t, context, motion_free=None):
        with autocast(device), torch.cuda.device(device) if device.type == "cuda" else nullcontext():  # Triton: this GPU
            return model(x, t, context=context, motion_free=motion_free)

    return CUDAGraphStep(step) if device.type == "cuda" and cuda_graph else step


def _tensors(context):
    """Every tensor of a TextContext, in a fixed order."""
    kv = [a for pair in context.kv or () for a in pair]
    return [v for v in (context.pooled, context.text, *kv, context.text_mask) if v is not None]


def _clone(context):
    """A TextContext of copies."""
    c = lambda v: None if v is None else v.clone()
    kv = None if context.kv is None else [(k.clone(), v.clone()) for k, v in context.kv]
    return TextContext(c(context.pooled), c(context.text), kv, c(context.text_mask))


class CUDAGraphStep:
    """step(x, t, context, motion_free) = fn(...), recorded once as a CUDA graph and then replayed: the same kernels
    as calling fn, launched by the GPU as one graph instead of one by one from Python, so the outputs are
    bit-identical (a CUDA test). One graph per input shape, all in one memory pool. x, t and motion_free are
    copied into the graph's inputs at every step, the captions' context only when a new batch brings a new one;
    the output is returned as a copy."""

    def __init__(self, fn):
        self.fn, self.graphs, self.pool, self.failed = fn, {}, None, None

    def __call__(self, x, t, context, motion_free=None):
        if self.failed:  # a failed recording leaves the pool unusable: say why again
            raise RuntimeError(self.failed)
        tensors = _tensors(context)
        key = (x.shape, motion_free is None, *(v.shape for v in tensors))
        with torch.cuda.device(x.device):  # streams and graphs belong to the current device
            if key not in self.graphs:
                self.graphs[key] = self.capture(x, t, context, motion_free)
            graph, static, out = self.graphs[key]
            for dst, src in zip(static["step"], (x, t, motion_free)):
                if src is not None:
                    dst.copy_(src)
            if not all(seen() is v for seen, v in zip(static["seen"], tensors)):  # a new batch of captions
                for dst, src in zip(_tensors(static["context"]), tensors):
                    dst.copy_(src)
                static["seen"] = [weakref.ref(v) for v in tensors]  # weak: the old batch's captions can go
            graph.replay()
            return out.clone()

    def capture(self, x, t, context, motion_free):
        step = [None if v is None else v.clone() for v in (x, t, motion_free)]
        static = dict(step=step, context=_clone(context), seen=[weakref.ref(v) for v in _tensors(context)])
        call = lambda: self.fn(*step[:2], context=static["context"], motion_free=step[2])
        side = torch.cuda.Stream()  # warm up on a side stream (Triton autotuning, cuBLAS and cuDNN plans), then record
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = call()
        except RuntimeError as e:
            self.pool = None  # a failed recording leaves its memory pool unusable
            oom = e if isinstance(e, torch.cuda.OutOfMemoryError) else e.__context__  # (raised inside the recording)
            if isinstance(oom, torch.cuda.OutOfMemoryError):
                raise oom  # a real out-of-memory, for the caller to handle (bench.py --max-batch)
            # e.g. a .item() or .cpu() in the forward pass: a host sync cannot be recorded
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.failed = (f"the sampling step could not be recorded as a CUDA graph ({why}): sample eagerly "
                           "with sample.py --eager, evaluate.py --eager or generate(..., cuda_graph=False)")
            raise RuntimeError(self.failed) from None
        return graph, static, out
