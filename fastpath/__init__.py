"""
The opt-in speed layer: the same GenTron, in fewer and fuller GPU kernels. model.py is the model as the paper draws
it; nothing here changes its math or its parameters, and tests/test_fastpath.py pins every piece to it.

- blocks.py: `speed_up(model)` swaps in fused forwards (same modules, same parameter names): the residual update
  and the next LayerNorm + adaLN modulate in one pass (a Triton kernel on CUDA: kernels.py), the temporal
  regrouping of Eq. 3 and 5 inside those passes, short temporal sequences packed into full attention tiles, the
  MLP's GELU in its GEMM's epilogue when sampling, and the caption's share of a step computed once per batch of
  prompts (`encode_text`). `readable(model)` undoes it.
- sampling.py: a sampling step stored in bf16 (`cast_matmul_weights`) and replayed as a CUDA graph (`CUDAGraphStep`).

Training (fsdp.build_model) and sampling (pipeline.load_model) use it by default on CUDA; `--readable` runs
model.py's forwards as written. docs/performance.md gives what each piece measures.
"""

from fastpath.blocks import readable, speed_up  # noqa: F401
