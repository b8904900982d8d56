"""Launch one register-operand wgmma configuration (``Config("gemm_ra")``) six times, for a profiler to attach to.

``ncu`` flushes the caches before the profiled launch by default, so it reads the weights from memory. Example (the
profile in docs/results/ncu-gemm_ra-m16-h200.txt):

    ncu --clock-control none --set full --import-source no -k regex:gemm_ra --launch-skip 3 --launch-count 1 \\
        -o rep python3 scripts/gemm_ra_profile.py --shape 8192x8192 --bits 2 --m 16 --config 16,2,5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemv_ab import run  # noqa: E402  (this script's folder is on sys.path)
from kernels.bench import make_layers  # noqa: E402
from kernels.gluon_gemm_ra import RA_ROWS, RA_STEP_K  # noqa: E402
from kernels.triton_ops import Config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/gemm_ra_profile.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8192x8192", metavar="KxN", help="weight shape (default %(default)s)")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 4), help="code width (default 2)")
    ap.add_argument("--m", type=int, default=16, help="tokens (default 16)")
    ap.add_argument("--config", required=True, metavar="TOKENS,SPLIT,STAGES",
                    type=lambda s: [int(v) for v in s.split(",")], help="the gemm_ra configuration")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    tokens, split, stages = args.config
    layer = make_layers(k, n, args.bits, 1)[0]
    x = torch.randn(args.m, k, dtype=torch.bfloat16, device="cuda")
    for _ in range(6):
        run(layer, x, Config("gemm_ra", tokens, RA_ROWS, RA_STEP_K, split_k=split, num_warps=4, num_stages=stages))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
