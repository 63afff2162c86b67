"""Triton kernels (``impl="triton"``) against the float64 token loop, forward and backward.

Every check compares the kernel with ``rule.recurrent`` in float64 (never with another kernel):
outputs, final states and the gradients of a random projection of both with respect to q, k, v,
every gate and the initial state. Tolerance (flash-attention's rule), per tensor::

    max |kernel - ref64| <= 2 * max |ref_lowprec - ref64| + C * u * max |ref64|

``ref_lowprec`` is ``rule.recurrent`` on the same inputs in the kernel's dtype; ``u`` is that dtype's
unit roundoff (2^-24, 2^-11, 2^-8). The kernels, like fla's, round chunk-level intermediates (chunk
states, pseudo-values, scores) to the input dtype a few times along a gradient's path, which the
token loop never does: ``C = 8`` for float16 / bfloat16 covers a handful of such roundings of the
largest values; float32 sums in other orders over whole chunks: ``C = 16``.

Inputs are drawn fresh for every test (seeded by the test's id, so a failure reproduces); fresh
allocations are NaN (tests/conftest.py), so an element a kernel leaves unwritten fails.
Devices: ``cpu`` runs the Triton interpreter (marker ``interpret``, small shapes), ``cuda`` a GPU
(marker ``gpu``).
"""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from momkit.kernels import _common

from momkit.rules import _triton, get_rule
from momkit.testing import random_inputs

F64 = torch.float64
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
C = {torch.float32: 16, torch.float16: 8, torch.bfloat16: 8}

VARIANTS = [("linear_attn", {}), ("retnet", {}), ("mamba2", {}), ("gla", {}), ("deltanet", {}),
            ("gated_deltanet", {}), ("titans", {"mini_batch": 16}), ("titans", {"mini_batch": 1}),
            ("titans", {"mini_batch": 4}), ("titans", {"mini_batch": 24}), ("titans", {"mini_batch": 100}),
            ("lightning", {}), ("hgrn2", {}), ("ttt", {"mini_batch": 16}), ("ttt", {"mini_batch": 4})]
VARIANT_IDS = [name + "".join(f"-mb{v}" for v in opts.values()) for name, opts in VARIANTS]
@pytest.fixture
def seed(request) -> int:
    """Fresh inputs per test, reproducible from the test id."""
    return zlib.crc32(request.node.nodeid.encode())


def assert_matches(got, lowprec, ref, dtype, what, record=None):
    """The tolerance rule of this module's docstring."""
    assert got is not None, f"{what}: missing"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten element is NaN)"
    err = (got.double() - ref).abs().max().item()
    lp_err = (lowprec.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    atol = C[dtype] * UNIT_ROUNDOFF[dtype] * scale
    if record is not None:  # the margin, in units of u * max |ref64|, for the GPU report
        margin = (err - 2 * lp_err) / max(UNIT_ROUNDOFF[dtype] * scale, 1e-300)
        record(f"C_needed[{what}|{str(dtype).split('.')[-1]}]", round(margin, 3))
    assert err <= 2 * lp_err + atol, (f"{what}: max error {err:.3e} > 2 * {lp_err:.3e} (reference in {dtype}) "
                                      f"+ atol {atol:.3e} (max |ref| {scale:.3e})")


def run(fn, leaves, weights, **kw):
    """Outputs, final state and the gradients of ``sum(o * wo) + sum(S * ws)`` w.r.t. every leaf."""
    xs = {n: x.detach().clone().requires_grad_(True) for n, x in leaves.items() if x is not None}
    q, k, v = xs.pop("q"), xs.pop("k"), xs.pop("v")
    S0 = xs.pop("initial_state", None)
    want_state = weights[1] is not None
    o, S = fn(q, k, v, initial_state=S0, output_final_state=want_state, **xs, **kw)
    loss = (o.double() * weights[0]).sum()
    if want_state:
        loss = loss + (S.double() * weights[1]).sum()
    loss.backward()
    grads = {"q": q.grad, "k": k.grad, "v": v.grad, **{n: x.grad for n, x in xs.items()}}
    if S0 is not None:
        grads["initial_state"] = S0.grad
    return o.detach(), (S.detach() if want_state else None), grads


def check_against_reference(rule, opts, leaves, dtype, *, with_state=True, record=None, reference=None, rows=None,
                            **kw):
    """Run the kernel, the float64 reference and the low-precision reference; assert the tolerance.

    ``rows``: batch rows to check (every one by default). The kernel runs on the whole batch; the references,
    a token loop per row, only on these rows (the loss sums over rows, so each row's gradients are its own),
    and every element of the kernel's outputs and gradients must still be finite."""
    reference = reference or rule.recurrent
    gen = torch.Generator().manual_seed(7)
    # weights of the random projection: drawn once, shared by the three runs
    B, T, H, V = leaves["v"].shape
    device = leaves["q"].device
    wo = torch.randn(B, T, H, V, generator=gen, dtype=F64).to(device)
    ws = None
    if with_state:
        ws = torch.randn(leaves["initial_state"].shape, generator=gen, dtype=F64).to(device)
    o, S, g = run(lambda *a, **k: rule.forward(*a, impl="triton", **k), leaves, (wo, ws), **opts, **kw)
    if rows is not None:
        for n, x in [("output", o), ("final state", S), *g.items()]:
            assert x is None or torch.isfinite(x).all(), f"{n}: non-finite values (an unwritten element is NaN)"
        rows = torch.as_tensor(rows, device=device)
        leaves = {n: x[rows] for n, x in leaves.items()}
        wo, ws = wo[rows], (None if ws is None else ws[rows])
        o, S = o[rows], (None if S is None else S[rows])
        g = {n: None if x is None else x[rows] for n, x in g.items()}
    ref = {n: x.to(F64) for n, x in leaves.items()}
    o64, S64, g64 = run(reference, ref, (wo, ws), **opts, **kw)
    olp, Slp, glp = run(reference, leaves, (wo, ws), **opts, **kw)
    assert o.dtype == leaves["v"].dtype
    assert_matches(o, olp, o64, dtype, "output", record)
    if with_state:
        assert S.dtype == torch.float32
        assert_matches(S, Slp, S64, dtype, "final state", record)
    assert set(g) == set(g64)
    for n in g64:
        if n == "k" and not rule.uses_key:  # a rule that makes its key from its gates: k gets no gradient
            assert g[n] is None and g64[n] is None, "gradient of k"
            continue
        assert g[n] is not None and g[n].dtype == leaves[n].dtype, f"gradient of {n}: {g[n]}"
        assert_matches(g[n], glp[n], g64[n], dtype, f"gradient of {n}", record)


def make_leaves(rule, B, T, H, K, V, dtype, seed, device, N=None, regime="typical", with_state=True):
    q, k, v, gates = random_inputs(rule, B, T, H, K, V, dtype, seed=seed, regime=regime)
    leaves = {"q": q, "k": k, "v": v, **gates}
    if with_state:
        gen = torch.Generator().manual_seed(seed + 1)
        leaves["initial_state"] = torch.randn(rule.state_shape(N or B, H, K, V), generator=gen)
    return {n: x.to(device) for n, x in leaves.items()}


# ---------------------------------------------------------------------------------------------- small shapes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_chunk_matches_reference(device, seed, name, opts, dtype, record_property):
    """Two batch rows, 70 tokens (a full chunk and a partial one), K = 20 and V = 24 (not powers of two)."""
    rule = get_rule(name)
    leaves = make_leaves(rule, 2, 70, 2, 20, 24, dtype, seed, device)
    check_against_reference(rule, opts, leaves, dtype, record=record_property)


@pytest.mark.parametrize("name", ["linear_attn", "gla", "mamba2", "deltanet", "gated_deltanet"])
def test_key_dim_16_in_bfloat16(device, seed, name, record_property):
    """The capacity protocol's memories (momkit/configs/mqar_capacity.yaml): keys of 16, values of 32, bfloat16,
    so every key block is a single 16-wide block."""
    rule = get_rule(name)
    leaves = make_leaves(rule, 4, 70, 2, 16, 32, torch.bfloat16, seed, device)
    check_against_reference(rule, {}, leaves, torch.bfloat16, record=record_property)


# Rows checked against the token loop at the large batch (all 256 would take minutes of Python loop on a GPU):
# the first and last, and rows whose chunks ran in the programs that read out of bounds in the fault below.
LARGE_BATCH_ROWS = [0, 1, 70, 132, 194, 255]


@pytest.mark.parametrize(("K", "V"), [(64, 32), (80, 40)], ids=["K64-V32", "K80-V40"])
@pytest.mark.parametrize("name", ["linear_attn", "gla", "gated_deltanet"])
def test_expanded_memories_of_the_capacity_study(device, seed, name, K, V, record_property):
    """The capacity study's expanded single memories (sweeps/capacity_state.yaml: keys of 4 or 5 x 16, values
    of 32 or 40) in bfloat16 at the study's batch, 256 rows of 128 tokens (3 rows of 130 on the interpreter,
    two of them checked). Triton 3.6 on an H100 miscompiled K = 64, V = 32 (``kernels._common.mixed_block_warps``);
    at this batch the output and local-dv kernels then stopped with an illegal memory access."""
    rule = get_rule(name)
    B, T, rows = (256, 128, LARGE_BATCH_ROWS) if device == "cuda" else (3, 130, [0, 2])
    leaves = make_leaves(rule, B, T, 2, K, V, torch.bfloat16, seed, device)
    check_against_reference(rule, {}, leaves, torch.bfloat16, record=record_property, rows=rows)


@pytest.mark.parametrize(("K", "V"), [(32, 32), (32, 64), (64, 64), (64, 128)], ids=lambda x: str(x))
@pytest.mark.parametrize("name", ["linear_attn", "gla", "gated_deltanet"])
def test_one_key_block_in_bfloat16_at_a_large_batch(device, seed, name, K, V, record_property):
    """Key dimensions that fill exactly one key block (32, 64) with several value widths, bfloat16, 256 rows of
    128 tokens. GPU only: on the interpreter the test above runs K = 64 at 2 x 130 tokens."""
    if device == "cpu":
        pytest.skip("GPU only (a batch of 256 x 128 tokens)")
    rule = get_rule(name)
    leaves = make_leaves(rule, 256, 128, 2, K, V, torch.bfloat16, seed, device)
    check_against_reference(rule, {}, leaves, torch.bfloat16, record=record_property, rows=LARGE_BATCH_ROWS)


WIDTH_RULES = [(n, o) for n, o in VARIANTS if n != "ttt" and o.get("mini_batch", 16) == 16]


@pytest.mark.parametrize(("K", "V"), list(itertools.product([16, 32, 64, 128], repeat=2)), ids=lambda x: str(x))
@pytest.mark.parametrize(("name", "opts"), WIDTH_RULES, ids=[n for n, _ in WIDTH_RULES])
def test_key_and_value_widths_in_bfloat16(device, seed, name, opts, K, V, record_property):
    """Every pairing of key and value widths 16, 32, 64 and 128 (key and value blocks of equal and of
    different widths) in bfloat16, 2 rows of 130 tokens, for every chunk rule but ttt (titans at mini-batch
    16). On an H100 with Triton 3.6, the pairings whose blocks differ gave wrong outputs or gradients in four
    kernels until they ran without warpgroup products (``kernels._common.mixed_block_warps``). GPU only: the
    interpreter has no such compiler, and its tests run K = 64, V = 32 above and K = 20, V = 24 in the
    small-shape test. Titans refuses the widths where its kernels are known to be wrong on this GPU
    (``kernels.titans.chunk.miscompiled_widths``): there the test checks the refusal."""
    if device == "cpu":
        pytest.skip("GPU only (compiler-specific widths)")
    from momkit.kernels.titans.chunk import miscompiled_widths

    rule = get_rule(name)
    leaves = make_leaves(rule, 2, 130, 2, K, V, torch.bfloat16, seed, device)
    if name == "titans" and miscompiled_widths(K, V, torch.device(device)):
        with pytest.raises(ValueError, match=f"K={K} with value width V={V}"):
            rule.forward(leaves["q"], leaves["k"], leaves["v"], impl="triton", **opts,
                         **{n: x for n, x in leaves.items() if n not in ("q", "k", "v")})
        return
    check_against_reference(rule, opts, leaves, torch.bfloat16, record=record_property)


@pytest.mark.parametrize("opts", [{"BK": 32}, {"BV": 64}], ids=["BK32", "BV64"])
@pytest.mark.parametrize("name", ["linear_attn", "gla", "gated_deltanet"])
def test_block_sizes_of_the_output_and_local_dv_kernels(device, seed, name, opts, monkeypatch, record_property):
    """Key dimension 64 and values of 32 (the capacity study's expanded memory) with the output and local-dv
    kernels' key blocks of 32 (two per row) or value blocks of 64 (masked), against the float64 loop."""
    for kernel in ("gl.fwd_o", "gl.bwd_dv"):
        monkeypatch.setitem(_common.LAUNCH, kernel, opts)
    rule = get_rule(name)
    leaves = make_leaves(rule, 2, 130, 2, 64, 32, torch.bfloat16, seed, device)
    check_against_reference(rule, {}, leaves, torch.bfloat16, record=record_property)


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_packed_segments_match_reference(device, seed, name, opts, record_property):
    """Packed input (B = 1, cu_seqlens) with segments of 1, 0, 65, 4 and 70 tokens: the reference runs
    every segment on its own from its own initial state."""
    rule = get_rule(name)
    cu = torch.tensor([0, 1, 1, 66, 70, 140], device=device)
    leaves = make_leaves(rule, 1, 140, 2, 16, 32, torch.float32, seed, device, N=5)
    check_against_reference(rule, opts, leaves, torch.float32, cu_seqlens=cu, record=record_property)


def test_state_passes_start_the_longest_segments_first():
    """The segments of the packed test above, by decreasing chunk count (2, 2, 1, 1, 0), ties in segment
    order: the order in which the state kernels' programs are laid out."""
    from momkit.kernels._common import CHUNK, chunk_meta

    meta = chunk_meta(1, 140, (0, 1, 1, 66, 70, 140), CHUNK, torch.device("cpu"))
    assert meta.order.tolist() == [2, 4, 0, 3, 1]
    assert meta.order.dtype == torch.int32


def test_chunk_layout_matches_its_definition():
    """The chunk layout of random packings (empty segments, segments of 1, 63, 64, 65 and up to 300 tokens)
    against the module docstring's definition written out per segment and chunk; every index tensor
    contiguous and on a 16-byte boundary, as the kernels' pointer specialization assumes."""
    from momkit.kernels._common import _chunk_meta

    rng = random.Random(0)
    for case in range(100):
        cu = [0]
        for _ in range(rng.randint(0, 40)):
            cu.append(cu[-1] + rng.choice([0, 1, 63, 64, 65, rng.randint(0, 300)]))
        BT = rng.choice([16, 64])
        meta = _chunk_meta(tuple(cu), BT, torch.device("cpu"))
        n_chunks = [-(-(b - a) // BT) for a, b in itertools.pairwise(cu)]
        indices = [[n, c] for n, nc in enumerate(n_chunks) for c in range(nc)]
        assert meta.cu.tolist() == cu and meta.cu.dtype == torch.int64
        assert meta.chunk_indices.tolist() == (indices or [[0, 0]])
        assert meta.chunk_offsets.tolist() == [sum(n_chunks[:n]) for n in range(len(n_chunks) + 1)]
        assert meta.order.tolist() == sorted(range(len(n_chunks)), key=lambda n: -n_chunks[n])
        assert (meta.num_segments, meta.num_chunks, meta.max_chunks) == (len(cu) - 1, len(indices),
                                                                          max(n_chunks, default=0))
        for t in (meta.chunk_indices, meta.chunk_offsets, meta.order):
            assert t.dtype == torch.int32 and t.is_contiguous() and t.data_ptr() % 16 == 0, case


@pytest.mark.parametrize(("layout", "expected"), [
    ("packed", [(0, 65), (65, 66), (66, 70), (70, 140)]),  # the packed segments above; one cut inside 1 .. 66
    ("long", [(0, 64), (64, 128), (128, 192), (192, 200)]),  # one sequence of 200 tokens, cut three times
    ("stateless", [(0, 64), (64, 128), (128, 160), (160, 190)]),  # segments of 130, 30, 30; no initial or
    # final state, and a group where a segment's last rows come before a whole segment
    ("batch", [(0, 128), (128, 130), (130, 194), (194, 260)]),  # two rows of 130, each cut once
    ("empty", [(0, 64), (64, 128)]),  # segments of 64, 0, 0, 64: two empty ones at the cut
], ids=["packed", "long", "stateless", "batch", "empty"])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_forward_and_backward_in_groups_of_rows(device, seed, name, layout, expected, monkeypatch, record_property):
    """The delta forward and backward run group by group of rows (forced by a state budget of one byte), with
    cuts inside segments (a group hands its state on, and the state's gradient back), with initial and final
    states and without: the same outputs and gradients as the reference."""
    import momkit.kernels._common as common
    import momkit.kernels.delta.chunk as delta_chunk

    used = []

    def groups(*args):
        used.append(common.state_groups(*args))
        return used[-1]

    monkeypatch.setattr(delta_chunk, "STATE_BUDGET", 1)
    monkeypatch.setattr(delta_chunk, "program_slots", lambda device: 1)  # no cost to splitting (GPU: 132)
    monkeypatch.setattr(delta_chunk, "state_groups", groups)
    rule = get_rule(name)
    kw = {}
    if layout == "packed":
        kw["cu_seqlens"] = torch.tensor([0, 1, 1, 66, 70, 140], device=device)
        leaves = make_leaves(rule, 1, 140, 2, 16, 32, torch.float32, seed, device, N=5)
    elif layout == "empty":
        kw["cu_seqlens"] = torch.tensor([0, 64, 64, 64, 128], device=device)
        leaves = make_leaves(rule, 1, 128, 2, 16, 32, torch.float32, seed, device, N=4)
    elif layout == "stateless":
        kw.update(cu_seqlens=torch.tensor([0, 130, 160, 190], device=device), with_state=False)
        leaves = make_leaves(rule, 1, 190, 2, 16, 32, torch.float32, seed, device, with_state=False)
    else:
        B, T = (2, 130) if layout == "batch" else (1, 200)
        leaves = make_leaves(rule, B, T, 2, 16, 32, torch.float32, seed, device)
    check_against_reference(rule, {}, leaves, torch.float32, record=record_property, **kw)
    assert used and used[0] == expected


@pytest.mark.parametrize("gc", [None, 0], ids=["default", "summed"])
@pytest.mark.parametrize(("name", "grouped"), [("deltanet", False), ("gated_deltanet", False),
                                               ("gated_deltanet", True)], ids=["deltanet", "gated", "gated-groups"])
def test_state_passes_read_the_chunk_local_cumulative_decays(device, seed, name, grouped, gc, monkeypatch,
                                                              record_property):
    """The delta state passes take each chunk's decays from the chunk-local cumulative log decays that wy_fwd
    stores (by default), or sum them in their sequential loop (launch option GC=0). Packed segments of 1, 0, 65,
    4 and 70 tokens (chunks ending past the segment, a segment of one chunk and an empty one), with initial
    and final states, as one call and in groups of rows (cuts inside segments), against the float64 loop
    (test_gate_domain_edges has both under strong decays)."""
    import momkit.kernels.delta.chunk as delta_chunk
    import momkit.kernels.delta.state as delta_state

    if gc is not None:
        monkeypatch.setitem(_common.LAUNCH, "delta.fwd_h", {"GC": gc})
        monkeypatch.setitem(_common.LAUNCH, "delta.bwd_dh", {"GC": gc})
    read = []

    def use_gc(opts, g, gc):
        read.append(delta_state_use_gc(opts, g, gc))
        return read[-1]

    delta_state_use_gc = delta_state._use_gc  # the launcher's own decision, recorded
    monkeypatch.setattr(delta_state, "_use_gc", use_gc)
    if grouped:
        monkeypatch.setattr(delta_chunk, "STATE_BUDGET", 1)
        monkeypatch.setattr(delta_chunk, "program_slots", lambda device: 1)
    rule = get_rule(name)
    cu = torch.tensor([0, 1, 1, 66, 70, 140], device=device)
    leaves = make_leaves(rule, 1, 140, 2, 16, 32, torch.float32, seed, device, N=5)
    check_against_reference(rule, {}, leaves, torch.float32, cu_seqlens=cu, record=record_property)
    # forward (once per group), and the backward's forward and reverse passes (once per group)
    assert len(read) == (3 * 4 if grouped else 3) and all(read) == (name == "gated_deltanet" and gc is None)
    assert any(read) == all(read)


@pytest.mark.parametrize("V", [32, 48])
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_state_passes_take_narrow_value_blocks_where_the_gpu_would_idle(device, seed, name, V, monkeypatch,
                                                                     record_property):
    """Where 32-wide value blocks would fill at most half of the GPU's program slots, the state passes run
    16-wide ones (twice the programs): packed segments of 1, 0, 65, 4 and 70 tokens with initial and final states,
    value widths of one and of several blocks with a ragged last one, against the float64 loop; with few slots
    they keep 32."""
    import momkit.kernels.delta.state as delta_state
    from momkit.kernels._common import CHUNK, chunk_meta

    widths = []

    def value_block(*args):
        widths.append(choose(*args))
        return widths[-1]

    choose = delta_state._value_block
    monkeypatch.setattr(delta_state, "_value_block", value_block)
    monkeypatch.setattr(delta_state, "program_slots", lambda device: 10**6)
    rule = get_rule(name)
    cu = torch.tensor([0, 1, 1, 66, 70, 140], device=device)
    leaves = make_leaves(rule, 1, 140, 2, 16, V, torch.float32, seed, device, N=5)
    check_against_reference(rule, {}, leaves, torch.float32, cu_seqlens=cu, record=record_property)
    assert widths == [16, 16, 16]  # the forward, and the backward's forward and reverse passes
    meta = chunk_meta(1, 140, (0, 1, 1, 66, 70, 140), CHUNK, torch.device("cpu"))
    # four segments with tokens x 2 heads x 2 blocks of 32 = 16 programs: 16-wide from 32 slots up
    monkeypatch.setattr(delta_state, "program_slots", lambda device: 31)
    assert choose(meta, 2, 64, device) == 32
    monkeypatch.setattr(delta_state, "program_slots", lambda device: 32)
    assert choose(meta, 2, 64, device) == 16
    assert choose(meta, 2, 16, device) == 32  # one block either way: no more programs to gain


def test_state_groups_cut_on_segment_starts_or_inside_long_segments():
    """Many short segments split on segment starts into groups of about equal chunks; one long sequence, or a
    few long ones, split inside segments; a budget over four times the buffers asks no more than four groups;
    a budget the buffers fit asks none; no group is made of empty segments only."""
    import itertools

    from momkit.kernels._common import CHUNK, chunk_meta, range_pieces, state_groups

    def groups(lengths, budget_chunks, slots=132):
        cu = (0, *itertools.accumulate(lengths))
        meta = chunk_meta(1, cu[-1], cu, CHUNK, torch.device("cpu"))
        out = state_groups(meta, 32, 1, budget_chunks, slots)
        assert all(range_pieces(cu, a, b) for a, b in out)
        return out

    mom = [1024] * 16 + [2048] * 4  # B4 T2048 M4: routed memories' shares, then the shared memory
    assert groups(mom, 200) == [(0, 12288), (12288, 24576)]
    assert groups(mom, 128) == [(0, 8192), (8192, 16384), (16384, 24576)]
    assert groups(mom, 400) == [(0, 24576)]
    assert groups([8192], 64) == [(0, 4096), (4096, 8192)]  # one long sequence: a cut at its middle
    assert groups([256, 0, 64], 1, slots=1) == [(0, 64), (64, 128), (128, 192), (192, 256), (256, 320)]
    b16 = groups([1024] * 64 + [2048] * 16, 1)  # the budget asks for 384 groups; a quarter each at most
    assert len(b16) == 4 and b16[0][0] == 0 and b16[-1][1] == 98304


def test_range_pieces_give_every_segment_one_first_and_one_last_piece():
    """Every segment, empty ones at a cut included, starts in exactly one group and ends in exactly one."""
    import itertools

    from momkit.kernels._common import range_pieces

    rng = random.Random(0)
    cases = [((0, 64, 64, 64, 100, 100, 228, 228), cuts)
             for cuts in ([0, 64, 228], [0, 32, 64, 100, 164, 228], [0, 100, 228], [0, 228])]
    for _ in range(200):  # random packings (empty segments among them), cut at random chunk starts
        cu = (0, *itertools.accumulate(rng.choice([0, 0, 1, 63, 64, 65, 130]) for _ in range(rng.randint(1, 8))))
        starts = sorted({a + j for a, b in itertools.pairwise(cu) for j in range(0, b - a, 64)} - {0})
        cases.append((cu, [0, *sorted(rng.sample(starts, min(len(starts), rng.randint(0, 3)))), cu[-1]]))
    for cu, cuts in cases:
        pieces = [p for a, b in itertools.pairwise(cuts) for p in range_pieces(cu, a, b)]
        assert sorted(n for n, lo, _ in pieces if lo == cu[n]) == list(range(len(cu) - 1)), cuts
        assert sorted(n for n, _, hi in pieces if hi == cu[n + 1]) == list(range(len(cu) - 1)), cuts
        assert all(cu[n] <= lo <= hi <= cu[n + 1] for n, lo, hi in pieces), cuts


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_forward_without_gradients(device, seed, name, opts):
    """Inputs that need no gradient (inference): the forward may skip what only the backward reads
    (titans does not store its inverses). Outputs and final state against the float64 token loop."""
    rule = get_rule(name)
    dtype = torch.bfloat16
    leaves = make_leaves(rule, 2, 70, 2, 20, 24, dtype, seed, device)
    q, k, v, S0 = (leaves.pop(n) for n in ("q", "k", "v", "initial_state"))
    with torch.no_grad():
        o, S = rule.forward(q, k, v, impl="triton", initial_state=S0, output_final_state=True, **leaves, **opts)
        kw = dict(initial_state=S0, output_final_state=True, **leaves, **opts)
        kw64 = {n: x.double() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
        o64, S64 = rule.recurrent(q.double(), k.double(), v.double(), **kw64)
        olp, Slp = rule.recurrent(q, k, v, **kw)
    assert_matches(o, olp, o64, dtype, "output")
    assert_matches(S, Slp, S64, dtype, "final state")


@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_several_key_blocks(device, seed, name, opts):
    """K = V = 72: the kernels' loops and grids over key and value blocks run more than once in both
    (the other small shapes fit in one block), including the 32-wide key blocks of the delta WY
    backward and the per-(key block, value block) parts of the scalar decay gradient."""
    rule = get_rule(name)
    leaves = make_leaves(rule, 1, 70, 2, 72, 72, torch.float32, seed, device)
    check_against_reference(rule, opts, leaves, torch.float32)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_four_key_blocks_of_the_state(device, seed, name):
    """K = 200: the delta reverse state pass holds its state as four 64-row key blocks, the last one
    partly past K; two segments, one with a partial chunk."""
    rule = get_rule(name)
    cu = torch.tensor([0, 64, 134], device=device)
    leaves = make_leaves(rule, 1, 134, 1, 200, 24, torch.float32, seed, device, N=2)
    check_against_reference(rule, {}, leaves, torch.float32, cu_seqlens=cu)


@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_no_state_and_custom_scale(device, seed, name, opts, T):
    """No initial state, no final state (so no gradient flows in from it), scale != K^-0.5."""
    rule = get_rule(name)
    leaves = make_leaves(rule, 1, T, 2, 32, 16, torch.float32, seed, device, with_state=False)
    check_against_reference(rule, opts, leaves, torch.float32, with_state=False, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_step_kernel_matches_reference(device, seed, name, opts, dtype):
    """The fused recurrent decoding kernel, one token at a time from a random state; on CUDA through
    ``rule.step`` (which uses it), under the interpreter through the binding directly."""
    rule = get_rule(name)
    B, T, H, K, V = 2, 6, 2, 20, 24
    leaves = make_leaves(rule, B, T, H, K, V, dtype, seed, device)
    q, k, v, S = leaves.pop("q"), leaves.pop("k"), leaves.pop("v"), leaves.pop("initial_state")
    gates = leaves
    o64, S64 = rule.recurrent(q.to(F64), k.to(F64), v.to(F64), initial_state=S.to(F64), output_final_state=True,
                              **{n: x.to(F64) for n, x in gates.items()}, **opts)
    olp, Slp = rule.recurrent(q, k, v, initial_state=S, output_final_state=True, **gates, **opts)
    outs = []
    for t in range(T):
        args = (q[:, t], k[:, t], v[:, t], S)
        g_t = {n: x[:, t] for n, x in gates.items()}
        if device == "cuda":
            o_t, S = rule.step(*args, position=t, **g_t, **opts)
        else:  # what rule.step hands the kernel: the inputs in the terms of the rule's kernel family
            k_t, g_t = rule.kernel_inputs(k[:, t], g_t)
            o_t, S = _triton.step(name, q[:, t], k_t, v[:, t], S, g_t, K**-0.5, t, {**rule.options, **opts})
        outs.append(o_t)
    assert_matches(torch.stack(outs, 1), olp, o64, dtype, "step outputs")
    assert_matches(S, Slp, S64, dtype, "step state")


INDEXED = [(n, o) for n, o in VARIANTS if n not in ("titans", "ttt")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "opts"), INDEXED, ids=[n for n, _ in INDEXED])
def test_indexed_step_kernel_updates_states_in_place(device, seed, name, opts, dtype):
    """The decoding kernel on states where they live (a MoM cache's layout): rows 0, 1, 2 step the states in
    slots 4, 0, 2 of a buffer of 5; row 1 is not kept, so its slot never changes and every one of its steps
    reads the original state; slots 1 and 3 are nobody's and stay as they were, bit for bit."""
    rule = get_rule(name)
    n, T, H, K, V = 3, 5, 2, 20, 24
    assert _triton.has_step_into(name)
    leaves = make_leaves(rule, n, T, H, K, V, dtype, seed, device, N=5)
    q, k, v, states = leaves.pop("q"), leaves.pop("k"), leaves.pop("v"), leaves.pop("initial_state").float()
    gates, original = leaves, states.clone()
    slots = torch.tensor([4, 0, 2], device=device)
    keep = torch.tensor([True, False, True], device=device)
    outs = []
    for t in range(T):
        g_t = {x: y[:, t] for x, y in gates.items()}
        if device == "cuda":
            outs.append(rule.step_into(q[:, t], k[:, t], v[:, t], states, slots, keep, **g_t, **opts))
        else:  # what rule.step_into hands the kernel
            k_t, g_t = rule.kernel_inputs(k[:, t], g_t)
            outs.append(_triton.step_into(name, q[:, t], k_t, v[:, t], states, slots, keep, g_t, K**-0.5))
    o = torch.stack(outs, 1)
    S0 = original[slots]
    ref = {x: y.to(F64) for x, y in gates.items()}
    o64, S64 = rule.recurrent(q.to(F64), k.to(F64), v.to(F64), initial_state=S0.to(F64), output_final_state=True,
                              **ref, **opts)
    olp, Slp = rule.recurrent(q, k, v, initial_state=S0, output_final_state=True, **gates, **opts)
    kept = [0, 2]
    assert_matches(o[kept], olp[kept], o64[kept], dtype, "outputs of the kept rows")
    assert_matches(states[slots[kept]], Slp[kept], S64[kept], dtype, "states of the kept rows")
    # the row that is not kept: each step from the original state, one token at a time
    one = [rule.recurrent(q[1:2, t:t + 1].to(F64), k[1:2, t:t + 1].to(F64), v[1:2, t:t + 1].to(F64),
                          initial_state=S0[1:2].to(F64), **{x: y[1:2, t:t + 1] for x, y in ref.items()}, **opts)[0]
           for t in range(T)]
    one_lp = [rule.recurrent(q[1:2, t:t + 1], k[1:2, t:t + 1], v[1:2, t:t + 1], initial_state=S0[1:2],
                             **{x: y[1:2, t:t + 1] for x, y in gates.items()}, **opts)[0] for t in range(T)]
    assert_matches(o[1:2], torch.cat(one_lp, 1), torch.cat(one, 1), dtype, "outputs of the row not kept")
    untouched = [0, 1, 3]  # slot 0 is the row not kept
    assert torch.equal(states[untouched], original[untouched]), "a slot that no kept row owns changed"


@pytest.mark.gpu
def test_rule_step_into_allocates_no_state_sized_buffer(seed):
    """A decoding step reads and writes the selected states where they live: beyond its outputs it
    allocates nothing near the size of the n states it steps (a zero initial state of that size, made
    and dropped every step, cost a memset of n states per layer and token)."""
    rule = get_rule("gated_deltanet")
    n, H, K, V = 8, 2, 128, 128
    leaves = make_leaves(rule, n, 1, H, K, V, torch.bfloat16, seed, "cuda", N=n + 2)
    q, k, v, states = leaves.pop("q"), leaves.pop("k"), leaves.pop("v"), leaves.pop("initial_state").float()
    slots = torch.randperm(n + 2, device="cuda")[:n]
    keep = torch.ones(n, dtype=torch.bool, device="cuda")
    gates = {x: y[:, 0] for x, y in leaves.items()}
    rule.step_into(q[:, 0], k[:, 0], v[:, 0], states, slots, keep, **gates)  # compiled before measuring
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    rule.step_into(q[:, 0], k[:, 0], v[:, 0], states, slots, keep, **gates)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    state_bytes = n * H * K * V * 4
    assert extra < state_bytes / 4, f"step_into allocated {extra} bytes; the {n} states are {state_bytes}"


@pytest.mark.parametrize("case", ["titans_alpha1_eta0", "titans_eta1", "delta_beta1", "gla_strong_decay",
                                  "mamba2_strong_decay", "gated_deltanet_strong_decay",
                                  "gated_deltanet_strong_decay_summed"])
def test_gate_domain_edges(device, seed, case, monkeypatch, request):
    """Gates at the ends of their domains: exact zeros and ones (titans' cumulative products through
    an exact zero), beta = 1, log decays around -8 per token (gated_deltanet also with its state passes summing
    each chunk's decays in their loop: launch option GC=0)."""
    name = {"titans_alpha1_eta0": "titans", "titans_eta1": "titans", "delta_beta1": "gated_deltanet",
            "gla_strong_decay": "gla", "mamba2_strong_decay": "mamba2",
            "gated_deltanet_strong_decay": "gated_deltanet",
            "gated_deltanet_strong_decay_summed": "gated_deltanet"}[case]
    rule = get_rule(name)
    regime = "strong_decay" if "strong_decay" in case else "typical"
    if case.endswith("_summed"):
        monkeypatch.setitem(_common.LAUNCH, "delta.fwd_h", {"GC": 0})
        monkeypatch.setitem(_common.LAUNCH, "delta.bwd_dh", {"GC": 0})
        seed = zlib.crc32(request.node.nodeid.replace("_summed]", "]").encode())  # the inputs of the case above
    leaves = make_leaves(rule, 1, 70, 2, 16, 16, torch.float32, seed, device, regime=regime)
    if case == "titans_alpha1_eta0":
        gen = torch.Generator().manual_seed(seed)
        pick = (torch.rand(leaves["alpha"].shape, generator=gen) < 0.2).to(device)
        leaves["alpha"] = torch.where(pick, 1.0, leaves["alpha"])
        leaves["eta"] = torch.where(pick.roll(3, 1), 0.0, leaves["eta"])
    if case == "titans_eta1":
        leaves["eta"] = torch.ones_like(leaves["eta"])
        leaves["alpha"] = torch.zeros_like(leaves["alpha"])
    if case == "delta_beta1":
        leaves["beta"] = torch.ones_like(leaves["beta"])
    opts = {"mini_batch": 4} if name == "titans" else {}
    check_against_reference(rule, opts, leaves, torch.float32)


def test_float64_is_refused_with_the_reason(device):
    rule = get_rule("gated_deltanet")
    q, k, v, g = random_inputs(rule, 1, 8, 2, 16, 16, F64)
    q, k, v, g = q.to(device), k.to(device), v.to(device), {n: x.to(device) for n, x in g.items()}
    with pytest.raises(RuntimeError, match="impl='triton' cannot run.*float32, float16 or bfloat16.*float64"):
        rule.forward(q, k, v, impl="triton", **g)
    o, _ = rule.forward(q, k, v, impl="auto", **g)  # falls back to the chunked path, as documented
    assert o.dtype == F64


# ---------------------------------------------------------------------------------------------- GPU sizes
SIZES = [  # (T, K, V, dtype)
    (1, 32, 32, torch.bfloat16),
    (63, 64, 64, torch.bfloat16),
    (64, 128, 128, torch.bfloat16),
    (65, 100, 100, torch.float32),
    (65, 256, 32, torch.float16),
    (130, 32, 256, torch.bfloat16),
    (1000, 100, 64, torch.float16),
    (1000, 256, 256, torch.bfloat16),
]
SIZE_IDS = [f"T{T}-K{K}-V{V}-{str(d).split('.')[-1]}" for T, K, V, d in SIZES]
# The float64 token loop keeps every step's state for autograd: at T = 1000, K = V = 256 that is 4-10 GiB
# per test (titans the most). These run one at a time on one worker (tests/kernels/conftest.py).
LARGE_REFERENCE = pytest.mark.xdist_group("large_reference")
SIZE_PARAMS = [pytest.param(*s, id=i, marks=[LARGE_REFERENCE] if s[0] * s[1] * s[2] >= 2**24 else [])
               for s, i in zip(SIZES, SIZE_IDS, strict=True)]


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "K", "V", "dtype"), SIZE_PARAMS)
@pytest.mark.parametrize(("name", "opts"), VARIANTS, ids=VARIANT_IDS)
def test_odd_sizes_on_gpu(seed, name, opts, T, K, V, dtype, record_property):
    rule = get_rule(name)
    leaves = make_leaves(rule, 2, T, 2, K, V, dtype, seed, "cuda")
    check_against_reference(rule, opts, leaves, dtype, record=record_property)


@pytest.mark.gpu
@LARGE_REFERENCE
@pytest.mark.parametrize(("name", "opts"), VARIANTS[:7], ids=VARIANT_IDS[:7])
def test_long_sequence_on_gpu(seed, name, opts, record_property):
    """T = 65,536 with strong decay (log decays around -8 per token; titans: alpha, theta and eta
    around 0.9, strong forgetting) or, for deltanet, beta near 1: finite and matching the chunked
    PyTorch path (float64 as the reference, the chunked path on the bfloat16 inputs as the
    low-precision one)."""
    rule = get_rule(name)
    regime = "saturated" if name == "deltanet" else "strong_decay"
    leaves = make_leaves(rule, 1, 65536, 2, 64, 64, torch.bfloat16, seed, "cuda", regime=regime)
    check_against_reference(rule, opts, leaves, torch.bfloat16, record=record_property, reference=rule.chunked)
