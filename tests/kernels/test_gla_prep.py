"""gla's prep kernel (``kernels/gated_linear/gla.py``) against its definition in float64.

The chunked op's tests (test_chunk_kernels.py) see these intermediates only through the outputs and
gradients; here each one is compared on its own, so a wrong one is named: the intra-chunk scores
``A`` on and below the diagonal, ``q ∘ exp(G)``, ``k ∘ exp(G_C - G)`` and ``exp(G_C)``, with ``G``
the decay summed from the chunk start (inclusive) and ``G_C`` its value at the chunk's last token.
Tolerance: ``16 u max |ref|`` per tensor (u = 2^-24: float32 sums in another order) and, for
bfloat16 inputs, the kernel's roundings to bfloat16 on top: of the stored ``qg``, ``kg`` (one rounding)
and of both factors of each off-diagonal score product (two, times the scores of ``|q|``, ``|k|``).
A rounding costs up to ``2^-7 |x|``: a whole unit in the last place, not half, because the CPU
interpreter converts float32 to bfloat16 by truncation.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from momkit.kernels import _common
from momkit.kernels._common import CHUNK, chunk_meta, interpreter_compat
from momkit.kernels.gated_linear.gla import gla_prep

F64 = torch.float64


def reference(q, k, g, cu):
    """``(A [Ttot, H, C], qg, kg [Ttot, H, K], gC [NT, H, K])`` in float64, chunk by chunk."""
    q, k, g = q.to(F64), k.to(F64), g.to(F64)
    Ttot, H, _ = q.shape
    A = torch.zeros(Ttot, H, CHUNK, dtype=F64)
    qg, kg, gC = torch.empty_like(q), torch.empty_like(k), []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for t0 in range(a, b, CHUNK):
            t1 = min(t0 + CHUNK, b)
            G = g[t0:t1].cumsum(0)  # [n, H, K]
            n = t1 - t0
            D = G[:, None] - G[None, :]  # [i, j, H, K]: sum_{j < r <= i} g_r
            causal = torch.ones(n, n, dtype=torch.bool).tril()
            S = torch.einsum("ihd,jhd,ijhd->ihj", q[t0:t1], k[t0:t1], torch.where(causal[..., None, None], D, 0).exp())
            A[t0:t1, :, :n] = S * causal[:, None, :]
            qg[t0:t1] = q[t0:t1] * G.exp()
            kg[t0:t1] = k[t0:t1] * (G[-1:] - G).exp()
            gC.append(G[-1].exp())
    return A, qg, kg, torch.stack(gC)


@pytest.mark.parametrize(("dtype", "K", "BK"), [
    (torch.float32, 20, None), (torch.float32, 72, None), (torch.bfloat16, 20, None), (torch.bfloat16, 72, None),
    (torch.float32, 72, 16),  # a launch option (gpu_debug --launch gl.gla_prep:BK=16): five parts of A
], ids=["fp32-20", "fp32-72", "bf16-20", "bf16-72", "fp32-72-BK16"])
def test_gla_prep_matches_definition(device, dtype, K, BK, request, monkeypatch):
    """Segments of 1, 70 and 130 tokens (full chunks, partial chunks, partial sub-chunks), mild decays
    (the differences of prefix sums in the float64 reference stay exact enough)."""
    if BK is not None:
        monkeypatch.setitem(_common.LAUNCH, "gl.gla_prep", {"BK": BK})
    gen = torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
    cu = torch.tensor([0, 1, 71, 201])
    Ttot, H = int(cu[-1]), 2
    q = torch.randn(Ttot, H, K, generator=gen).to(dtype)
    k = torch.randn(Ttot, H, K, generator=gen).to(dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(Ttot, H, K, generator=gen) + 2).to(dtype)
    meta = chunk_meta(1, Ttot, cu, CHUNK, torch.device(device))
    interpreter_compat()  # as the binding does before a launch
    got = gla_prep(q.to(device), k.to(device), g.to(device), meta)
    if BK is not None:
        assert got[0].shape[0] == -(-K // BK), "the key block launch option is not honoured"
    ref = reference(q, k, g, cu)
    bf16 = dtype == torch.bfloat16
    rounding = {"A": 2 * 2.0**-7 * reference(q.abs(), k.abs(), g, cu)[0], "qg": 2.0**-7 * ref[1].abs(),
                "kg": 2.0**-7 * ref[2].abs(), "gC": 0.0}
    for name, x, r in zip(["A", "qg", "kg", "gC"], got, ref):
        x = x.cpu().double()
        if name == "A":  # parts per key block, summed; above the diagonal nothing is written (readers mask)
            x = x.sum(0)
            pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]) % CHUNK
            causal = torch.arange(CHUNK)[None, :] <= pos[:, None]
            x = torch.where(causal[:, None, :], x, 0.0)
        tol = 16 * 2.0**-24 * r.abs().max().item() + (rounding[name] if bf16 else 0.0)
        assert torch.isfinite(x).all(), f"{name}: non-finite values (an unwritten element is NaN)"
        excess = (x - r).abs() - tol
        i = int(excess.argmax())
        assert excess.max() <= 0, (f"{name} (K={K}, {dtype}): error {(x - r).abs().flatten()[i]:.3e} at flat index "
                                   f"{i} (shape {tuple(r.shape)}) exceeds its tolerance by {excess.max():.3e}")
