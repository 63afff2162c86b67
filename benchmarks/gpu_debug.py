"""Device diagnostic for the delta family's backward: which kernel goes wrong, under which launch options.

    CUDA_LAUNCH_BLOCKING=1 python -m benchmarks.gpu_debug --rule deltanet --shape 70x32x32 \
        [--launch delta.wy_bwd:num_warps=2 ...]

Runs the backward chain of ``DeltaChunk`` kernel by kernel on bf16 inputs and on float32 copies of
them, synchronising after each kernel, and prints for every intermediate whether it is finite, its
largest value and its largest difference from the float32 chain (a debugging comparison, not a
test: the tests compare with the float64 token loop). Launch options (``momkit.kernels._common.LAUNCH``)
can be overridden per kernel; run one configuration per process, since an illegal memory access
poisons the CUDA context.
"""

from __future__ import annotations

import argparse

import torch
import triton
from momkit.kernels import _common
from momkit.kernels._common import CHUNK, chunk_meta, dots, launch, pow2
from momkit.kernels.delta import chunk as dc
from momkit.kernels.gated_linear.chunk import bwd_dv

from momkit.rules import get_rule
from momkit.testing import random_inputs


def chain(q, k, v, beta, g, do, scale):
    """The steps of DeltaChunk.backward (no initial or final state), returning every intermediate."""
    Ttot, H, K = q.shape
    V = v.shape[-1]
    meta = chunk_meta(1, Ttot, None, CHUNK, q.device)
    gated = g is not None
    out = {}

    def sync(name, x):
        torch.cuda.synchronize()
        out[name] = x
        print(f"  ok: {name}", flush=True)

    Tm, w, u, _ = dc.wy_fwd(k, v, beta, g, meta)
    sync("T", Tm)
    sync("w", w)
    _, w, u, u_off = dc.wy_fwd(k, v, beta, g, meta, Tm, u_off=gated)
    h, v_new, _, vr = dc.delta_fwd_h(k, w, u, g, None, False, meta, u_off)
    sync("h", h)
    sync("v_new", v_new)
    dv_local = bwd_dv(q, k, g, None, None, do, None, int(gated), scale, meta, u.dtype, V, no_diag=gated)
    sync("dv_local", dv_local)
    BK = pow2(K)
    BV = dc._state_bv(BK, V)
    NT = meta.num_chunks
    dh = q.new_empty(NT, H, K, V, dtype=u.dtype)
    dv_tot = torch.empty_like(u)
    du_inter = torch.empty_like(u) if gated else None
    s_part = q.new_zeros(triton.cdiv(V, BV), NT, H, 1, dtype=torch.float32) if gated else None
    dc._bwd_dh_kernel[(H, triton.cdiv(V, BV))](
        q, k, w, g, do, h, dv_local, dh, dv_tot, du_inter, None, None, s_part, meta.cu, meta.chunk_offsets, scale, NT,
        H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, GATED=gated, USE_DHT=False, STORE_DH0=False, **dots(q.dtype, False),
        **launch("delta.bwd_dh", num_stages=_common.state_stages(BK, u.dtype)))
    sync("dh", dh)
    sync("dv_tot", dv_tot)
    BKb, BVb = min(64, pow2(K)), min(64, pow2(V))
    NK = triton.cdiv(K, BKb)
    dq = q.new_empty(q.shape)
    dk_part = q.new_empty(Ttot, H, K, dtype=torch.float32)
    dw = q.new_empty(Ttot, H, K, dtype=torch.float32)
    a_part = q.new_empty(NK + 1, Ttot, H, dtype=torch.float32) if gated else None
    dc._bwd_dqkw_kernel[(NT, H, NK)](q, k, v_new, vr, g, h, do, dh, dv_tot, dq, dk_part, dw, a_part, meta.cu,
                                     meta.chunk_indices, scale, Ttot, H=H, K=K, V=V, BT=CHUNK, BK=BKb, BV=BVb,
                                     GATED=gated, **dots(q.dtype), **launch("delta.bwd_dqkw"))
    sync("dq", dq)
    sync("dk_part", dk_part)
    sync("dw", dw)
    dk, dv, dbeta = k.new_empty(k.shape), v.new_empty(v.shape), beta.new_empty(beta.shape)
    b_tok = q.new_empty(Ttot, H, dtype=torch.float32) if gated else None
    scratch = q.new_empty(NT, H, CHUNK, CHUNK, dtype=torch.float32)
    dc._wy_bwd_kernel[(NT, H)](q, k, v, beta, g, Tm, do, dw, dv_local if gated else dv_tot, du_inter, dk_part, dk, dv,
                               dbeta, None if a_part is None else a_part[NK], b_tok, scratch, meta.cu,
                               meta.chunk_indices, scale, H=H, K=K, V=V, BT=CHUNK, BK=BKb, BV=BVb, GATED=gated,
                               **dots(q.dtype), **launch("delta.wy_bwd"))
    sync("dk", dk)
    sync("dv", dv)
    sync("dbeta", dbeta)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="deltanet")
    ap.add_argument("--shape", default="70x32x32")
    ap.add_argument("--launch", nargs="*", default=[], help="kernel:option=value")
    args = ap.parse_args()
    for item in args.launch:
        kern, opt = item.split(":")
        key, val = opt.split("=")
        _common.LAUNCH.setdefault(kern, {})[key] = int(val)
    T, K, V = (int(x) for x in args.shape.split("x"))
    rule = get_rule(args.rule)
    q, k, v, gates = random_inputs(rule, 1, T, 2, K, V, torch.bfloat16, seed=1)
    do = torch.randn(1, T, 2, V).to(torch.bfloat16)

    def flat(x):
        return x.reshape(T, *x.shape[2:]).contiguous().cuda()

    args_b = [flat(x) for x in (q, k, v, gates["beta"])] + [flat(gates["g"]) if "g" in gates else None, flat(do)]
    args_f = [None if x is None else x.float() for x in args_b]
    tag = f"{args.rule} {args.shape} {args.launch or 'baseline'}"
    try:
        res_b = chain(*args_b, K**-0.5)
        res_f = chain(*args_f, K**-0.5)
    except Exception as e:  # with CUDA_LAUNCH_BLOCKING=1 the failing launch is the last kernel in the traceback
        import traceback

        where = [f.name for f in traceback.extract_tb(e.__traceback__) if f.filename.endswith("chunk.py")]
        print(f"{tag}: {type(e).__name__} in {where[-1:] or '?'} after {len(where)} frames: {str(e)[:120]}")
        return
    for name in res_b:
        a, b = res_b[name].float(), res_f[name].float()
        print(f"{tag:<48} {name:<9} finite={bool(torch.isfinite(a).all())!s:<5} max={a.abs().max().item():9.3e} "
              f"diff_vs_fp32={(a - b).abs().max().item():9.3e}")


if __name__ == "__main__":
    main()
