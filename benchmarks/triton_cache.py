"""Pack the part of a Triton cache worth carrying to a fresh device machine.

    python -m benchmarks.triton_cache --cache .tcache --out $OUT/tcache.tgz [--autotune-only]

Keeps every autotuning result (``*.autotune.json``, written under ``TRITON_CACHE_AUTOTUNING=1``: a later
run compiles only the configuration chosen, instead of timing every one again) and the compiled kernels of
``kernels/`` (ours), and leaves out the configurations a peer's autotuner tried: the whole cache after an
fla run is about 100 MB, this part a few MB. Unpack it at the repository root (``tar xzf``); the archive
holds the folder under the name given with ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import re
import tarfile
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def our_kernel_names() -> set[str]:
    names: set[str] = set()
    for f in KERNELS.rglob("*.py"):
        names |= set(re.findall(r"def (_\w+_kernel)\(", f.read_text()))
    return names


def folders_to_keep(cache: Path, autotune_only: bool = False) -> list[Path]:
    ours = set() if autotune_only else our_kernel_names()
    keep = []
    for d in sorted(p for p in cache.iterdir() if p.is_dir()):
        files = os.listdir(d)
        compiled = {f.rsplit(".", 1)[0] for f in files if f.endswith(".cubin")}
        if any(f.endswith(".autotune.json") for f in files) or compiled & ours:
            keep.append(d)
    return keep


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="the Triton cache folder (TRITON_CACHE_DIR)")
    ap.add_argument("--out", required=True, help="the .tgz to write")
    ap.add_argument("--autotune-only", action="store_true",
                    help="only the autotuning results (kilobytes): after a test run, our compiled kernels alone "
                         "pass the 16 MB a returned file may have")
    args = ap.parse_args(argv)
    cache = Path(args.cache)
    if not cache.is_dir():
        ap.error(f"--cache {args.cache!r}: no such folder")
    keep = folders_to_keep(cache, args.autotune_only)
    with tarfile.open(args.out, "w:gz") as tar:
        for d in keep:
            tar.add(d, arcname=str(Path(cache.name) / d.name))
    print(f"{len(keep)} folders -> {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
