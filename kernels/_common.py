"""Helpers shared by every kernel family: the chunk layout of (packed) sequences, block sizes, dtypes.

Every kernel sees its input as one packed sequence of tokens ``[1, Ttot, H, *]``: a batch ``[B, T]``
is ``B`` segments of ``T`` tokens (``cu_seqlens = [0, T, 2T, ...]``). Each segment is cut into chunks
of ``BT`` tokens starting at the segment's first token; the chunks of all segments, in segment order,
are numbered ``0 .. NT-1`` (``chunk_indices[c] = (segment, chunk within the segment)``,
``chunk_offsets[n]`` = the first chunk of segment ``n``). Per-chunk buffers (chunk states ``h``)
are indexed by that global chunk number. Empty segments own no chunk.

Axis letters: T tokens, H heads, K key dim, V value dim, N segments, NT chunks, BT chunk length.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

CHUNK = 64  # tokens per chunk (BT) for every chunked kernel
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ChunkMeta:
    cu: Tensor  # [N + 1] int64 token offsets of the segments
    chunk_indices: Tensor  # [NT, 2] int32: (segment, chunk within segment)
    chunk_offsets: Tensor  # [N + 1] int32: first global chunk of each segment
    num_segments: int
    num_chunks: int
    max_chunks: int  # chunks of the longest segment
    order: Tensor  # [N] int32: the segments by decreasing length (ties in segment order)
    cu_host: tuple[int, ...]  # ``cu`` on the host
    chunk: int  # BT: tokens per chunk


def chunk_meta(B: int, T: int, cu_seqlens: Tensor | tuple[int, ...] | None, BT: int,
               device: torch.device) -> ChunkMeta:
    """The chunk layout for a batch ``[B, T]`` or a packed input with ``cu_seqlens`` (B = 1; a tensor, or
    the offsets as a tuple of ints)."""
    if cu_seqlens is None:
        cu = tuple(range(0, B * T + 1, T))
    elif isinstance(cu_seqlens, (tuple, list)):  # offsets already on the host
        cu = tuple(cu_seqlens)
    else:
        cu = tuple(int(x) for x in cu_seqlens.tolist())
    return _chunk_meta(cu, BT, device)


@functools.lru_cache(maxsize=128)
def _chunk_meta(cu: tuple[int, ...], BT: int, device: torch.device) -> ChunkMeta:
    # NumPy and two host-to-device copies: a MoM call has thousands of segments, and Python lists built
    # per segment, with one copy per tensor, made this milliseconds of host time per layer call
    offs = np.asarray(cu, dtype=np.int64)
    n_chunks = (np.diff(offs) + BT - 1) // BT
    chunk_offsets = np.concatenate([[0], np.cumsum(n_chunks)])
    NT = int(chunk_offsets[-1])
    if NT:
        seg = np.repeat(np.arange(len(n_chunks)), n_chunks)
        idx = np.stack([seg, np.arange(NT) - chunk_offsets[:-1][seg]], 1)
    else:
        idx = np.zeros((1, 2), dtype=np.int64)
    order = np.argsort(-n_chunks, kind="stable")
    # the int32 tensors as views of one buffer, each starting on a 16-byte boundary (Triton specializes
    # pointers on that alignment)
    parts = [idx.reshape(-1), chunk_offsets, order]
    starts = [0]
    for a in parts:
        starts.append(starts[-1] + -(-len(a) // 4) * 4)
    buf = np.zeros(starts[-1], dtype=np.int32)
    for a, s0 in zip(parts, starts[:-1], strict=True):
        buf[s0 : s0 + len(a)] = a
    dev = torch.from_numpy(buf).to(device)
    idx_t, off_t, order_t = (dev[s0 : s0 + len(a)] for a, s0 in zip(parts, starts[:-1], strict=True))
    return ChunkMeta(
        cu=torch.from_numpy(offs).to(device),
        chunk_indices=idx_t.view(-1, 2),
        chunk_offsets=off_t,
        num_segments=len(n_chunks),
        num_chunks=NT,
        max_chunks=int(n_chunks.max()) if len(n_chunks) else 0,
        order=order_t,
        cu_host=cu,
        chunk=BT,
    )


def state_groups(meta: ChunkMeta, programs_per_segment: int, state_bytes: int, budget: int,
                 slots: int) -> list[tuple[int, int]]:
    """Contiguous row ranges ``(a, b)`` of the packed input, for a delta forward and backward run group by
    group, so that the per-chunk state buffers of one group (``state_bytes`` per chunk, for all heads) stay
    within ``budget`` bytes, or a quarter of the whole batch's where that is more, where that costs little
    time; otherwise fewer groups, down to one (``[(0, Ttot)]``).

    Cuts fall on chunk starts: on a segment's first row where one lies within an eighth of a group's share
    of chunks, otherwise inside a segment, whose state the group before then hands on to the group after
    (``range_pieces``). The sequential state passes run ``programs_per_segment`` programs per segment piece,
    each as long as its piece, about ``slots`` at once, longest first: a group's pass takes between
    ``chunks * programs_per_segment / slots`` and that plus its longest piece (in chunk-steps), and the
    groups run one after another. The model takes the middle, ``work / slots + longest / 2``, and keeps the
    most groups (at most what the budget asks) that cost at most half again the whole batch's pass: a MoM
    call packs many segments per memory and splits almost for free; a few long sequences split at a cost
    (a piece of the longest then runs after the others instead of beside them). H100, MoM layer, K = V =
    256, forward+backward at a 64 MiB budget against 128 (benchmarks/results/state_budget_h100_7e7db1b.txt):
    four groups at B4 T2048 M4 cost 4 % of the layer's GPU time, three at B1 T8192 6 %."""
    BT = meta.chunk
    cu = meta.cu_host
    whole = [(0, cu[-1])]
    if meta.num_chunks * state_bytes <= budget:  # the common case, decided without a loop over segments
        return whole
    chunks = [(b - a + BT - 1) // BT for a, b in itertools.pairwise(cu)]
    starts = [0, *itertools.accumulate(chunks)]
    total = starts[-1]

    def row(c):  # the first row of global chunk c < total (its segment: the last to start at or before c)
        n = bisect.bisect_right(starts, c) - 1
        return cu[n] + (c - starts[n]) * BT

    seg_starts = sorted({starts[n] for n in range(len(chunks)) if chunks[n]})

    def cost(cuts):
        out = 0.0
        for c0, c1 in itertools.pairwise(cuts):
            longest = max(min(starts[n + 1], c1) - max(starts[n], c0) for n in range(len(chunks))
                          if starts[n] < c1 and starts[n + 1] > c0)
            out += (c1 - c0) * programs_per_segment / slots + longest / 2
        return out

    def split(G):  # chunk indices near each multiple of total / G, on a segment start where one is near
        near = total / (8 * G)
        cuts = [0]
        for k in range(1, G):
            t = round(k * total / G)
            i = bisect.bisect_left(seg_starts, t)
            best = min(seg_starts[max(i - 1, 0): i + 1], key=lambda c: abs(c - t), default=t)
            c = best if abs(best - t) <= near else t
            if cuts[-1] < c < total:
                cuts.append(c)
        return [*cuts, total]

    need = -(-total * state_bytes // max(budget, total * state_bytes // 4))
    limit = 1.5 * cost([0, total])
    for G in range(min(total, need), 1, -1):
        cuts = split(G)
        if cost(cuts) <= limit:
            return list(itertools.pairwise([0, *(row(c) for c in cuts[1:-1]), cu[-1]]))
    return whole


def range_pieces(cu: tuple[int, ...], a: int, b: int) -> list[tuple[int, int, int]]:
    """The segments of rows ``a .. b`` (a group of ``state_groups``) as pieces ``(n, lo, hi)``: segment ``n``'s
    rows ``lo .. hi`` in the group, in order. A piece with ``lo`` past its segment's first row starts from the
    state the group before left; one with ``hi`` short of its segment's end hands its state to the next
    group. Empty segments belong to the group where they start (the last group: also those at the end)."""
    out = []
    last = b == cu[-1]
    for n in range(max(bisect.bisect_left(cu, a) - 1, 0), len(cu) - 1):
        s, e = cu[n], cu[n + 1]
        if s > b or (s == b and not last):
            break
        if a <= s < b or s < a < e or (last and s == b):
            out.append((n, max(s, a), min(e, b)))
    return out


@functools.lru_cache(maxsize=8)
def program_slots(device: torch.device) -> int:
    """Programs of a state pass running at once: one per SM (their tiles fill its shared memory)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pow2(x: int, at_least: int = 32) -> int:
    """The block size covering ``x``: a power of two, at least ``at_least``. ``tl.dot`` needs 16; the
    default is 32 because on H100 with Triton 3.6, chunk kernels with 16-wide blocks gave wrong
    bfloat16 outputs and gradients at head dimension 16 (NaN for the delta rules), where masked
    32-wide blocks removed the delta forward's NaN (``test_key_dim_16_in_bfloat16`` checks every
    rule there against the float64 token loop)."""
    return max(at_least, triton.next_power_of_2(x))


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get exact float32 products (``ieee``); half inputs only use float32 dots on
    float32 intermediates, where tf32 is well below the inputs' own rounding."""
    return "ieee" if dtype == torch.float32 else "tf32"


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Chunk buffers (states, pseudo-values): bfloat16 for bfloat16 inputs, float32 otherwise
    (float16 states would overflow on long sums)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _tl(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float16: tl.float16}[dtype]


def dots(dtype: torch.dtype, inputs: bool = True) -> dict:
    """Constexpr arguments fixing the matmul operands for inputs of ``dtype``: ``IT`` for products of
    two inputs, ``WT`` for products involving intermediates, ``PREC`` for float32 operands, ``INTERP``
    for the CPU interpreter (see ``mm``)."""
    out = {"WT": _tl(work_dtype(dtype)), "INTERP": is_interpreting(), "PREC": dot_precision(dtype)}
    if inputs:
        out["IT"] = _tl(dtype)
    return out


@triton.jit
def mm(a, b, T: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with both operands rounded to ``T``, accumulated in float32. Triton 3.6's CPU
    interpreter multiplies bfloat16 operands as raw 16-bit integers, so there the rounded operands
    are multiplied as float32: the interpreter then reproduces the GPU's rounding exactly."""
    if INTERP:
        return tl.dot(a.to(T).to(tl.float32), b.to(T).to(tl.float32))
    else:
        return tl.dot(a.to(T), b.to(T), input_precision=PREC)


@triton.jit
def chunk_gram(a, b, tok, i_h, m_t, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
               IT: tl.constexpr, INTERP: tl.constexpr, PREC: tl.constexpr):
    """``A B^T [BT, BT]`` of one chunk's rows ``tok`` of two ``[Ttot, H, K]`` inputs, in float32, over key
    blocks of BK (``B`` loaded transposed, so no product result is transposed)."""
    acc = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        b_a = tl.load(a + tok[:, None] * H * K + i_h * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_bT = tl.load(b + tok[None, :] * H * K + i_h * K + o_k[:, None], mask=m_k[:, None] & m_t[None, :], other=0.0)
        acc += mm(b_a, b_bT, IT, INTERP, PREC)
    return acc


@triton.jit
def select_rows(sel, x, INTERP: tl.constexpr, PARTS: tl.constexpr):
    """``sel @ x`` for a 0/1 matrix ``sel`` and float32 ``x``, to float32 accuracy, on tensor cores:
    ``x`` is split exactly into ``PARTS`` bfloat16 parts (8 significant bits each; 3 for any float32,
    1 where ``x`` holds bfloat16 values) whose products with 0/1 are exact. Gathers, scatter-adds and
    segment sums of rows; the same as a ``[M, N, K]`` masked sum, which needs M * N * K / threads
    values per thread, or a float32 "ieee" product, which spills."""
    s = tl.where(sel, 1.0, 0.0).to(tl.bfloat16)
    x_hi = x.to(tl.bfloat16)
    if PARTS == 1:
        return mm(s, x_hi, tl.bfloat16, INTERP, "tf32")
    else:
        r = x - x_hi.to(tl.float32)
        x_mid = r.to(tl.bfloat16)
        x_lo = (r - x_mid.to(tl.float32)).to(tl.bfloat16)
        return (mm(s, x_lo, tl.bfloat16, INTERP, "tf32") + mm(s, x_mid, tl.bfloat16, INTERP, "tf32")
                + mm(s, x_hi, tl.bfloat16, INTERP, "tf32"))


@triton.jit
def chunk_start(chunk_indices, cu, i_t, BT: tl.constexpr):
    """Global chunk ``i_t``: (its first token, the tokens of its segment from there on, its first
    token's position in the segment)."""
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu + i_n)
    eos = tl.load(cu + i_n + 1)
    return bos + i_c * BT, eos - bos - i_c * BT, i_c * BT


@triton.jit
def segment_program(order, H: tl.constexpr, NB):
    """(segment, head, block) of this program in a 1-D grid of ``N * H * NB`` programs over segments,
    heads and ``NB`` independent blocks (of value columns), longest segment first.

    A sequential state pass costs its segment's length. A MoM call packs segments of unequal lengths
    (routed memories' shares and the shared memory's full sequences), several programs per SM-wave: the
    GPU starts programs in grid order, so launching the longest first keeps one long pass from starting
    last and running alone (longest-processing-time-first scheduling)."""
    pid = tl.program_id(0)
    i_b = pid % NB
    r = pid // NB
    return tl.load(order + r // H), r % H, i_b


@triton.jit
def segment_start(cu, chunk_offsets, i_n):
    """Segment ``i_n``: (its first token, its length, its first global chunk)."""
    bos = tl.load(cu + i_n)
    return bos, tl.load(cu + i_n + 1) - bos, tl.load(chunk_offsets + i_n).to(tl.int64)


LAUNCH_ENV = "MOMKIT_LAUNCH"
COMPILER_OPTIONS = ("num_warps", "num_stages")


def launch_options() -> dict[str, tuple[str, ...]]:
    """Per kernel name (``family.kernel``), the options ``LAUNCH`` takes for it: num_warps, num_stages and the
    keywords of its launcher's ``launch`` call, read from the kernels' source."""
    import pathlib
    import re

    out: dict[str, set[str]] = {}
    for f in sorted(pathlib.Path(__file__).parent.glob("**/*.py")):
        text = f.read_text()
        for m in re.finditer(r'launch\("([\w.]+)"', text):
            depth, i = 1, m.end()
            while depth and i < len(text):  # the call's arguments, nested calls included
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            args, words = text[m.end():i - 1], []
            depth = 0
            for j, ch in enumerate(args):  # keywords at the call's own level
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0 and ch == "=" and args[j + 1:j + 2] != "=" and args[j - 1:j] not in "=!<>":
                    words.append(re.findall(r"(\w+)\s*$", args[:j])[-1])
            out.setdefault(m.group(1), set()).update(words)
    return {k: tuple(sorted(set(COMPILER_OPTIONS) | v)) for k, v in sorted(out.items())}


def launch_keys() -> list[str]:
    """The kernel names ``LAUNCH`` takes (``family.kernel``)."""
    return list(launch_options())


def parse_launch(items: list[str], source: str) -> dict[str, dict[str, int]]:
    """``kernel:option=value`` items -> ``{kernel: {option: value}}``; ``source`` names where they came from in
    the error for a bad item. Errors are ``ConfigError`` (a ValueError): the command line reports them as one
    line."""
    from momkit.config import ConfigError

    options = launch_options()
    out: dict[str, dict[str, int]] = {}
    for item in items:
        kern, _, opt = item.partition(":")
        key, _, val = opt.partition("=")
        if kern not in options or not key:
            raise ConfigError(f"{source} item {item!r} is invalid: expected kernel:option=value with kernel one of "
                              f"{', '.join(options)}")
        if key not in options[kern]:
            raise ConfigError(f"{source} item {item!r} is invalid: kernel {kern} takes {', '.join(options[kern])}")
        if not val.isdigit() or int(val) < 1:
            raise ConfigError(f"{source} item {item!r} is invalid: the value must be a positive integer")
        out.setdefault(kern, {})[key] = int(val)
    return out


def _launch_from_env() -> dict[str, dict[str, int]]:
    import os

    value = os.environ.get(LAUNCH_ENV, "").replace(",", " ").split()
    return parse_launch(value, f"environment variable {LAUNCH_ENV}") if value else {}


# Launch options (num_warps, num_stages, the block sizes a launcher passes) per kernel, on top of each
# launcher's defaults. Empty in normal use; benchmarks/gpu_debug.py and tuning runs override entries to
# compare configurations, and MOMKIT_LAUNCH (e.g. "gl.fwd_o:BV=64 gl.fwd_o:num_warps=8") sets entries in
# every process that imports the kernels, sweep workers included.
LAUNCH: dict[str, dict] = _launch_from_env()


def launch(name: str, **defaults) -> dict:
    override = LAUNCH.get(name, {})
    bad = [k for k in override if k not in defaults and k not in COMPILER_OPTIONS]
    if bad:
        from momkit.config import ConfigError

        allowed = ", ".join([*COMPILER_OPTIONS, *defaults])
        raise ConfigError(f"launch option {bad[0]}={override[bad[0]]} for kernel {name} (LAUNCH or {LAUNCH_ENV}) is "
                         f"invalid: its launcher takes {allowed}")
    return {**defaults, **override}


@functools.lru_cache(maxsize=8)
def _is_hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def mixed_block_warps(name: str, opts: dict, device: torch.device, miscompiled: bool) -> dict:
    """Kernel ``name``'s launch ``opts`` with two warps where ``miscompiled`` on a Hopper GPU, unless its launch
    options (``LAUNCH``, ``MOMKIT_LAUNCH``) set the warps.

    Triton 3.6 compiles some of the chunk kernels wrongly for Hopper's warpgroup products (wgmma) when their
    key and value blocks differ in width: on an H100, bfloat16, against the float64 loop, the output and
    local-dv kernels with value blocks narrower than their key blocks (K = 64 with V = 16 or 32: wrong outputs
    and value gradients, out-of-bounds shared-memory reads at a batch of 256 x 128), the WY forward likewise
    (K = 64 or 128 with V <= 32: wrong delta-rule outputs, NaN at K = 128) and the delta gradient kernel with
    value blocks wider than its key blocks (K = 32, V = 64: wrong q and gate gradients). Four or eight warps
    and one pipeline stage gave the same; two warps (less than a warpgroup, so Triton uses the older mma.sync
    products) and ``DISABLE_MMA_V3=1`` both gave results within tolerance everywhere. Equal blocks (every
    width of 64 and up) keep the warpgroup products; ``test_chunk_kernels.py`` checks the mixed widths."""
    if miscompiled and "num_warps" not in LAUNCH.get(name, {}) and _is_hopper(device) and not is_interpreting():
        return {**opts, "num_warps": 2}
    return opts


def state_stages(BK: int, wdt: torch.dtype) -> int:
    """Pipeline depth of the sequential state kernels: their tiles span all of K, and at K = 256 (or
    K >= 128 in float32) two stages of them overflow Hopper's 227 KiB of shared memory."""
    return 1 if BK >= 256 or (wdt == torch.float32 and BK >= 128) else 2


def check_dtype(*xs: Tensor | None) -> None:
    for x in xs:
        if x is not None and x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"momkit.kernels takes float32, float16 or bfloat16 tensors, got {x.dtype}")


def contiguous(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def is_interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


_interpreter_checked = False


def interpreter_compat() -> None:
    """Make Triton 3.6's CPU interpreter run data-dependent loops under NumPy >= 2.4.

    The interpreter holds every scalar as a 1-element array and turns loop bounds into ints with
    ``int(array)``, which NumPy 2.4 refuses for arrays of one dimension. Called before launches (not
    at import); patches nothing unless interpreting and NumPy actually refuses.
    """
    global _interpreter_checked
    if _interpreter_checked or not is_interpreting():
        return
    _interpreter_checked = True
    import numpy as np

    try:
        int(np.ones(1, dtype=np.int64))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
