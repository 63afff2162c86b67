"""How exactly the delta rules' WY forward inverts ``I + A`` per 64-token chunk, against float64, for the
kernels' way (forward substitution in float32 inside the 16 x 16 diagonal blocks) and the tensor-core one
timed as ``wy_inverse_squares`` in ``benchmarks/variants/delta_costs.py`` (the diagonal blocks as
``(I - A_d)(I + A_d^2)(I + A_d^4)(I + A_d^8)``), each followed by the kernels' block step
``(I - N)(I + N^2) D``. Products take tf32 operands and float32 sums, as bfloat16 inputs get on the GPU.

    python -m benchmarks.inverse_precision [--trials 20]

Keys are a shared random direction plus noise (smaller noise: more nearly parallel keys), L2-normalised,
with ``beta`` uniform in ``[beta_min, 1]`` and no decay. Prints the largest entry of the exact inverse and each
method's largest absolute error over the trials.
"""

from __future__ import annotations

import argparse

import torch

BT = 64


def tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to tf32's 10 mantissa bits (to nearest)."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with tf32 operands, summed exactly and rounded to float32."""
    return (tf32(a).double() @ tf32(b).double()).float()


def _diagonal_blocks() -> torch.Tensor:
    o = torch.arange(BT)
    return (o[:, None] // 16) == (o[None, :] // 16)


def substitution(A: torch.Tensor) -> torch.Tensor:
    """``(I + A_d)^{-1}`` by forward substitution in float32 within each 16 x 16 diagonal block."""
    A, D = A.float(), torch.zeros(BT, BT)
    for b in range(0, BT, 16):
        a, d = A[b:b + 16, b:b + 16], torch.eye(16)
        for i in range(1, 16):
            d[i] = (torch.arange(16) == i).float() - (a[i][:, None] * d).sum(0)
        D[b:b + 16, b:b + 16] = d
    return D


def squares(A: torch.Tensor) -> torch.Tensor:
    """``(I + A_d)^{-1}`` by repeated squaring with tf32 products (``A_d^16 = 0``)."""
    eye = torch.eye(BT)
    P = torch.where(_diagonal_blocks(), A.float(), 0.0)
    D = eye - P
    for _ in range(3):
        P = dot(P, P)
        D = dot(D, eye + P)
    return D


def inverse(A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1} = (I - N)(I + N^2) D`` with ``N = D A_o`` (the kernels' block step)."""
    eye = torch.eye(BT)
    N = dot(D, torch.where(_diagonal_blocks(), 0.0, A.float()))
    return dot(dot(eye - N, eye + dot(N, N)), D)


def errors(noise: float, beta_min: float, trials: int, seed: int = 0) -> dict[str, float]:
    """``{"max_entry", "substitution", "squares"}``: the exact inverse's largest entry and each method's largest
    absolute error over ``trials`` chunks of keys ``direction + noise * N(0, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    out = {"max_entry": 0.0, "substitution": 0.0, "squares": 0.0}
    for _ in range(trials):
        k = torch.randn(128, dtype=torch.float64, generator=gen) + noise * torch.randn(
            BT, 128, dtype=torch.float64, generator=gen)
        k = k / k.norm(dim=1, keepdim=True)
        beta = beta_min + (1 - beta_min) * torch.rand(BT, dtype=torch.float64, generator=gen)
        A = torch.tril((k @ k.T) * beta[:, None], -1)
        exact = torch.linalg.inv(torch.eye(BT, dtype=torch.float64) + A)
        out["max_entry"] = max(out["max_entry"], exact.abs().max().item())
        for name, diag in (("substitution", substitution), ("squares", squares)):
            out[name] = max(out[name], (inverse(A, diag(A)).double() - exact).abs().max().item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    args = ap.parse_args()
    if args.trials < 1:
        ap.error(f"--trials {args.trials}: expected a positive number of chunks")
    print("noise   beta_min  max|inverse|  error: substitution  squares")
    for noise in (1.0, 0.1, 0.01, 0.001):
        for beta_min in (0.0, 0.9):
            e = errors(noise, beta_min, args.trials)
            print(f"{noise:<7} {beta_min:<9} {e['max_entry']:12.3g}  {e['substitution']:19.3g}  {e['squares']:7.3g}")


if __name__ == "__main__":
    main()
