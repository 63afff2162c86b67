"""Triton kernels, imported as ``momkit.kernels``. Depends on torch and triton only, never on momkit."""
