"""What the steps of titans' kernels cost: each variant drops one step (wrong values on purpose).

    python3 -m benchmarks.kernel_variants --spec benchmarks/variants/titans_costs.py --rules titans,gated_deltanet

tests/test_benchmarks.py checks that every edit still applies to the current kernels.
"""

CH = "titans/chunk.py"
BW = "titans/backward.py"

VARIANTS = {
    "base": [],
    # forward
    "no_inverse": [(CH, "    b_T = unit_lower_inverse(b_L, BT, PREC)\n", "    b_T = b_L\n")],
    "no_cumprod": [(CH, "    b_Pe = _cumprod_matrix(b_eta, BT)\n",
                    "    b_Pe = tl.where(o_t[:, None] >= o_t[None, :], b_eta[:, None], 0.0)\n"),
                   (CH, "    b_Pa = _cumprod_matrix(b_a, BT)\n",
                    "    b_Pa = tl.where(o_t[:, None] >= o_t[None, :], b_a[:, None], 0.0)\n")],
    "no_state_stores": [(CH, "        tl.store(hM + p_h, b_M.to(hM.dtype.element_ty), mask=m_kv)\n"
                             "        tl.store(hS + p_h, b_S.to(hS.dtype.element_ty), mask=m_kv)\n", "")],
    # backward
    "no_frobenius": [(BW, "        f_MM += tl.sum(b_dhMT * b_hMT, axis=0)\n"
                          "        f_MS += tl.sum(b_dhMT * b_hST, axis=0)\n"
                          "        f_SS += tl.sum(b_dhST * b_hST, axis=0)\n", "")],
    "no_dR_dL": [(BW, "        b_dR += mm(b_do, b_rT, WT, INTERP, PREC)\n"
                      "        b_dRT += mm(b_r, b_doT, WT, INTERP, PREC)\n"
                      "        b_dL += mm(b_dv, b_rT, WT, INTERP, PREC)\n"
                      "        b_dLT += mm(b_r, b_dvT, WT, INTERP, PREC)\n", "")],
    "coef_bwd_no_scatter": [(BW, "g_Dth += select_rows(sel_T, g_Lc, INTERP, 3)", "g_Dth += g_Lc")],
}
