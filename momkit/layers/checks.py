"""Input checks at the public entry points of the layers: one clear error instead of a shape error deep inside.

``check_layer_input(x, attention_mask, hidden_size, where)``: x ``[B, T, D]`` (a float tensor, ``D`` the layer's
hidden size, ``T >= 1``), attention_mask ``None`` or ``[B, T]``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def check_layer_input(x: Tensor, attention_mask: Tensor | None, hidden_size: int, where: str) -> None:
    """Raise ValueError naming ``where`` (e.g. ``MoMLayer.forward``), what came and what is expected."""
    want = f"[B, T, D] with D = hidden_size = {hidden_size}"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{where}: x must be a tensor {want}, got {type(x).__name__}")
    if x.dim() != 3:
        hint = " (one sequence: x[None])" if x.dim() == 2 else ""
        raise ValueError(f"{where}: x must have shape {want}, got a {x.dim()}-D tensor of shape "
                         f"{list(x.shape)}{hint}")
    if x.shape[-1] != hidden_size:
        raise ValueError(f"{where}: x must have shape {want}, got {list(x.shape)} (hidden size {x.shape[-1]})")
    if x.shape[1] == 0:
        raise ValueError(f"{where}: x must hold at least one token (T >= 1), got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{where}: x must be a float tensor, got {x.dtype}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or tuple(attention_mask.shape) != tuple(x.shape[:2])):
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"{where}: attention_mask must have shape [B, T] = {list(x.shape[:2])}, got {got}")
