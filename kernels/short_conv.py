"""The short causal depthwise convolution of the mixer layers (width W, SiLU), on packed rows, fused.

``y_t = silu(sum_{s < W} w[:, W-1-s] * x_{t-s} * [pos_t >= s])`` for rows ``x [N, C]`` whose index
within their segment is ``pos [N]``: a tap never reaches into another segment (memory, sequence).
``weight [C, W]`` in the layout of torch's causal conv1d (``weight[c, j]`` multiplies ``x_{t-(W-1)+j}``).

One launch forward, one backward: ``dz = dy * silu'(z)`` (z recomputed) with per-row-block partial sums
of ``dweight``, and ``dx_t = sum_s dz_{t+s} w[:, W-1-s] [pos_{t+s} >= s]`` (row ``t+s`` is in ``t``'s
segment exactly when its position is at least ``s``). The shifted rows of ``dz`` come from the block's
own ``dz`` in registers (``tl.gather``) and, past the block's end, from a few halo rows recomputed; ``dz``
never goes through memory. Arithmetic in float32.

Axis letters: N rows, C channels, W taps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch

Tensor = torch.Tensor

BN, BC = 64, 128
BC_BWD = 64  # the backward holds about four [BN, BC] float32 tiles


@triton.jit
def _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C: tl.constexpr):
    """Rows ``o_n - s`` of ``x [N, C]`` where they are in the same segment (``pos_t >= s``), else 0."""
    m = m_n & (pos_t >= s)
    return tl.load(x + (o_n - s)[:, None] * C + o_c[None, :], mask=m[:, None] & m_c[None, :], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x, w, pos_t, o_n, o_c, m_n, m_c, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
                    BC: tl.constexpr):
    acc = tl.zeros([BN, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C) * b_w[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(x, w, pos, y, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_c = i_c * BC + tl.arange(0, BC)
    m_n = o_n < N
    m_c = o_c < C
    pos_t = tl.load(pos + o_n, mask=m_n, other=0)
    z = _pre_activation(x, w, pos_t, o_n, o_c, m_n, m_c, N, C, W, BN, BC)
    tl.store(y + o_n[:, None] * C + o_c[None, :], (z * tl.sigmoid(z)).to(y.dtype.element_ty),
             mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _dz_rows(x, w, pos, dy, o_r, o_c, m_c, N, C: tl.constexpr, W: tl.constexpr, BR: tl.constexpr,
             BC: tl.constexpr):
    """``dz = dy * silu'(z)`` at rows ``o_r`` (z recomputed; 0 past N) and those rows' positions."""
    m_r = o_r < N
    pos_r = tl.load(pos + o_r, mask=m_r, other=0)
    z = _pre_activation(x, w, pos_r, o_r, o_c, m_r, m_c, N, C, W, BR, BC)
    sig = tl.sigmoid(z)
    b_dy = tl.load(dy + o_r[:, None] * C + o_c[None, :], mask=m_r[:, None] & m_c[None, :], other=0.0)
    return b_dy.to(tl.float32) * sig * (1.0 + z * (1.0 - sig)), pos_r


@triton.jit
def _conv_bwd_kernel(x, w, pos, dy, dx, dw_part, N, C: tl.constexpr, W: tl.constexpr, BN: tl.constexpr,
                     BC: tl.constexpr, HB: tl.constexpr):
    """``dx`` of a row block and its part of ``dweight`` (``dw_part [NB, W, C]``, tap ``s`` at index ``s``).
    ``dx_t`` needs ``dz_{t+s}``: rows of the block are shifted within registers (``tl.gather``), the
    ``W - 1`` rows after the block come from ``dz`` recomputed for ``HB`` halo rows."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    o_c = i_c * BC + tl.arange(0, BC)
    m_n = o_n < N
    m_c = o_c < C
    b_dz, pos_t = _dz_rows(x, w, pos, dy, o_n, o_c, m_c, N, C, W, BN, BC)
    for s in tl.static_range(W):
        part = tl.sum(b_dz * _tap(x, pos_t, o_n, o_c, m_n, m_c, s, N, C), axis=0)
        tl.store(dw_part + (i_n * W + s) * C + o_c, part, mask=m_c)
    b_dzh, _ = _dz_rows(x, w, pos, dy, i_n * BN + BN + tl.arange(0, HB), o_c, m_c, N, C, W, HB, BC)
    acc = b_dz * tl.load(w + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)[None, :]
    r = tl.arange(0, BN)
    for s in tl.static_range(1, W):  # row t + s is in row t's segment exactly when its position is >= s
        src = r + s
        inside = src < BN
        i_in = tl.broadcast_to(tl.where(inside, src, 0)[:, None], [BN, BC])
        i_halo = tl.broadcast_to(tl.where(inside, 0, src - BN)[:, None], [BN, BC])
        b_dzs = tl.where(inside[:, None], tl.gather(b_dz, i_in, 0), tl.gather(b_dzh, i_halo, 0))
        pos_s = tl.load(pos + o_n + s, mask=(o_n + s) < N, other=0)
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        acc += tl.where((pos_s >= s)[:, None], b_dzs, 0.0) * b_w[None, :]
    tl.store(dx + o_n[:, None] * C + o_c[None, :], acc.to(dx.dtype.element_ty), mask=m_n[:, None] & m_c[None, :])


class ShortConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, position):
        N, C = x.shape
        W = weight.shape[1]
        y = torch.empty_like(x)
        if N:
            opts = launch("conv.fwd", BN=BN, BC=BC)
            grid = (triton.cdiv(N, opts["BN"]), triton.cdiv(C, opts["BC"]))
            _conv_fwd_kernel[grid](x, weight, position, y, N, C=C, W=W, **opts)
        ctx.save_for_backward(x, weight, position)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, position = ctx.saved_tensors
        N, C = x.shape
        W = weight.shape[1]
        if N == 0:
            return torch.zeros_like(x), torch.zeros_like(weight), None
        dy = dy.contiguous()
        opts = launch("conv.bwd", BN=BN, BC=BC_BWD)
        grid = (triton.cdiv(N, opts["BN"]), triton.cdiv(C, opts["BC"]))
        dw_part = x.new_empty(grid[0], W, C, dtype=torch.float32)
        dx = torch.empty_like(x)
        _conv_bwd_kernel[grid](x, weight, position, dy, dx, dw_part, N, C=C, W=W,
                               HB=max(2, triton.next_power_of_2(W - 1)), **opts)
        dw = dw_part.sum(0).flip(0).t().to(weight.dtype)  # tap s -> weight column W - 1 - s
        return dx, dw, None


def short_conv(x: Tensor, weight: Tensor, position: Tensor) -> Tensor:
    """``x [N, C]`` (float32, float16 or bfloat16), ``weight [C, W]``, ``position [N]`` (int: each row's
    index within its segment) -> ``silu(causal depthwise conv) [N, C]``, differentiable in x and weight."""
    from ._common import check_dtype, interpreter_compat

    check_dtype(x, weight)
    interpreter_compat()
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or position.shape != x.shape[:1]:
        raise ValueError(f"short_conv takes x [N, C], weight [C, W], position [N]; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(position.shape)}")
    # the weight in its own dtype (float32 parameters under autocast): read as float32, its gradient in that dtype
    return ShortConvFn.apply(x.contiguous(), weight.contiguous(), position.contiguous())
