"""Launch one half2 GEMV variant and tile a few times, for a profiler to attach to (``ncu``, ``nsys``).

The variant names and tiles are :mod:`gemv_ab`'s (``gemv_h2``, ``gemv_h2_u1``, ``gemv_h2_prev``); the tile is
``BN,BG,WARPS,SPLIT``. Each launch gets a fresh weight copy (``--copies``), so the profiled launch reads its
weights from memory, not from L2. Example (H200, occupancy and issue rate):

    ncu --clock-control none --section Occupancy --section SchedulerStats -k regex:gemv_h2 \\
        --launch-skip 4 --launch-count 1 python3 scripts/gemv_profile.py --tile 256,2,2,16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_ab import h2_variants, launching, make_layer, run  # noqa: E402
from kernels.triton_ops import Config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="gemv_h2", help="gemv_h2, gemv_h2_u1 or (with --prev) gemv_h2_prev")
    ap.add_argument("--prev", metavar="MODULE", help="an earlier kernel file's module, as in gemv_ab.py")
    ap.add_argument("--tile", required=True, type=lambda s: [int(v) for v in s.split(",")], metavar="BN,BG,WARPS,SPLIT")
    ap.add_argument("--shape", default="8192x8192", metavar="KxN")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--copies", type=int, default=8, help="weight copies, one per launch (default 8)")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    variants = h2_variants(args.prev)
    if args.variant not in variants:
        sys.exit(f"unknown variant {args.variant!r}: choose from {', '.join(variants)}")
    bn, bg, warps, split = args.tile
    cfg = Config("gemv_h2", args.m, bn, bg, split_k=split, num_warps=warps)
    layers = [make_layer(k, n, args.bits, "cuda") for _ in range(args.copies)]
    x = torch.randn(args.m, k, dtype=torch.bfloat16, device="cuda")
    with launching(variants[args.variant]):
        for layer in layers:
            run(layer, x, cfg)
    torch.cuda.synchronize()
    print(f"{args.variant} {cfg} on {k}x{n} W{args.bits} M={args.m}: {len(layers)} launches")


if __name__ == "__main__":
    main()
