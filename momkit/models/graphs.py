"""One decoding step of a MoMLM captured as a CUDA graph: the same kernels as ``MoMLM.step``, launched by
one ``replay`` instead of one host call each (a decoding step of a MoM layer is a few dozen small kernels,
so at batch 1 the host, not the GPU, sets the pace).

    step = CapturedStep(model, cache)       # after prefill; cache: the list model(..., use_cache=True) made
    logits = step(token_ids)                # advances that cache in place, like model.step(token_ids, cache)

A captured step is bound to the buffers of one cache (a new cache needs a new capture), reads its input from a
buffer the call copies ``token_ids`` into, and returns its logits in a buffer the next call overwrites. Every
layer must advance its cache in place with no host-side state: MoM and single-memory layers do; an attention
layer's cache length is a host integer (each step reads a longer slice of the KV buffers), so models with
attention layers are refused.
"""

from __future__ import annotations

import dataclasses

import torch

Tensor = torch.Tensor
_WARMUP_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream every capture on ``device`` warms up on. One per device, not one per capture: PyTorch
    keeps a cuBLAS workspace for each stream that has run a matrix product (32 MiB on Hopper) for the rest of
    the process, so a new stream per capture would hold that much more memory after every capture."""
    device = torch.device(device)
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


def cache_tensors(cache) -> list[Tensor]:
    """Every tensor of a decoding cache (a list of per-layer dataclasses), in a fixed order."""
    out = []
    for layer in cache:
        for f in dataclasses.fields(layer):
            value = getattr(layer, f.name)
            if isinstance(value, Tensor):
                out.append(value)
    return out


def capture_refusal(model) -> str | None:
    """Why ``model``'s decoding step cannot be captured (None: it can), worded to follow what asked for it."""
    device = model.embed.weight.device
    if device.type != "cuda":
        return f"needs the model on a CUDA device, got {device}"
    attention = [i for i, b in enumerate(model.blocks) if b.kind == "attention"]
    if attention:
        return (f"needs every layer to keep its cache on the device; layers {attention} are attention layers, "
                f"whose cache length is a host integer (decode them without cuda_graph)")
    return None


class CapturedStep:
    """``model.step`` on ``cache`` as one CUDA graph. ``warmup`` eager steps run first on a side stream
    (kernel compilation and autotuning, library workspaces: nothing of that may happen during capture);
    the cache is restored afterwards, so building the object leaves it as it was."""

    def __init__(self, model, cache: list, warmup: int = 2):
        why = capture_refusal(model)
        if why is not None:
            raise ValueError(f"a captured decoding step {why}")
        device = model.embed.weight.device
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        tensors = cache_tensors(cache)
        batch = cache[0].position.shape[0]
        self.token_ids = torch.zeros(batch, dtype=torch.long, device=device)
        saved = [t.clone() for t in tensors]
        side = warmup_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                model.step(self.token_ids, cache)
        torch.cuda.current_stream(device).wait_stream(side)
        if any(a is not b for a, b in zip(tensors, cache_tensors(cache))):
            raise ValueError("a layer replaced a tensor of its cache during the warm-up steps; a captured step "
                             "needs every layer to update its cache in place")
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits, _ = model.step(self.token_ids, cache)
        for t, s in zip(tensors, saved):
            t.copy_(s)
        self.cache = cache  # the graph reads and writes these buffers: they live as long as it does

    def __call__(self, token_ids: Tensor) -> Tensor:
        """token_ids [B] -> logits [B, vocab] (a buffer the next call overwrites); the cache advances."""
        if token_ids.shape != self.token_ids.shape:
            raise ValueError(f"token_ids must have shape {list(self.token_ids.shape)} (the captured batch), "
                             f"got {list(token_ids.shape)}")
        self.token_ids.copy_(token_ids)
        self.graph.replay()
        return self.logits
