"""Row normalisations of the mixer layers, fused (one launch forward, one backward), float32 arithmetic.

* ``l2_norm(x)``: ``x / sqrt(||x||^2 + eps)`` over the last axis (the delta rules' and titans' q, k).
  Backward: ``dx = r (dy - y <dy, y>)`` with ``r = (||x||^2 + eps)^{-1/2}``, from the output ``y`` and
  ``r`` (float32, one per row): the rule saves ``y`` anyway, so the norm adds no copy of its input.
* ``rms_norm(x, weight)``: ``x r w`` (the blocks' pre-norms), and ``gated_rms_norm(x, gate, weight)``:
  ``x r w ∘ silu(gate)``, ``r = (mean(x^2) + eps)^{-1/2}`` over
  the last axis (one head's value channels; ``weight`` shared by the heads). Backward, with
  ``n = x r`` and ``dn = dy ∘ silu(gate) ∘ w``: ``dx = r (dn - n mean(dn ∘ n))``,
  ``dgate = dy ∘ n w ∘ silu'(gate)``, ``dw = sum over rows of dy ∘ silu(gate) ∘ n`` (per-program
  partial sums, added up by torch).

Rows: every leading axis flattened, ``[R, D]`` with D <= 2048 (one row per block of BR rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, launch, pow2

Tensor = torch.Tensor
MAX_DIM = 2048  # values per row: one row is one block


def _rows(D: int) -> int:
    """Rows per program: about 4K values."""
    return max(1, min(64, 4096 // pow2(D)))


@triton.jit
def _load_rows(x, o_r, o_d, m, D: tl.constexpr):
    return tl.load(x + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def _l2_fwd_kernel(x, y, rs, R, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = _load_rows(x, o_r, o_d, m, D)
    r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + eps)
    tl.store(y + o_r[:, None] * D + o_d[None, :], (b_x * r[:, None]).to(y.dtype.element_ty), mask=m)
    tl.store(rs + o_r, r, mask=o_r < R)


@triton.jit
def _l2_bwd_kernel(y, rs, dy, dx, R, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_y = _load_rows(y, o_r, o_d, m, D)
    b_dy = _load_rows(dy, o_r, o_d, m, D)
    r = tl.load(rs + o_r, mask=o_r < R, other=0.0)
    b_dx = r[:, None] * (b_dy - b_y * tl.sum(b_dy * b_y, axis=1)[:, None])
    tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)


@triton.jit
def _rms_fwd_kernel(x, gate, w, y, R, eps, D: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
                    GATED: tl.constexpr):
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = _load_rows(x, o_r, o_d, m, D)
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_y = b_x * r[:, None] * b_w[None, :]
    if GATED:
        b_g = _load_rows(gate, o_r, o_d, m, D)
        b_y *= b_g * tl.sigmoid(b_g)
    tl.store(y + o_r[:, None] * D + o_d[None, :], b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(x, gate, w, dy, dx, dgate, dw_part, R, eps, D: tl.constexpr, BR: tl.constexpr,
                    BD: tl.constexpr, GATED: tl.constexpr):
    i_p = tl.program_id(0)
    o_r = i_p * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    b_x = _load_rows(x, o_r, o_d, m, D)
    b_dy = _load_rows(dy, o_r, o_d, m, D)
    b_w = tl.load(w + o_d, mask=o_d < D, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / D + eps)
    b_n = b_x * r[:, None]
    if GATED:
        b_g = _load_rows(gate, o_r, o_d, m, D)
        sig = tl.sigmoid(b_g)
        b_da = b_dy * (b_g * sig)  # gradient of n * w
        b_dg = b_dy * b_n * b_w[None, :] * sig * (1.0 + b_g * (1.0 - sig))
        tl.store(dgate + o_r[:, None] * D + o_d[None, :], b_dg.to(dgate.dtype.element_ty), mask=m)
    else:
        b_da = b_dy
    b_dn = b_da * b_w[None, :]
    b_dx = r[:, None] * (b_dn - b_n * (tl.sum(b_dn * b_n, axis=1) / D)[:, None])
    tl.store(dx + o_r[:, None] * D + o_d[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
    tl.store(dw_part + i_p * D + o_d, tl.sum(b_da * b_n, axis=0), mask=o_d < D)


def _prep(x: Tensor) -> tuple[Tensor, int, int, int, int]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    BR = _rows(D)
    return x2, x2.shape[0], D, BR, triton.cdiv(x2.shape[0], BR)


class L2NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        x2, R, D, BR, grid = _prep(x)
        y = torch.empty_like(x2)
        rs = x2.new_empty(R, dtype=torch.float32)
        if R:
            _l2_fwd_kernel[(grid,)](x2, y, rs, R, eps, D=D, BR=BR, BD=pow2(D, 1), **launch("norm.l2_fwd"))
        ctx.save_for_backward(y, rs)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        y, rs = ctx.saved_tensors
        R, D = y.shape
        BR = _rows(D)
        dy2 = dy.reshape(R, D).contiguous()
        dx = torch.empty_like(y)
        if R:
            _l2_bwd_kernel[(triton.cdiv(R, BR),)](y, rs, dy2, dx, R, D=D, BR=BR, BD=pow2(D, 1),
                                                  **launch("norm.l2_bwd"))
        return dx.view(ctx.shape), None


class RMSNormFn(torch.autograd.Function):
    """``x r w`` (gate None) or ``x r w ∘ silu(gate)``; the output in the dtype of ``x``."""

    @staticmethod
    def forward(ctx, x, gate, weight, eps):
        x2, R, D, BR, grid = _prep(x)
        g2 = None if gate is None else gate.reshape(R, D).contiguous()
        y = torch.empty_like(x2)
        if R:
            _rms_fwd_kernel[(grid,)](x2, g2, weight, y, R, eps, D=D, BR=BR, BD=pow2(D, 1), GATED=g2 is not None,
                                     **launch("norm.rms_fwd"))
        ctx.save_for_backward(x2, g2, weight)
        ctx.eps, ctx.shape = eps, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, g2, weight = ctx.saved_tensors
        R, D = x2.shape
        BR = _rows(D)
        grid = triton.cdiv(R, BR)
        dy2 = dy.reshape(R, D).contiguous()
        dx = torch.empty_like(x2)
        dg = None if g2 is None else torch.empty_like(g2)
        dw_part = x2.new_zeros(max(grid, 1), D, dtype=torch.float32)
        if R:
            _rms_bwd_kernel[(grid,)](x2, g2, weight, dy2, dx, dg, dw_part, R, ctx.eps, D=D, BR=BR, BD=pow2(D, 1),
                                     GATED=g2 is not None, **launch("norm.rms_bwd"))
        return dx.view(ctx.shape), None if dg is None else dg.view(ctx.shape), dw_part.sum(0).to(weight.dtype), None


def _check(name: str, x: Tensor) -> None:
    from ._common import check_dtype, interpreter_compat

    check_dtype(x)
    interpreter_compat()
    if x.shape[-1] > MAX_DIM:
        raise ValueError(f"{name}: rows of at most {MAX_DIM} values, got a last axis of {x.shape[-1]}")


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / sqrt(||x||^2 + eps)`` over the last axis, in the dtype of ``x`` (float32 arithmetic)."""
    _check("l2_norm", x)
    return L2NormFn.apply(x, float(eps))


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x (mean(x^2) + eps)^{-1/2} weight ∘ silu(gate)`` over the last axis (``weight [D]``), in the
    dtype of ``x``."""
    _check("gated_rms_norm", x)
    check_dtype(gate, weight)
    if gate.shape != x.shape or weight.shape != x.shape[-1:]:
        raise ValueError(f"gated_rms_norm takes x and gate of one shape and weight [D]; got {tuple(x.shape)}, "
                         f"{tuple(gate.shape)}, {tuple(weight.shape)}")
    return RMSNormFn.apply(x, gate, weight.contiguous(), float(eps))  # any float dtypes: read as float32


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x (mean(x^2) + eps)^{-1/2} weight`` over the last axis (``weight [D]``), in the dtype of ``x``."""
    _check("rms_norm", x)
    check_dtype(weight)
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm takes weight [D] for x [..., D]; got {tuple(x.shape)}, {tuple(weight.shape)}")
    return RMSNormFn.apply(x, None, weight.contiguous(), float(eps))
