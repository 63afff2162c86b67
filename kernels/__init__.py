"""Triton kernels, imported as ``momkit.kernels``. Depends on torch and triton only, never on momkit.

Entry points used by ``momkit.rules`` (which validate inputs first):

* ``supported_rules() -> set[str]``: rules with kernels here.
* ``chunk(rule, q, k, v, gates, *, scale, initial_state, output_final_state, cu_seqlens, options)``
  -> ``(o, final_state)``: chunked forward, differentiable (autograd Functions).
* ``step(rule, q, k, v, state, gates, *, scale, position, options)`` -> ``(o, state)``: one token.

Families, one folder each with its derivation in ``README.md``:

* ``gated_linear``: linear_attn (no gate), retnet, lightning and mamba2 (per-head decay; mamba2 scales
  keys by ``dt``), gla and hgrn2 (per-channel decay): one kernel set switched by constexpr flags.
* ``delta``: deltanet and gated_deltanet, WY / UT form.
* ``titans``: mini-batch gradient descent with momentum and forgetting; ttt (no momentum, no forgetting).

A rule defined over another rule's kernels arrives here with its inputs already in that rule's terms
(``Rule.kernel_inputs``): hgrn2's key is ``1 - exp(g)``, ttt brings titans' ``alpha = eta = 0``.

Shapes: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; gates ``[B, T, H]`` or ``[B, T, H, K]``; states
``[N, H, K, V]`` (titans ``[N, H, 3, K, V]``) in float32. Inputs float32, float16 or bfloat16.
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor

# rule -> (family, gate kind); gate kinds of the gated linear family: 0 none, 1 per head, 2 per channel
_RULES = {
    "linear_attn": ("gated_linear", 0),
    "retnet": ("gated_linear", 1),
    "lightning": ("gated_linear", 1),
    "mamba2": ("gated_linear", 1),
    "gla": ("gated_linear", 2),
    "hgrn2": ("gated_linear", 2),
    "deltanet": ("delta", 0),
    "gated_deltanet": ("delta", 1),
    "titans": ("titans", 0),
    "ttt": ("titans", 0),
}


def supported_rules() -> set[str]:
    return set(_RULES)


def _family(rule: str) -> tuple[str, int]:
    try:
        return _RULES[rule]
    except KeyError:
        raise NotImplementedError(f"no Triton kernel for rule {rule!r}; supported: {sorted(_RULES)}") from None


def chunk(rule: str, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], *, scale: float,
          initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None,
          options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    """Chunked forward (differentiable) of ``rule``; see the module docstring for shapes."""
    from ._common import check_dtype, interpreter_compat

    family, gate = _family(rule)
    check_dtype(q, k, v)
    interpreter_compat()
    if family == "gated_linear":
        from .gated_linear.chunk import chunk_gated_linear

        return chunk_gated_linear(q, k, v, gates.get("g"), gates.get("dt"), gate=gate, scale=scale,
                                  initial_state=initial_state, output_final_state=output_final_state,
                                  cu_seqlens=cu_seqlens)
    if family == "delta":
        from .delta.chunk import chunk_delta

        return chunk_delta(q, k, v, gates["beta"], gates.get("g"), scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    if family == "titans":
        from .titans.chunk import chunk_titans

        return chunk_titans(q, k, v, gates["theta"], gates["alpha"], gates["eta"], scale=scale,
                            mini_batch=options["mini_batch"], initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    raise NotImplementedError(f"no Triton kernel for rule {rule!r}")


def step(rule: str, q: Tensor, k: Tensor, v: Tensor, state: Tensor, gates: dict[str, Tensor], *, scale: float,
         position: int | Tensor | None, options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """One decoding token: q, k ``[B, H, K]``, v ``[B, H, V]``, gates ``[B, H]`` / ``[B, H, K]``, state
    float32; returns ``(o [B, H, V], new state)`` (the given state is not modified)."""
    from ._common import check_dtype, interpreter_compat

    family, gate = _family(rule)
    check_dtype(q, k, v)
    interpreter_compat()
    q, k, v = q[:, None], k[:, None], v[:, None]
    gates = {n: x[:, None] for n, x in gates.items()}
    state = state.float()
    if family == "gated_linear":
        from .gated_linear.fused_recurrent import fused_recurrent_gated_linear

        o, state = fused_recurrent_gated_linear(q, k, v, gates.get("g"), gates.get("dt"), state, gate=gate,
                                                scale=scale)
    elif family == "delta":
        from .delta.fused_recurrent import fused_recurrent_delta

        o, state = fused_recurrent_delta(q, k, v, gates["beta"], gates.get("g"), state, scale=scale)
    else:
        from .titans.fused_recurrent import fused_recurrent_titans

        mb = options["mini_batch"]
        if mb > 1 and position is None:
            raise ValueError(f"{rule}.step with mini_batch > 1 needs position (the token's index in its sequence)")
        pos = torch.as_tensor(0 if position is None else position, dtype=torch.int64, device=q.device)
        pos = pos.reshape(-1).expand(q.shape[0]).contiguous()
        o, state = fused_recurrent_titans(q, k, v, gates["theta"], gates["alpha"], gates["eta"], state, pos,
                                          scale=scale, mini_batch=mb)
    return o[:, 0], state


def has_step_into(rule: str) -> bool:
    """Whether ``step_into`` has a kernel for ``rule`` (the gated linear and delta families)."""
    return rule in _RULES and _family(rule)[0] in ("gated_linear", "delta")


def step_into(rule: str, q: Tensor, k: Tensor, v: Tensor, states: Tensor, slots: Tensor, keep: Tensor,
              gates: dict[str, Tensor], *, scale: float) -> Tensor:
    """One decoding token for n rows whose states are rows of ``states`` ``[N, H, K, V]`` (float32,
    contiguous): row i reads ``states[slots[i]]`` and, where ``keep[i]``, overwrites it in place with its new
    state (``slots`` distinct). q, k ``[n, H, K]``, v ``[n, H, V]``, gates ``[n, H]`` / ``[n, H, K]``; returns
    o ``[n, H, V]``. The state is read and written once, where ``step`` on gathered states and a scatter back
    would move it four times. Only for rules with ``has_step_into``."""
    from ._common import check_dtype, interpreter_compat

    if not has_step_into(rule):
        raise NotImplementedError(f"no indexed decoding kernel for rule {rule!r}")
    family, gate = _family(rule)
    check_dtype(q, k, v)
    interpreter_compat()
    if states.dtype != torch.float32 or not states.is_contiguous():
        raise ValueError(f"states must be a contiguous float32 tensor, got {states.dtype}"
                         f"{'' if states.is_contiguous() else ', not contiguous'}")
    q, k, v = q[:, None], k[:, None], v[:, None]
    gates = {n: x[:, None] for n, x in gates.items()}
    slots, keep = slots.to(torch.int64).contiguous(), keep.to(torch.int8).contiguous()
    if family == "gated_linear":
        from .gated_linear.fused_recurrent import fused_recurrent_gated_linear

        o, _ = fused_recurrent_gated_linear(q, k, v, gates.get("g"), gates.get("dt"), states, gate=gate,
                                            scale=scale, slots=slots, keep=keep)
    else:
        from .delta.fused_recurrent import fused_recurrent_delta

        o, _ = fused_recurrent_delta(q, k, v, gates["beta"], gates.get("g"), states, scale=scale, slots=slots,
                                     keep=keep)
    return o[:, 0]
