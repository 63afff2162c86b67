"""Layers: the Mixture-of-Memories layer, the single-memory layer, attention, short convolution, norms."""

from momkit.layers.attention import CausalAttention
from momkit.layers.conv import ShortConv
from momkit.layers.mom import MoMAux, MoMCache, MoMLayer
from momkit.layers.norm import GatedRMSNorm, RMSNorm
from momkit.layers.single import SingleMemoryLayer

__all__ = ["CausalAttention", "GatedRMSNorm", "MoMAux", "MoMCache", "MoMLayer", "RMSNorm", "ShortConv",
           "SingleMemoryLayer"]
