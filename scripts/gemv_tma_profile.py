"""Launch one TMA-ring GEMV configuration six times on 1..4 tokens, for a profiler to attach to (``ncu``, ``nsys``).

``ncu`` flushes the caches before the profiled launch by default, so it reads the weights from memory. Example (the
profile in docs/results/ncu-gemv_tma-h200.txt):

    ncu --clock-control none --set full --import-source no -k regex:gemv_tma --launch-skip 3 --launch-count 1 \\
        -o rep python3 scripts/gemv_tma_profile.py --shape 8192x8192 --bits 2 --config 32,512,4,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemv_ab import run  # noqa: E402  (this script's folder is on sys.path)
from kernels.bench import make_layers  # noqa: E402
from kernels.gluon_stream import stream_tokens  # noqa: E402
from kernels.triton_ops import Config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/gemv_tma_profile.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8192x8192", metavar="KxN", help="weight shape (default %(default)s)")
    ap.add_argument("--bits", type=int, default=2, choices=(2, 4), help="code width (default 2)")
    ap.add_argument("--m", type=int, default=1, choices=(1, 2, 3, 4), help="tokens (default 1)")
    ap.add_argument("--config", required=True, metavar="BN,BK,WARPS,STAGES",
                    type=lambda s: [int(v) for v in s.split(",")], help="the gemv_tma configuration")
    args = ap.parse_args()
    k, n = (int(v) for v in args.shape.split("x"))
    bn, bk, warps, stages = args.config
    layer = make_layers(k, n, args.bits, 1)[0]
    x = torch.randn(args.m, k, dtype=torch.bfloat16, device="cuda")
    for _ in range(6):
        run(layer, x, Config("gemv_tma", stream_tokens(args.m), bn, bk, num_warps=warps, num_stages=stages))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
