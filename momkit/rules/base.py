"""The update-rule interface: validation, the token loop, the chunk driver and impl dispatch.

A rule is a linear recurrence on a matrix memory ``S`` (``K x V`` per head). Subclasses provide
the math of one token (``_step``), the chunk-parallel core (``_chunk``) and the gate module; this
base class provides everything generic, so a new rule is one file.

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; per-head gates ``[B, T, H]``; per-channel gates
``[B, T, H, K]``; state ``[B, H, K, V]`` (or ``[B, H, slots, K, V]`` for a rule whose state is several
matrices, see ``state_slots``). Packed variable-length input is ``B = 1`` with ``cu_seqlens`` (an int64
tensor of offsets, or the same offsets as a tuple of ints, which spares the kernels a device sync).
States are float32, or float64 for float64 inputs. Every sequence op returns ``(o, final_state)``.
The output at token t reads the state after t's own update: ``o_t = scale * S_t^T q_t``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from momkit.rules import _triton
from momkit.rules._chunking import ChunkPlan, from_rows, make_plan, to_rows

Tensor = torch.Tensor
Impl = Literal["auto", "recurrent", "chunked", "triton"]
IMPLS = ("auto", "recurrent", "chunked", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class GateSpec:
    """One gate of a rule.

    ``per_channel``: shape ``[B, T, H, K]`` instead of ``[B, T, H]``. ``neutral``: the value that,
    with ``k = v = 0``, leaves the state unchanged (used to pad chunks). ``domain``: the values the
    math is meant for: ``"log_decay"`` (<= 0), ``"unit"`` ([0, 1]) or ``"nonnegative"``.
    """

    name: str
    per_channel: bool
    neutral: float
    domain: Literal["log_decay", "unit", "nonnegative"]
    doc: str = ""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulations: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Rule:
    """Base class of an update rule. Subclass, fill the class attributes, register the instance."""

    name: ClassVar[str]
    gates: ClassVar[tuple[GateSpec, ...]] = ()
    # Extra rule hyper-parameters (not tensors), with defaults, e.g. titans' mini_batch.
    options: ClassVar[dict[str, Any]] = {}
    # Option settings worth testing beyond the defaults (the generic test suite runs each).
    option_variants: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # Delta rules and titans read and write with L2-normalised q and k (see prepare_qk).
    normalize_qk: ClassVar[bool] = False
    # None: state [N, H, K, V]. An int s: state [N, H, s, K, V]; slot 0 is the memory that q reads.
    state_slots: ClassVar[int | None] = None
    # False for a rule that makes its key from its gates and ignores the k it is given (hgrn2): k then
    # gets no gradient, and a layer's k projection goes unused.
    uses_key: ClassVar[bool] = True
    doc: ClassVar[str] = ""

    # ------------------------------------------------------------------ public API
    @property
    def gate_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.gates)

    def state_shape(self, n: int, num_heads: int, head_k_dim: int, head_v_dim: int) -> tuple[int, ...]:
        if self.state_slots is None:
            return (n, num_heads, head_k_dim, head_v_dim)
        return (n, num_heads, self.state_slots, head_k_dim, head_v_dim)

    def init_state(self, n: int, num_heads: int, head_k_dim: int, head_v_dim: int,
                   dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
        """A zero state for ``n`` sequences."""
        return torch.zeros(self.state_shape(n, num_heads, head_k_dim, head_v_dim), dtype=dtype, device=device)

    def memory(self, state: Tensor) -> Tensor:
        """The ``[N, H, K, V]`` matrix that queries read (``state`` itself, or its slot 0)."""
        return state if self.state_slots is None else state[:, :, 0]

    def prepare_qk(self, q: Tensor, k: Tensor, fused: bool = False) -> tuple[Tensor, Tensor]:
        """The rule's query/key treatment, applied by layers before the rule runs; ``fused``: as one
        Triton kernel each (``momkit.kernels.norms``), the layers' GPU path."""
        if self.normalize_qk:
            if fused:
                from momkit.kernels.norms import l2_norm

                return l2_norm(q), l2_norm(k)
            return l2_normalize(q), l2_normalize(k)
        return q, k

    def gate_module(self, hidden_size: int, num_heads: int, head_k_dim: int) -> nn.Module:
        """An ``nn.Module`` mapping ``x [B, T, D]`` to this rule's gates (a dict of tensors)."""
        raise NotImplementedError

    def recurrent(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                  initial_state: Tensor | None = None, output_final_state: bool = False,
                  cu_seqlens: Tensor | None = None, **gates: Any) -> tuple[Tensor, Tensor | None]:
        """The plain token loop (the ground truth): ``step`` applied to each token in order."""
        gates, opts = self._split_kwargs(gates)
        scale, S0, segs = self._validate(q, k, v, gates, scale, initial_state, cu_seqlens)
        cdt, out_dtype = compute_dtype(q.dtype), v.dtype
        q, k, v = (x.to(cdt) for x in (q, k, v))
        gates = {n: x.to(cdt) for n, x in gates.items()}
        outs, finals = [], []
        for i, (start, length) in enumerate(segs):
            if cu_seqlens is None:  # segment i is batch row i
                rows, span = slice(i, i + 1), slice(0, length)
            else:
                rows, span = slice(0, 1), slice(start, start + length)
            S = S0[i : i + 1]
            for t in range(length):
                tt = span.start + t
                o_t, S = self._step(
                    q[rows, tt], k[rows, tt], v[rows, tt], S,
                    {n: x[rows, tt] for n, x in gates.items()}, scale, t, opts,
                )
                outs.append(o_t)
            finals.append(S)
        T = q.shape[1]
        if cu_seqlens is None:
            o = torch.stack(outs, 0).view(q.shape[0], T, *outs[0].shape[1:])
        else:
            o = torch.cat(outs, 0)[None]
        final = torch.cat(finals, 0)
        return o.to(out_dtype), (final if output_final_state else None)

    def chunked(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
                initial_state: Tensor | None = None, output_final_state: bool = False,
                chunk_size: int = 64, cu_seqlens: Tensor | None = None,
                **gates: Any) -> tuple[Tensor, Tensor | None]:
        """Chunk-parallel PyTorch (differentiable, no loop over tokens): the CPU path."""
        gates, opts = self._split_kwargs(gates)
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        scale, S0, segs = self._validate(q, k, v, gates, scale, initial_state, cu_seqlens)
        B, T = q.shape[:2]
        cdt = compute_dtype(q.dtype)
        C = self._chunk_len(chunk_size, opts)
        if cu_seqlens is None:
            starts = [b * T for b in range(B)]
        else:
            starts = [s for s, _ in segs]
        plan = make_plan([L for _, L in segs], starts, C, q.device)

        def rows(x: Tensor, neutral: float) -> Tensor:
            return to_rows(x.to(cdt).flatten(0, 1), plan, neutral)

        qr, kr, vr = rows(q, 0.0), rows(k, 0.0), rows(v, 0.0)
        gr = {g.name: rows(gates[g.name], g.neutral) for g in self.gates}
        o_rows, final = self._chunk(qr, kr, vr, gr, scale, S0, plan, opts)
        o = from_rows(o_rows, plan).view(v.shape).to(v.dtype)
        return o, (final if output_final_state else None)

    def step(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor, *, scale: float | None = None,
             position: int | Tensor | None = None, **gates: Any) -> tuple[Tensor, Tensor]:
        """One decoding step. q, k ``[B, H, K]``, v ``[B, H, V]``, gates ``[B, H]`` or ``[B, H, K]``.

        ``position`` is the index of this token in its sequence (an int or ``[B]``); only rules whose
        math depends on it (titans with ``mini_batch > 1``) need it. Returns ``(o [B, H, V], state)``.
        """
        gates, opts = self._split_kwargs(gates)
        self._check_step_inputs(q, k, v, gates)
        scale, S, _ = self._validate(q[:, None], k[:, None], v[:, None],
                                     {n: x[:, None] for n, x in gates.items()}, scale, state, None,
                                     name_state="state")
        if q.is_cuda and self.triton_unavailable_reason(q) is None:
            k, gates = self.kernel_inputs(k, gates)
            return _triton.step(self.name, q, k, v, S, gates, scale, position, opts)
        cdt = compute_dtype(q.dtype)
        o, S = self._step(q.to(cdt), k.to(cdt), v.to(cdt), S,
                          {n: x.to(cdt) for n, x in gates.items()}, scale, position, opts)
        return o.to(v.dtype), S

    def step_into(self, q: Tensor, k: Tensor, v: Tensor, states: Tensor, slots: Tensor, keep: Tensor, *,
                  scale: float | None = None, position: int | Tensor | None = None, **gates: Any) -> Tensor:
        """One decoding step for n rows whose states are rows of ``states`` ``[N, *state]``: row i reads
        ``states[slots[i]]`` and, where ``keep[i]``, writes its new state there, in place (``slots`` [n]
        distinct, ``keep`` [n] bool). q, k ``[n, H, K]``, v ``[n, H, V]``, gates as in ``step``; returns
        o ``[n, H, V]``. The same as ``step`` on ``states[slots]`` and writing back the kept rows; on CUDA
        the rules with an indexed kernel (``momkit.kernels.has_step_into``: the gated linear and delta
        families) read and write each state once, in place, when ``states`` is contiguous float32."""
        if not all(isinstance(x, torch.Tensor) for x in (states, slots, keep)):
            raise ValueError("step_into expects states, slots and keep as tensors")
        if slots.shape != (q.shape[0],) or keep.shape != (q.shape[0],):
            raise ValueError(f"slots and keep must have shape [{q.shape[0]}] (one per row of q), got "
                             f"{list(slots.shape)} and {list(keep.shape)}")
        if (q.is_cuda and states.dtype == torch.float32 and states.is_contiguous()
                and self.triton_unavailable_reason(q) is None and _triton.has_step_into(self.name)):
            g, _ = self._split_kwargs(gates)
            self._check_step_inputs(q, k, v, g)
            H, K, V = q.shape[1], q.shape[2], v.shape[2]
            want = self.state_shape(1, H, K, V)[1:]
            if tuple(states.shape[1:]) != want:
                raise ValueError(f"states must have shape [N, {', '.join(map(str, want))}], got {list(states.shape)}")
            scale, _, _ = self._validate(q[:, None], k[:, None], v[:, None], {n: x[:, None] for n, x in g.items()},
                                         scale, None, None, make_state=False)
            k, g = self.kernel_inputs(k, g)
            return _triton.step_into(self.name, q, k, v, states, slots, keep, g, scale)
        old = states[slots]
        o, S = self.step(q, k, v, old, scale=scale, position=position, **gates)
        states[slots] = torch.where(keep.view(-1, *[1] * (S.dim() - 1)), S.to(states.dtype), old)
        return o

    def _check_step_inputs(self, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor]) -> None:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"step expects {name} of shape [B, H, D], got {got}")
        for spec in self.gates:
            x = gates[spec.name]
            want = tuple(q.shape) if spec.per_channel else tuple(q.shape[:2])
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"step: gate {spec.name!r} of rule {self.name!r} must have shape {list(want)}, "
                                 f"got {got}")

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, impl: Impl = "auto", chunk_size: int = 64,
                **kwargs: Any) -> tuple[Tensor, Tensor | None]:
        """Run the rule with ``impl``: "auto" (Triton for CUDA tensors, else chunked), "recurrent",
        "chunked" or "triton". An explicit impl that cannot run raises; nothing falls back."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "auto":
            impl = "triton" if q.is_cuda and self.triton_unavailable_reason(q) is None else "chunked"
        if impl == "recurrent":
            return self.recurrent(q, k, v, **kwargs)
        if impl == "chunked":
            return self.chunked(q, k, v, chunk_size=chunk_size, **kwargs)
        reason = self.triton_unavailable_reason(q)
        if reason is not None:
            raise RuntimeError(f"impl='triton' cannot run for rule {self.name!r}: {reason}")
        return self.triton(q, k, v, **kwargs)

    # ------------------------------------------------------------------ Triton binding
    def triton_unavailable_reason(self, q: Tensor) -> str | None:
        """None if the Triton kernels can run on ``q``'s device, else why not."""
        return _triton.unavailable_reason(self.name, q)

    def triton(self, q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None, **gates: Any) -> tuple[Tensor, Tensor | None]:
        """The Triton kernels (``momkit.kernels``), with the same arguments and checks as ``chunked``."""
        gates, opts = self._split_kwargs(gates)
        scale, _, _ = self._validate(q, k, v, gates, scale, initial_state, cu_seqlens, make_state=False)
        k, gates = self.kernel_inputs(k, gates)
        return _triton.chunk(self.name, q, k, v, gates, scale, initial_state, output_final_state, cu_seqlens, opts)

    def kernel_inputs(self, k: Tensor, gates: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The key and gates handed to the Triton kernels of the rule's family (inputs already validated;
        sequence ``[B, T, H, *]`` or one token ``[B, H, *]``). A rule defined over another rule's kernels maps
        its inputs here (hgrn2 its key, ttt titans' gates); the default passes them through."""
        return k, gates

    # ------------------------------------------------------------------ for subclasses
    def _step(self, q: Tensor, k: Tensor, v: Tensor, S: Tensor, gates: dict[str, Tensor],
              scale: float, position: int | Tensor | None, opts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """One token of the math, in the compute dtype: q, k ``[B, H, K]``, S the state."""
        raise NotImplementedError

    def _chunk(self, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], scale: float,
               S0: Tensor, plan: ChunkPlan, opts: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Chunk rows ``[R, H, C, *]`` -> (row outputs ``[R, H, C, V]``, final states in segment order)."""
        raise NotImplementedError

    def _chunk_len(self, chunk_size: int, opts: dict[str, Any]) -> int:
        """The chunk length actually used (a rule may need e.g. a multiple of its mini-batch)."""
        return chunk_size

    def _check_options(self, opts: dict[str, Any]) -> None:
        """Validate rule options (subclasses with options override)."""

    # ------------------------------------------------------------------ validation
    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        gates = {n: kwargs[n] for n in self.gate_names if n in kwargs}
        opts = {**self.options, **{n: kwargs[n] for n in self.options if n in kwargs}}
        unknown = sorted(set(kwargs) - set(gates) - set(self.options))
        if unknown:
            raise ValueError(
                f"unknown argument(s) {unknown} for rule {self.name!r}; its gates are "
                f"{list(self.gate_names) or 'none'} and its options {list(self.options) or 'none'}"
            )
        missing = [n for n in self.gate_names if n not in gates or gates[n] is None]
        if missing:
            raise ValueError(f"rule {self.name!r} needs gate(s) {missing} (its gates: {list(self.gate_names)})")
        self._check_options(opts)
        return gates, opts

    def _validate(self, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], scale: float | None,
                  initial_state: Tensor | None, cu_seqlens: Tensor | None,
                  name_state: str = "initial_state",
                  make_state: bool = True) -> tuple[float, Tensor | None, list[tuple[int, int]]]:
        """Check shapes, dtypes and devices; return (scale, initial state per segment, segments). Without
        ``make_state`` the state is only checked, and None comes back: the kernels take a missing initial
        state as zeros, and a zero ``[N, H, K, V]`` float32 tensor per call would cost them its memset."""
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must have shape [B, T, H, D], got {tuple(x.shape)}")
            if x.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if k.shape != q.shape:
            raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
        if v.shape[:3] != q.shape[:3]:
            raise ValueError(f"v must have shape [B, T, H, V] = {tuple(q.shape[:3])} + [V], got {tuple(v.shape)}")
        for name, x in (("k", k), ("v", v)):
            if x.dtype != q.dtype:
                raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k, v must share a dtype")
            if x.device != q.device:
                raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
        B, T, H, K = q.shape
        V = v.shape[-1]
        if T == 0:
            raise ValueError("q, k, v must hold at least one token (T >= 1)")
        for spec in self.gates:
            x = gates[spec.name]
            want = (B, T, H, K) if spec.per_channel else (B, T, H)
            if not isinstance(x, torch.Tensor) or tuple(x.shape) != want:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"gate {spec.name!r} of rule {self.name!r} must have shape {list(want)}, got {got}")
            if x.dtype not in FLOAT_DTYPES:
                raise ValueError(f"gate {spec.name!r} must be a float tensor, got {x.dtype}")
            if x.device != q.device:
                raise ValueError(f"gate {spec.name!r} is on {x.device} but q is on {q.device}")
        if scale is None:
            scale = K ** -0.5
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        segs = self._segments(B, T, cu_seqlens, q.device)
        n = len(segs)
        cdt = compute_dtype(q.dtype)
        want_state = self.state_shape(n, H, K, V)
        if initial_state is None:
            S0 = torch.zeros(want_state, dtype=cdt, device=q.device) if make_state else None
        else:
            if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want_state:
                got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else initial_state
                raise ValueError(f"{name_state} must have shape {list(want_state)}, got {got}")
            if initial_state.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name_state} must be a float tensor, got {initial_state.dtype}")
            if initial_state.device != q.device:
                raise ValueError(f"{name_state} is on {initial_state.device} but q is on {q.device}")
            S0 = initial_state.to(cdt) if make_state else None
        return float(scale), S0, segs

    @staticmethod
    def _segments(B: int, T: int, cu_seqlens: Tensor | None, device: torch.device) -> list[tuple[int, int]]:
        """(start, length) of every independent segment."""
        if cu_seqlens is None:
            return [(b * T, T) for b in range(B)]
        if isinstance(cu_seqlens, (tuple, list)):  # offsets already on the host: no device sync
            if len(cu_seqlens) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) for c in cu_seqlens):
                raise ValueError("cu_seqlens given as a sequence must hold >= 2 ints [0, ..., T], "
                                 f"got {list(cu_seqlens)[:8]}")
            cu = list(cu_seqlens)
        else:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
                raise ValueError("cu_seqlens must be a 1-D int64 tensor of offsets [0, ..., T] with >= 2 entries "
                                 "(or a tuple of ints)")
            if cu_seqlens.dtype != torch.int64:
                raise ValueError(f"cu_seqlens must have dtype int64, got {cu_seqlens.dtype}")
            cu = cu_seqlens.tolist()
        if B != 1:
            raise ValueError(f"packed input with cu_seqlens needs batch size 1, got B={B}")
        if cu[0] != 0 or cu[-1] != T:
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu[0]} ... {cu[-1]}")
        if any(b < a for a, b in itertools.pairwise(cu)):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
        return [(a, b - a) for a, b in itertools.pairwise(cu)]


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (never lowers the precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """``x / ||x||`` over the last axis (computed in float32 or better)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def outer(k: Tensor, v: Tensor) -> Tensor:
    """``k v^T`` per head: ``[B, H, K] x [B, H, V] -> [B, H, K, V]``."""
    return k[..., :, None] * v[..., None, :]


def read(q: Tensor, S: Tensor, scale: float) -> Tensor:
    """``scale * S^T q`` per head: ``[B, H, K], [B, H, K, V] -> [B, H, V]``."""
    return scale * (q[..., None, :] @ S)[..., 0, :]
