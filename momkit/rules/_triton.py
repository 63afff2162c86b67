"""Binding of the rules to the Triton kernels in ``momkit.kernels`` (imported lazily, on first use).

``momkit.kernels`` exposes ``supported_rules()``, ``chunk(...)`` (sequence forward, autograd-aware),
``step(...)`` (one decoding token) and ``step_into(...)`` (one decoding token on states updated in place where
they live); the rules validate inputs before calling them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch

Tensor = torch.Tensor


def unavailable_reason(rule_name: str, x: Tensor) -> str | None:
    """None if the Triton kernels of ``rule_name`` can run on ``x``'s device, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not x.is_cuda and not interpret:
        return (f"the tensors are on {x.device}; Triton kernels need a CUDA device "
                "(or TRITON_INTERPRET=1 for the CPU interpreter)")
    if x.is_cuda and interpret:
        return "TRITON_INTERPRET=1 is set, but the tensors are on a CUDA device"
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the kernels take float32, float16 or bfloat16 inputs, got {x.dtype}"
    from momkit import kernels

    if rule_name not in kernels.supported_rules():
        return f"momkit.kernels has no kernel for rule {rule_name!r}"
    return None


def chunk(rule_name: str, q: Tensor, k: Tensor, v: Tensor, gates: dict[str, Tensor], scale: float,
          initial_state: Tensor | None, output_final_state: bool, cu_seqlens: Tensor | None,
          options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    from momkit import kernels

    return kernels.chunk(rule_name, q, k, v, gates, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens, options=options)


def step(rule_name: str, q: Tensor, k: Tensor, v: Tensor, state: Tensor, gates: dict[str, Tensor], scale: float,
         position: int | Tensor | None, options: dict[str, Any]) -> tuple[Tensor, Tensor]:
    from momkit import kernels

    return kernels.step(rule_name, q, k, v, state, gates, scale=scale, position=position, options=options)


def has_step_into(rule_name: str) -> bool:
    from momkit import kernels

    return kernels.has_step_into(rule_name)


def step_into(rule_name: str, q: Tensor, k: Tensor, v: Tensor, states: Tensor, slots: Tensor, keep: Tensor,
              gates: dict[str, Tensor], scale: float) -> Tensor:
    from momkit import kernels

    return kernels.step_into(rule_name, q, k, v, states, slots, keep, gates, scale=scale)
