"""The output kernel of the gated linear family (and the delta family's output) with one program per chunk
and head that forms the scores once and loops over the value blocks, against the current kernels (a
program per value block, each forming the scores).

    python3 -m benchmarks.kernel_variants --spec benchmarks/variants/gl_output_vloop.py \\
        --rules gated_deltanet,mamba2 --shape 4x2048x4x256x256

Both variants compute the right values; tests/test_benchmarks.py checks that every edit still applies.
"""

GL = "gated_linear/chunk.py"

OLD_BODY = """    i_t, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_q = tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_h = tl.load(h + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                      mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_o += mm(b_q, b_h, WT, INTERP, PREC)
        if GATE != 2:
            b_kT = tl.load(k + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :],
                           other=0.0)
            b_A += mm(b_q, b_kT, IT, INTERP, PREC)
    if GATE == 1:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_o *= tl.exp(tl.cumsum(b_g, axis=0))[:, None]
        b_A *= _decay_matrix(b_g, BT)
    if GATE == 0:
        b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.0)
    if GATE == 2:
        for i_a in tl.static_range(NA):
            b_A += tl.load(A + i_a * sA + tok[:, None] * H * BT + i_h * BT + o_t[None, :],
                           mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.0)
    b_v = tl.load(v + tok[:, None] * H * V + i_h * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
    if HAS_DT:  # A diag(dt) v as A (dt v): dt scales v's rows, in the layout the row vectors already have
        b_v = b_v.to(tl.float32) * tl.load(dt + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)[:, None]
    b_o = (b_o + mm(b_A, b_v, WT, INTERP, PREC)) * scale
    tl.store(o + tok[:, None] * H * V + i_h * V + o_v[None, :], b_o.to(o.dtype.element_ty),
             mask=m_t[:, None] & m_v[None, :])


"""

NEW_BODY = """    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t0, L, _ = chunk_start(chunk_indices, cu, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < L
    tok = t0 + o_t
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    if GATE != 2:
        b_A = chunk_gram(q, k, tok, i_h, m_t, H, K, BT, BK, IT, INTERP, PREC)
    if GATE == 1:
        b_g = tl.load(g + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_qdec = tl.exp(tl.cumsum(b_g, axis=0))
        b_A *= _decay_matrix(b_g, BT)
    if GATE == 0:
        b_A = tl.where(o_t[:, None] >= o_t[None, :], b_A, 0.0)
    if GATE == 2:
        for i_a in tl.static_range(NA):
            b_A += tl.load(A + i_a * sA + tok[:, None] * H * BT + i_h * BT + o_t[None, :],
                           mask=m_t[:, None] & (o_t[:, None] >= o_t[None, :]), other=0.0)
    if HAS_DT:
        b_dt = tl.load(dt + tok * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        b_o = tl.zeros([BT, BV], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            b_q = tl.load(q + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0)
            b_h = tl.load(h + (i_t * H + i_h).to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                          mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_o += mm(b_q, b_h, WT, INTERP, PREC)
        if GATE == 1:
            b_o *= b_qdec[:, None]
        p_v = tok[:, None] * H * V + i_h * V + o_v[None, :]
        b_v = tl.load(v + p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_DT:
            b_v = b_v.to(tl.float32) * b_dt[:, None]
        b_o = (b_o + mm(b_A, b_v, WT, INTERP, PREC)) * scale
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


"""

VARIANTS = {
    "base": [],
    "fwd_o_vloop": [
        (GL, OLD_BODY, NEW_BODY),
        (GL, "    grid = (meta.num_chunks, H, triton.cdiv(V, opts[\"BV\"]))\n    _fwd_o_kernel[grid](",
         "    grid = (meta.num_chunks, H)\n    _fwd_o_kernel[grid]("),
    ],
}
