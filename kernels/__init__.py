"""Triton kernels, imported as ``momkit.kernels``. Depends on torch and triton only, never on momkit.

Entry points used by ``momkit.rules`` (which validate inputs first):

* ``supported_rules() -> set[str]``: rules with kernels here.
* ``chunk(rule, q, k, v, gates, *, scale, initial_state, output_final_state, cu_seqlens, options)``
  -> ``(o, final_state)``: chunked forward, differentiable (autograd Functions).
* ``step(rule, q, k, v, state, gates, *, scale, position, options)`` -> ``(o, state)``: one token.
"""

from __future__ import annotations


def supported_rules() -> set[str]:
    return set()


def chunk(rule, q, k, v, gates, *, scale, initial_state, output_final_state, cu_seqlens, options):
    raise NotImplementedError(f"no Triton kernel for rule {rule!r}")


def step(rule, q, k, v, state, gates, *, scale, position, options):
    raise NotImplementedError(f"no Triton kernel for rule {rule!r}")
