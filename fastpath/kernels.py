"""
A fused GPU kernel (Triton) for the GenTron block: the residual update of one sub-layer and the input of the next,
in one pass over the tokens, forward and backward. model.add_norm is the same math in PyTorch (CPU, and reference).

    r = x + gate * branch              (gate None: x + branch; branch None: r = x)
    h = LayerNorm(r) * scale + shift   (LayerNorm without affine; adaLN: scale = 1 + adaLN scale)

x, branch, r, h: (S, N, D), S groups (images, or frames of clips) of N tokens. gate, scale, shift: (S, D), one row
per group (adaLN is per sample), or (D,) broadcast to every group (an affine LayerNorm's weight and bias).
For the temporal layer (model.py, Eq. 3-5) branch or h may instead be in the (B N, T, D) layout of S = B T frames:
each row is read or written at its place there, so that no pass of its own regroups the tokens.

Why: Inductor's LayerNorm + modulate + residual kernels for XL/2 (D = 1152) ran at a third to a half of the H100's
HBM bandwidth (docs/performance.md, "Where the time goes"). Each row here is read once, normalised in registers
and written once: 2.2-2.7 TB/s by our count, and an XL/2 training step on one H100 went from 162.3 to 154.4 ms.
The backward kernel recomputes the normalised row from r and the saved mean / rstd, and reduces the per-group
gradients of gate, scale and shift in two steps (a partial sum per block of rows, then a sum over blocks).
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: tests run the kernels on the CPU
# backward: tokens per program (at most); its sums over them (for d gate, scale, shift) are added up after. 64 rather
# than 16: 133 vs 144 us (gated) and 86 vs 109 us (ungated) per call at XL/2 training shapes (64 images: 256
# programs), partial sums included (H100). Fewer groups get smaller chunks, so that every SM still gets a program.
CHUNK = 64


def usable(x):
    return x.is_cuda or INTERPRET


# (rows per program, warps): tried on the first call for each width D and case (triton.autotune), then cached. Each one
# compiles for sm_90 with vectorised loads and without register spills for D up to 2048 (checked offline: triton.compile
# for sm_90 with the divisibility by 16 that the JIT specialises on, then ptxas -v). The lists hold the fastest of 16
# (forward) and 12 (backward) pairs timed at XL/2's shapes on an H100 (2026-11-27): the gated forward at 2.8 TB/s
# (2, 2), as fast as a copy there; the one without a branch (4, 4) or (2, 4); the backward (2, 4).
# The interpreter has no GPU to time them on: the first one alone, with 2 rows (partly masked blocks get tested).
def configs(pairs):
    return [triton.Config({"ROWS": rows}, num_warps=warps) for rows, warps in pairs][: 1 if INTERPRET else None]


@triton.jit
def _row_by_pos(group, token, N, T):
    """Token `token` of frame `group` (row group N + token of (B T, N)) is row (b N + token) T + t of (B N, T)."""
    return ((group // T) * N + token) * T + group % T


@triton.autotune(configs=configs([(2, 2), (1, 4), (2, 4), (4, 4)]),
                 key=["D", "HAS_BRANCH", "HAS_GATE", "B_BY_POS", "H_BY_POS"])
@triton.jit
def _add_norm_fwd_kernel(x_ptr, b_ptr, g_ptr, a_ptr, c_ptr, r_ptr, h_ptr, mean_ptr, rstd_ptr, rows, N, D, T,
                         g_step, a_step, c_step, eps, HAS_BRANCH: tl.constexpr, HAS_GATE: tl.constexpr,
                         B_BY_POS: tl.constexpr, H_BY_POS: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # (ROWS,); int64: offsets can pass 2^31
    col = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D)
    mask = (row[:, None] < rows) & (col < D)
    at = row[:, None] * D + col  # (ROWS, BLOCK_D) offsets into the (S N, D) tensors
    grp = row[:, None] // N  # each row's group: the row of gate / scale / shift
    b_at, h_at = at, at
    if B_BY_POS or H_BY_POS:
        moved = _row_by_pos(grp, row[:, None] % N, N, T)
        if B_BY_POS:
            b_at = moved * D + col
        if H_BY_POS:
            h_at = moved * D + col
    r = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        b = tl.load(b_ptr + b_at, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            b *= tl.load(g_ptr + grp * g_step + col, mask=mask, other=0.0).to(tl.float32)
        r = (r + b).to(r_ptr.dtype.element_ty)  # the stored residual is what gets normalised (as unfused)
        tl.store(r_ptr + at, r, mask=mask)
        r = r.to(tl.float32)
    mean = tl.sum(r, axis=1) / D
    diff = tl.where(mask, r - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / D + eps)
    a = tl.load(a_ptr + grp * a_step + col, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + grp * c_step + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + h_at, (diff * rstd[:, None] * a + c).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean, mask=row < rows)
    tl.store(rstd_ptr + row, rstd, mask=row < rows)


@triton.autotune(configs=configs([(2, 4), (2, 8), (4, 4), (4, 8)]),
                 key=["D", "HAS_GATE", "CHUNK", "B_BY_POS", "H_BY_POS"])
@triton.jit
def _add_norm_bwd_kernel(dh_ptr, dr_ptr, r_ptr, b_ptr, g_ptr, a_ptr, mean_ptr, rstd_ptr, dx_ptr, db_ptr, pa_ptr,
                         pc_ptr, pg_ptr, N, D, T, g_step, a_step, CHUNK: tl.constexpr, HAS_DR: tl.constexpr,
                         HAS_GATE: tl.constexpr, B_BY_POS: tl.constexpr, H_BY_POS: tl.constexpr,
                         BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
    # program (s, k): tokens k CHUNK .. (k+1) CHUNK of group s, ROWS at a time; its sums over them go to p*[s, k, :]
    s, k = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col, cmask = cols[None, :], cols < D
    a = tl.load(a_ptr + s * a_step + col, mask=col < D, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(g_ptr + s * g_step + col, mask=col < D, other=0.0).to(tl.float32)
    sum_a = tl.zeros([BLOCK_D], dtype=tl.float32)  # d scale = sum over tokens of dh n
    sum_c = tl.zeros([BLOCK_D], dtype=tl.float32)  # d shift = sum over tokens of dh
    sum_g = tl.zeros([BLOCK_D], dtype=tl.float32)  # d gate = sum over tokens of branch dr
    for i in range(0, CHUNK, ROWS):
        token = k * CHUNK + i + tl.arange(0, ROWS)
        ok = (token < N) & (i + tl.arange(0, ROWS) < CHUNK)
        row = s.to(tl.int64) * N + token
        mask = ok[:, None] & (col < D)
        at = row[:, None] * D + col
        b_at, h_at = at, at
        if B_BY_POS or H_BY_POS:
            moved = _row_by_pos(s.to(tl.int64), token, N, T)
            if B_BY_POS:
                b_at = moved[:, None] * D + col
            if H_BY_POS:
                h_at = moved[:, None] * D + col
        mean = tl.load(mean_ptr + row, mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + row, mask=ok, other=0.0)
        r = tl.load(r_ptr + at, mask=mask, other=0.0).to(tl.float32)
        n = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
        dh = tl.load(dh_ptr + h_at, mask=mask, other=0.0).to(tl.float32)
        sum_a += tl.sum(dh * n, axis=0)
        sum_c += tl.sum(dh, axis=0)
        dn = dh * a
        # LayerNorm backward: dr = rstd (dn - mean(dn) - n mean(dn n)), plus r's gradient from the residual path
        dr = rstd[:, None] * (dn - (tl.sum(dn, axis=1) / D)[:, None] - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        if HAS_DR:
            dr += tl.load(dr_ptr + at, mask=mask, other=0.0).to(tl.float32)
        dr = tl.where(mask, dr, 0.0)
        tl.store(dx_ptr + at, dr.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_GATE:  # r = x + gate * branch: d branch = gate dr
            tl.store(db_ptr + b_at, (dr * g).to(db_ptr.dtype.element_ty), mask=mask)
            sum_g += tl.sum(dr * tl.load(b_ptr + b_at, mask=mask, other=0.0).to(tl.float32), axis=0)
        elif B_BY_POS:  # r = x + branch: d branch = dr, at the branch's places
            tl.store(db_ptr + b_at, dr.to(db_ptr.dtype.element_ty), mask=mask)
    part = (s * tl.num_programs(1) + k) * D + cols  # this program's row of the partial sums
    tl.store(pa_ptr + part, sum_a, mask=cmask)
    tl.store(pc_ptr + part, sum_c, mask=cmask)
    if HAS_GATE:
        tl.store(pg_ptr + part, sum_g, mask=cmask)


def _chunk(S, N, device):
    """Tokens per backward program: CHUNK, halved (down to 16) while the S * N / chunk programs would leave SMs idle."""
    chunk = CHUNK
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        while chunk > 16 and S * triton.cdiv(N, chunk) < sms:
            chunk //= 2
    return chunk


def _step(t):
    """Row step of a gate / scale / shift tensor: D for (S, D), 0 for a (D,) vector shared by all groups."""
    return t.stride(0) if t.dim() == 2 else 0


def _or(t, placeholder):
    """t, or for an absent (None) input a valid pointer that the kernel's constexpr flags leave unread."""
    return t if t is not None else placeholder


@triton_op("gentron::add_norm", mutates_args=())
def _add_norm(x: torch.Tensor, branch: Optional[torch.Tensor], gate: Optional[torch.Tensor], scale: torch.Tensor,
              shift: torch.Tensor, eps: float, branch_frames: int, h_frames: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    S, N, D = x.shape
    h = torch.empty_like(x)
    r = torch.empty_like(x) if branch is not None else x.new_empty(0)  # branch None: r is x itself (add_norm)
    mean, rstd = (x.new_empty(S * N, dtype=torch.float32) for _ in range(2))
    g = _or(gate, scale)
    wrap_triton(_add_norm_fwd_kernel)[lambda meta: (triton.cdiv(S * N, meta["ROWS"]),)](
        x, _or(branch, x), g, scale, shift, r if branch is not None else h, h, mean, rstd, S * N, N, D,
        max(branch_frames, h_frames, 1), _step(g), _step(scale), _step(shift), eps,
        HAS_BRANCH=branch is not None, HAS_GATE=gate is not None, B_BY_POS=branch is not None and branch_frames > 1,
        H_BY_POS=h_frames > 1, BLOCK_D=triton.next_power_of_2(D))
    return r, h, mean, rstd


@triton_op("gentron::add_norm_backward", mutates_args=())
def _add_norm_backward(dh: torch.Tensor, dr: Optional[torch.Tensor], r: torch.Tensor, branch: Optional[torch.Tensor],
                       gate: Optional[torch.Tensor], scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                       branch_frames: int, h_frames: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> d x, d branch (gated, or in the (B N, T) layout), per-group d scale, d shift, d gate (gated only)."""
    S, N, D = r.shape
    chunk = _chunk(S, N, r.device)
    splits = triton.cdiv(N, chunk)
    dx = torch.empty_like(r)
    by_pos = branch_frames > 1  # (the branch is None here unless gated: d branch needs no values of it)
    db = torch.empty_like(r) if gate is not None or by_pos else r.new_empty(0)
    pa, pc = (r.new_empty(S, splits, D, dtype=torch.float32) for _ in range(2))  # partial sums per chunk of tokens
    pg = torch.empty_like(pa) if gate is not None else pa.new_empty(0)
    g = _or(gate, scale)
    wrap_triton(_add_norm_bwd_kernel)[(S, splits)](
        dh, _or(dr, dh), r, _or(branch, r), g, scale, mean, rstd, dx, db if db.numel() else dx,
        pa, pc, pg if gate is not None else pa, N, D, max(branch_frames, h_frames, 1), _step(g), _step(scale),
        CHUNK=chunk, HAS_DR=dr is not None, HAS_GATE=gate is not None, B_BY_POS=by_pos, H_BY_POS=h_frames > 1,
        BLOCK_D=triton.next_power_of_2(D))
    return dx, db, pa.sum(1), pc.sum(1), pg.sum(1) if gate is not None else pg


def _setup(ctx, inputs, output):
    x, branch, gate, scale, shift, eps, branch_frames, h_frames = inputs
    r, h, mean, rstd = output
    # the branch only for d gate: an ungated branch's activations need not outlive the forward
    ctx.save_for_backward(r if branch is not None else x, branch if gate is not None else None, gate, scale, mean, rstd)
    ctx.has_branch = branch is not None
    ctx.frames = (branch_frames if branch is not None else 0, h_frames)
    ctx.dtypes = (scale.dtype, shift.dtype, None if gate is None else gate.dtype)
    ctx.shapes = (scale.shape, shift.shape, None if gate is None else gate.shape)


def _grad(ctx, dr, dh, _mean, _rstd):
    r, branch, gate, scale, mean, rstd = ctx.saved_tensors
    if dr is not None and dr.numel() == 0:
        dr = None
    dx, db, da, dc, dg = _add_norm_backward(dh.contiguous(), None if dr is None else dr.contiguous(), r, branch,
                                            gate, scale, mean, rstd, *ctx.frames)
    # (D,) inputs shared by all groups: their gradient is the sum over groups
    fit = lambda d, shape, dtype: (d if d.shape == shape else d.sum(0)).to(dtype)
    da, dc = fit(da, ctx.shapes[0], ctx.dtypes[0]), fit(dc, ctx.shapes[1], ctx.dtypes[1])
    if not ctx.has_branch:
        return dx, None, None, da, dc, None, None, None
    if gate is None:  # r = x + branch: d branch = d r, moved to the (B N, T) layout by the kernel if the branch is
        return dx, db if ctx.frames[0] > 1 else dx, None, da, dc, None, None, None
    return dx, db, fit(dg, ctx.shapes[2], ctx.dtypes[2]), da, dc, None, None, None


_add_norm.register_autograd(_grad, setup_context=_setup)


def add_norm(x, branch, gate, scale, shift, eps, branch_frames=0, h_frames=0):
    """(r, h) as in the module docstring, x of any (..., N, D) shape whose leading dims are the groups.
    branch_frames / h_frames = T: branch comes as / h goes as (B N, T, D), the groups being B T frames."""
    shape = x.shape
    gate = gate if branch is not None else None  # no branch, nothing to gate
    flat = lambda t: None if t is None else t.reshape(-1, *shape[-2:])  # (S, N, D); a (B N, T, D) one as a buffer
    rows = lambda t: t if t is None or t.dim() == 1 else t.reshape(-1, shape[-1])
    r, h, _, _ = _add_norm(flat(x).contiguous(), None if branch is None else flat(branch).contiguous(),
                           rows(gate), rows(scale), rows(shift), eps, branch_frames, h_frames)
    h = h.view(-1, h_frames, shape[-1]) if h_frames else h.view(shape)
    return (x if branch is None else r.view(shape)), h
