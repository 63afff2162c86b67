"""fla (flash-linear-attention 0.6.0) on CPU, as a reference: its layer code runs unchanged, with only its
Triton entry points swapped for torch references (fla's own naive gated delta rule per segment; a
depthwise causal convolution + SiLU per segment; the norms' formulas) and a stable sort.

Skipped where fla is not installed (``pip install 'momkit[interop]'``), unless ``MOMKIT_REQUIRE_INTEROP``
is set (CI), where a missing fla fails instead.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F


def _require_fla():
    from momkit.interop import InteropError, fla_mom_attention

    try:
        return fla_mom_attention()
    except InteropError as e:
        if os.environ.get("MOMKIT_REQUIRE_INTEROP"):
            pytest.fail(f"MOMKIT_REQUIRE_INTEROP is set and fla is missing: {e}")
        pytest.skip(str(e))


def _segments(cu_seqlens, T):
    cu = [0, T] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    return list(itertools.pairwise(cu))


def naive_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False,
                                 use_qk_l2norm_in_kernel=False, state_v_first=False, cu_seqlens=None, **_):
    """fla's ``naive_recurrent_gated_delta_rule`` on each segment of packed input ``[1, T, H, *]``."""
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    assert initial_state is None and not output_final_state, "the CPU reference runs without a cache"
    if use_qk_l2norm_in_kernel:  # fla's l2norm: x / sqrt(||x||^2 + 1e-6)
        q, k = (x / torch.sqrt((x.float() * x.float()).sum(-1, keepdim=True) + 1e-6).to(x.dtype) for x in (q, k))
    outs = []
    for b in range(q.shape[0]):
        for a, e in _segments(cu_seqlens, q.shape[1]):
            o, _ = naive_recurrent_gated_delta_rule(q[b:b + 1, a:e], k[b:b + 1, a:e], v[b:b + 1, a:e],
                                                    beta[b:b + 1, a:e], g[b:b + 1, a:e])
            outs.append(o.to(v.dtype))
    o = torch.cat(outs, 1).view(*v.shape)
    return o, None


def naive_short_conv(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None, **_):
    """Depthwise causal convolution + the module's activation, on each segment (``x [B, T, D]``)."""
    assert cache is None and residual is None
    if mask is not None:
        x = x * mask[..., None]
    W = self.kernel_size[0]
    w = self.weight[:, 0, :]  # [D, W]: w[:, j] multiplies x[t - (W - 1) + j]
    outs = []
    for b in range(x.shape[0]):
        for a, e in _segments(cu_seqlens, x.shape[1]):
            seg = F.pad(x[b, a:e].transpose(0, 1)[None], (W - 1, 0))  # [1, D, W - 1 + L]
            y = F.conv1d(seg, w[:, None, :], self.bias, groups=w.shape[0])[0].transpose(0, 1)
            outs.append(F.silu(y) if self.activation in ("silu", "swish") else y)
    return torch.cat(outs, 0).view(*x.shape), None


def naive_rms_norm_gated(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    assert residual is None and not prenorm
    xf, gf = x.float(), g.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
    return (y * gf * torch.sigmoid(gf)).to(x.dtype)


def naive_rms_norm(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)
    return (y, x) if prenorm else y


@pytest.fixture
def fla_cpu_as_is(monkeypatch):
    """fla's MomAttention class, runnable on CPU for the duration of a test, its sort left as it is."""
    MomAttention = _require_fla()
    import fla.layers.mom as mom
    from fla.modules import FusedRMSNormGated, RMSNorm, ShortConvolution

    monkeypatch.setattr(mom, "chunk_gated_delta_rule", naive_chunk_gated_delta_rule)
    monkeypatch.setattr(ShortConvolution, "forward", naive_short_conv)
    monkeypatch.setattr(FusedRMSNormGated, "forward", naive_rms_norm_gated)
    monkeypatch.setattr(RMSNorm, "forward", naive_rms_norm)
    import fla.modules.mlp as mlp

    monkeypatch.setattr(mlp, "swiglu", lambda gate, y: F.silu(gate.float()).to(gate.dtype) * y)
    return MomAttention


@pytest.fixture
def fla_cpu(fla_cpu_as_is, monkeypatch):
    """fla's MomAttention class, runnable on CPU for the duration of a test, with a stable sort."""
    MomAttention = fla_cpu_as_is
    argsort = torch.Tensor.argsort

    def stable_argsort(self, dim=-1, descending=False, stable=True):
        return argsort(self, dim=dim, descending=descending, stable=stable)

    # fla sorts the routed tokens with an unstable argsort (docs/mom.md): a stable one keeps time order
    monkeypatch.setattr(torch.Tensor, "argsort", stable_argsort)
    return MomAttention
