"""Dispatch and combine of the MoM layer on packed rows, fused: no ``[tokens * k', C]`` slot grid.

Each token has ``k'`` slots (its routed memories, and the shared one); a used slot is one packed row.
``inverse [tokens * k']`` names the row of each slot (-1 for a slot that holds none), ``token [N]``
the token of each row.

* ``slot_sum(rows, inverse, weight)``: ``out[t] = sum_j weight[r] rows[r]`` over the rows ``r`` of
  token ``t``'s slots (weight 1 where ``weight`` is None). The combine's forward, and the backward
  of the row gather ``x[token]``: each token's gradient is the sum of its rows' (no scatter-add, so
  deterministic).
* ``combine(rows, weight, token, inverse)``, differentiable: ``slot_sum`` forward; backward
  ``drows[r] = weight[r] dout[token[r]]`` and ``dweight[r] = <rows[r], dout[token[r]]>``, one kernel.
* ``gather(x, token, inverse)``, differentiable: ``x[token]`` forward, ``slot_sum`` backward.

Arithmetic in float32; outputs in the rows' dtype. Axis letters: N rows, C channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, interpreter_compat, launch, pow2

Tensor = torch.Tensor

BTOK, BC = 16, 256  # tokens x channels per program of slot_sum
BN_BWD = 16  # rows per program of the combine backward


@triton.jit
def _slot_sum_kernel(rows, inverse, weight, out, n_tok, C: tl.constexpr, K: tl.constexpr, BTOK: tl.constexpr,
                     BC: tl.constexpr, WEIGHTED: tl.constexpr):
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BTOK + tl.arange(0, BTOK)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t = o_t < n_tok
    m_c = o_c < C
    acc = tl.zeros([BTOK, BC], dtype=tl.float32)
    for j in tl.static_range(K):
        r = tl.load(inverse + o_t * K + j, mask=m_t, other=-1)
        m_r = r >= 0
        r = tl.where(m_r, r, 0).to(tl.int64)
        b = tl.load(rows + r[:, None] * C + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
        if WEIGHTED:
            b_w = tl.load(weight + r, mask=m_r, other=0.0).to(tl.float32)
            acc += b.to(tl.float32) * b_w[:, None]
        else:
            acc += b.to(tl.float32)
    tl.store(out + o_t.to(tl.int64)[:, None] * C + o_c[None, :], acc.to(out.dtype.element_ty),
             mask=m_t[:, None] & m_c[None, :])


@triton.jit
def _combine_bwd_kernel(rows, weight, token, dout, drows, dweight, N, C: tl.constexpr, BN: tl.constexpr,
                        BC: tl.constexpr, NEED_DW: tl.constexpr):
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    m_n = o_n < N
    t = tl.load(token + o_n, mask=m_n, other=0).to(tl.int64)
    b_w = tl.load(weight + o_n, mask=m_n, other=0.0).to(tl.float32)
    o_r = o_n.to(tl.int64)
    dot = tl.zeros([BN], dtype=tl.float32)
    for c0 in tl.static_range(0, C, BC):
        o_c = c0 + tl.arange(0, BC)
        m = m_n[:, None] & (o_c < C)[None, :]
        b_do = tl.load(dout + t[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(drows + o_r[:, None] * C + o_c[None, :], (b_do * b_w[:, None]).to(drows.dtype.element_ty), mask=m)
        if NEED_DW:
            b_x = tl.load(rows + o_r[:, None] * C + o_c[None, :], mask=m, other=0.0).to(tl.float32)
            dot += tl.sum(b_x * b_do, axis=1)
    if NEED_DW:
        tl.store(dweight + o_n, dot, mask=m_n)


def slot_sum(rows: Tensor, inverse: Tensor, weight: Tensor | None, slots: int) -> Tensor:
    """``rows [N, C]``, ``inverse [T * slots]`` (row of each slot, -1 for none), ``weight [N]`` or None
    -> ``[T, C]`` in the rows' dtype: each token's weighted sum of its rows (0 for a token with none)."""
    C = rows.shape[1]
    n_tok = inverse.numel() // slots
    out = rows.new_empty(n_tok, C)
    if n_tok:
        bc = min(BC, pow2(C))
        grid = (triton.cdiv(n_tok, BTOK), triton.cdiv(C, bc))
        _slot_sum_kernel[grid](rows, inverse, weight if weight is not None else rows, out, n_tok, C=C, K=slots,
                               BTOK=BTOK, BC=bc, WEIGHTED=weight is not None, **launch("slots.sum"))
    return out


class CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, token, inverse, slots):
        ctx.save_for_backward(rows if ctx.needs_input_grad[1] else None, weight, token)
        return slot_sum(rows, inverse, weight, slots)

    @staticmethod
    def backward(ctx, dout):
        rows, weight, token = ctx.saved_tensors
        need_dw = rows is not None
        N = token.numel()
        C = dout.shape[1]
        dout = dout.contiguous()
        drows = dout.new_empty(N, C)
        dweight = weight.new_empty(N, dtype=torch.float32) if need_dw else None
        if N:
            _combine_bwd_kernel[(triton.cdiv(N, BN_BWD),)](
                rows if need_dw else drows, weight, token, dout, drows, dweight if need_dw else weight, N, C=C,
                BN=BN_BWD, BC=min(BC, pow2(C)), NEED_DW=need_dw, **launch("slots.combine_bwd"))
        return drows, None if dweight is None else dweight.to(weight.dtype), None, None, None


class GatherFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token, inverse, slots):
        ctx.save_for_backward(inverse)
        ctx.slots = slots
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return slot_sum(grad.contiguous(), inverse, None, ctx.slots), None, None, None


def _check(name: str, x: Tensor, token: Tensor, inverse: Tensor, slots: int) -> None:
    check_dtype(x)
    interpreter_compat()
    if x.dim() != 2 or token.dim() != 1 or inverse.dim() != 1 or inverse.numel() % slots:
        raise ValueError(f"{name} takes a [rows, C] tensor, token [N] and inverse [tokens * {slots}]; got "
                         f"{tuple(x.shape)}, {tuple(token.shape)}, {tuple(inverse.shape)}")


def combine(rows: Tensor, weight: Tensor, token: Tensor, inverse: Tensor, slots: int) -> Tensor:
    """``[N, C]`` rows -> ``[tokens, C]``: each token's ``weight``-weighted sum of its rows; differentiable
    in rows and weight."""
    _check("combine", rows, token, inverse, slots)
    if weight.shape != token.shape:
        raise ValueError(f"combine: weight must have shape {tuple(token.shape)}, got {tuple(weight.shape)}")
    return CombineFn.apply(rows.contiguous(), weight.contiguous(), token, inverse, slots)


def gather(x: Tensor, token: Tensor, inverse: Tensor, slots: int) -> Tensor:
    """``x [tokens, C]`` -> rows ``x[token] [N, C]``; the gradient of each token sums its rows'."""
    _check("gather", x, token, inverse, slots)
    return GatherFn.apply(x.contiguous(), token, inverse, slots)
