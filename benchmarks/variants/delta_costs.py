"""What the steps of the delta rules' kernels (and of the gated linear forward) cost: each variant but ``base``
drops a step (wrong values on purpose), changes a launch or computes a step another way; timing only: a variant
goes into the kernels after the GPU tests pass with it.

    python3 -m benchmarks.kernel_variants --spec benchmarks/variants/delta_costs.py --rules gated_deltanet,deltanet \\
        --shape 4x4096x4x256x256

tests/test_benchmarks.py checks that every edit still applies to the current kernels.
"""

from pathlib import Path

CH = "delta/chunk.py"
GL = "gated_linear/chunk.py"
ST = "delta/state.py"

# the forward state pass's choice of value-block width (the reverse pass's launcher has the same first line)
_FWD_BV = ("BV=_value_block(meta, H, V, k.device), GC=GC_DEFAULT)\n"
           "    BV, GC = opts.pop(\"BV\"), _use_gc(opts, g, gc)\n    h = k.new_empty")


_DQKW_B = "BKb, BVb = min(64, pow2(K)), min(64, pow2(V))"
_DQKW_W = 'launch("delta.bwd_dqkw", **({"num_warps": 8} if min(K, V) >= 256 else {}))'
_WY_W = 'launch("delta.wy_bwd", num_warps=2, BK=min(32, pow2(K)), BV=16)'
_GL_FWD_H_W = 'launch("gl.fwd_h", num_warps=8 if gate == 1 else 4)'
_GL_FWD_H_B = "BK, BV = _state_blocks(K, V)\n    h = k.new_empty"
_GL_FWD_O = 'launch("gl.fwd_o", BV=_value_block(V), BK=min(64, pow2(K)))'


_src = (Path(__file__).resolve().parents[2] / "kernels" / CH).read_text()
# the dqkw kernel's pass over the value blocks for its part of the decay gradient's per-chunk term s_c (gated
# only), from its first line to the store that ends it
_a = _src.index("    if GATED:\n        b_hdh = tl.zeros")
S_PASS = _src[_a:_src.index("\n", _src.index("tl.sum(b_hdh, axis=0))", _a)) + 1]
# unit_lower_inverse's forward substitution in the 16 x 16 diagonal blocks, from its first line to D
_a = _src.index("    b_D3 = tl.zeros([NB, 16, 16]")
_SUBST = _src[_a:_src.index("\n", _src.index("    b_D = tl.reshape(", _a)) + 1]
# (I + A_d)^{-1} = (I - A_d)(I + A_d^2)(I + A_d^4)(I + A_d^8), as A_d^16 = 0 in 16 x 16 blocks
_SQUARES = """    o_q = tl.arange(0, BT)
    eye_q = tl.where(o_q[:, None] == o_q[None, :], 1.0, 0.0)
    b_P = tl.where((o_q[:, None] // 16) == (o_q[None, :] // 16), b_A, 0.0)
    b_D = eye_q - b_P
    for _ in tl.static_range(3):
        b_P = tl.dot(b_P, b_P, input_precision=PREC)
        b_D = tl.dot(b_D, eye_q + b_P, input_precision=PREC)
"""

# the WY backward without the key Gram matrix: dbeta's part sum_j dA_ij (k_i . k_j) = k_i . (dA K)_i, taken with
# dB K = diag(beta) (dA K) in the key-gradient pass (two key loads and a [BT, BT] tile fewer; dA enters a product
# rounded to the work dtype, as dB already did)
_a = _src.index("    # the Gram loop written out here (not chunk_gram)")
_GRAM = _src[_a:_src.index("        tl.store(a_neg + tok * H + i_h", _a)]
_DBS = ("    b_dBs = (b_dB + tl.load(scratch + p_s + o_t[None, :] * BT + o_t[:, None])).to(WT)  # dB + dB^T\n"
        "    # ---- phase 3: dk = dk_part + (Tb^T dw) ∘ gamma + (dB + dB^T) K\n")
_DBT = ("    b_dBT = tl.load(scratch + p_s + o_t[None, :] * BT + o_t[:, None]).to(WT)\n"
        "    b_dA = b_dA.to(WT)\n")
_DK = ("        b_dk = tl.load(dk_part + p_k, mask=m_tk, other=0.0) + b_dkw\n"
       "        b_dk += mm(b_dBs, tl.load(k + p_k, mask=m_tk, other=0.0), WT, INTERP, PREC)\n"
       "        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)\n")
_DK_P = ("        b_k = tl.load(k + p_k, mask=m_tk, other=0.0)\n"
         "        b_P = mm(b_dA, b_k, WT, INTERP, PREC)\n"
         "        b_dbeta += tl.sum(b_P * b_k.to(tl.float32), axis=1)\n"
         "        b_dk = tl.load(dk_part + p_k, mask=m_tk, other=0.0) + b_dkw + b_beta[:, None] * b_P\n"
         "        b_dk += mm(b_dBT, b_k, WT, INTERP, PREC)\n"
         "        tl.store(dk + p_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)\n"
         "    tl.store(dbeta + tok * H + i_h, b_dbeta.to(dbeta.dtype.element_ty), mask=m_t)\n")

# the WY forward's key Gram matrix from one load of each key block (its transpose taken in registers) instead of
# a second, transposed load
_GRAM_FWD = "        b_A = chunk_gram(k, k, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC) * b_beta[:, None]\n"
_SELF_GRAM = """        b_A = tl.zeros([BT, BT], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            b_kk = tl.load(k + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K),
                           other=0.0)
            b_A += mm(b_kk, tl.trans(b_kk), IT, INTERP, PREC)
        b_A *= b_beta[:, None]
"""


# the backward's forward state pass (GBWD) with du_inter and do (and u_off) loaded for the current chunk at the top
# of its iteration instead of one chunk ahead: fewer registers (215 at K = 128 in the sm_90 report) against less
# latency hidden
_ROWS_AHEAD = ("    nx_dui = _chunk_rows(du_inter, bos, 0, L, i_h, o_v, H, V, BT, GBWD)\n"
               "    nx_do = _chunk_rows(do, bos, 0, L, i_h, o_v, H, V, BT, GBWD)\n")
_ROWS_NEXT = ("        nx_dui = _chunk_rows(du_inter, bos, i_t + 1, L, i_h, o_v, H, V, BT, GBWD)\n"
              "        nx_do = _chunk_rows(do, bos, i_t + 1, L, i_h, o_v, H, V, BT, GBWD)\n")
_TAKE = "        b_u, b_uo, b_g, b_dui, b_do = nx_u, nx_uo, nx_g, nx_dui, nx_do\n"
_TAKE_NOW = ("        b_u, b_uo, b_g = nx_u, nx_uo, nx_g\n"
             "        b_dui = _chunk_rows(du_inter, bos, i_t, L, i_h, o_v, H, V, BT, GBWD)\n"
             "        b_do = _chunk_rows(do, bos, i_t, L, i_h, o_v, H, V, BT, GBWD)\n")
_U_FIRST = "    nx_u, nx_uo, nx_g = _chunk_u_g(u, u_off, g, bos, 0, L, i_h, o_v, H, V, BT, GATED, GBWD)\n"
_U_NEXT = "        nx_u, nx_uo, nx_g = _chunk_u_g(u, u_off, g, bos, i_t + 1, L, i_h, o_v, H, V, BT, GATED, GBWD)\n"
_GBWD_NOW = [(ST, _ROWS_AHEAD, ""), (ST, _ROWS_NEXT, ""), (ST, _TAKE, _TAKE_NOW)]
_GBWD_ALL_NOW = [*_GBWD_NOW[:2],
                 (ST, _TAKE, _TAKE_NOW + "        b_uo = _chunk_rows(u_off, bos, i_t, L, i_h, o_v, H, V, BT, GBWD)\n"),
                 (ST, _U_FIRST, _U_FIRST.replace("GATED, GBWD)", "GATED, False)")),
                 (ST, _U_NEXT, _U_NEXT.replace("GATED, GBWD)", "GATED, False)"))]


def _fwd_bv(width: int) -> str:
    return _FWD_BV.replace("_value_block(meta, H, V, k.device)", f"min(pow2(V), {width})")


def _gl_blocks(bk: int, bv: int) -> str:
    return _GL_FWD_H_B.replace("_state_blocks(K, V)", f"min({bk}, pow2(K)), min({bv}, pow2(V))")


VARIANTS = {
    "base": [],
    "wy_fwd_no_inverse": [(CH, "        b_T = unit_lower_inverse(b_A, BT, PREC)\n", "        b_T = b_A\n")],
    "dqkw_no_s_pass": [(CH, S_PASS, "")],
    # the backward's forward state pass without its decay-gradient sums (s_c's part and do . vr)
    "fwd_h_no_sums": [(ST, "        if GBWD:\n            tl.store(s_wh",
                       "        if False:\n            tl.store(s_wh")],
    # the dq/dk/dw kernel over 128-wide key and value blocks (one program per chunk and head at K = 128, as fla's
    # on Hopper), at its warps (four below K = V = 256, else eight) or at eight
    "dqkw_b128": [(CH, _DQKW_B, _DQKW_B.replace("64", "128"))],
    "dqkw_b128_w8": [(CH, _DQKW_B, _DQKW_B.replace("64", "128")),
                     (CH, _DQKW_W, 'launch("delta.bwd_dqkw", num_warps=8)')],
    # the diagonal blocks' inverse by repeated squaring on the tensor cores instead of forward substitution (too
    # inexact at tf32 for the kernels: benchmarks/inverse_precision.py)
    "wy_inverse_squares": [(CH, _SUBST, _SQUARES)],
    # the dq/dk/dw kernel at fewer pipeline stages (less shared memory: two programs per SM at K = 128)
    "dqkw_2_stages": [(CH, _DQKW_W, _DQKW_W.replace("dqkw\", ", "dqkw\", num_stages=2, "))],
    "dqkw_1_stage": [(CH, _DQKW_W, _DQKW_W.replace("dqkw\", ", "dqkw\", num_stages=1, "))],
    # two stages at four warps for every width (at K = V = 256 the launcher runs eight warps at 178 registers: one
    # program per SM; four warps at 255 registers and 80 KiB fit two, as at K = 128)
    "dqkw_2_stages_w4": [(CH, _DQKW_W, 'launch("delta.bwd_dqkw", num_stages=2)')],
    # the WY backward at fewer pipeline stages (more programs per SM at two warps) or wider blocks at two warps
    "wy_bwd_2_stages": [(CH, _WY_W, _WY_W.replace("num_warps=2,", "num_warps=2, num_stages=2,"))],
    "wy_bwd_1_stage": [(CH, _WY_W, _WY_W.replace("num_warps=2,", "num_warps=2, num_stages=1,"))],
    "wy_bwd_bk64": [(CH, _WY_W, _WY_W.replace("min(32, pow2(K))", "min(64, pow2(K))"))],
    "wy_bwd_bv32": [(CH, _WY_W, _WY_W.replace("BV=16", "BV=min(32, pow2(V))"))],
    # the local dv kernel (gated_linear's, which the delta rules share) over 128-wide value blocks, as the output
    # kernel is
    "bwd_dv_bv128": [(GL, 'launch("gl.bwd_dv", BV=min(64, pow2(V))', 'launch("gl.bwd_dv", BV=min(128, pow2(V))')],
    "wy_bwd_no_gram": [(CH, _GRAM, ""), (CH, _DBS, _DBT), (CH, _DK, _DK_P)],
    "wy_fwd_self_gram": [(CH, _GRAM_FWD, _SELF_GRAM)],
    "wy_bwd_4_warps": [(CH, 'launch("delta.wy_bwd", num_warps=2,', 'launch("delta.wy_bwd", num_warps=4,')],
    "wy_bwd_4_warps_wide": [(CH, _WY_W,
                             'launch("delta.wy_bwd", num_warps=4, BK=min(64, pow2(K)), BV=min(64, pow2(V)))')],
    # the state passes' row groups (at B4 T4096 H4 K = V = 256 the states of the whole batch pass the budget) and
    # their value blocks
    "no_groups": [(CH, "STATE_BUDGET = 64 * 2**20", "STATE_BUDGET = 2**40")],
    "state_bv16": [(ST, "return BK, NK, min(pow2(V), 32)", "return BK, NK, min(pow2(V), 16)")],
    "state_bv32": [(ST, "return 16 if busy * per_segment <= slots else BV", "return BV")],
    # the forward state pass alone (forward and the backward's recomputation) at 32 or 64 value columns
    "fwd_h_bv32": [(ST, _FWD_BV, _fwd_bv(32))],
    "fwd_h_bv64": [(ST, _FWD_BV, _fwd_bv(64))],
    # the WY forward (and the backward's recomputation) at two warps: mma.sync products instead of warpgroup ones,
    # smaller programs for the forward substitution's reductions
    "wy_fwd_w2": [(CH, 'launch("delta.wy_fwd")', 'launch("delta.wy_fwd", num_warps=2)')],
    "wy_fwd_w2_s2": [(CH, 'launch("delta.wy_fwd")', 'launch("delta.wy_fwd", num_warps=2, num_stages=2)')],
    # the forward state pass at four pipeline stages up to K = 128 (three by default; 105 KiB of shared memory at
    # three, K = 128)
    "fwd_h_4_stages": [(ST, "    return 3 if width <= 256 else 1\n",
                        "    return (4 if width <= 128 else 3) if width <= 256 else 1\n")],
    "fwd_h_gbwd_now": _GBWD_NOW,
    "fwd_h_gbwd_all_now": _GBWD_ALL_NOW,
    # gated_linear's forward (mamba2, linear_attn, retnet; gla's state and output kernels): the state pass at four
    # warps for the scalar gate (eight by default), over all of K in one program at 32 or 64 value columns (fla's
    # tiling), and the output kernel over 128-wide key blocks
    "gl_fwd_h_w4": [(GL, _GL_FWD_H_W, 'launch("gl.fwd_h", num_warps=4)')],
    "gl_fwd_h_k128_bv32": [(GL, _GL_FWD_H_B, _gl_blocks(128, 32))],
    "gl_fwd_h_k128_bv64": [(GL, _GL_FWD_H_B, _gl_blocks(128, 64))],
    "gl_fwd_h_bv32": [(GL, _GL_FWD_H_B, _gl_blocks(64, 32))],
    "gl_fwd_o_bk128": [(GL, _GL_FWD_O, _GL_FWD_O.replace("min(64,", "min(128,"))],
    "gl_fwd_o_w8": [(GL, _GL_FWD_O, _GL_FWD_O[:-1] + ", num_warps=8)")],
}
