"""Offline sm_90 compile of ``kernels.gluon_gemv.gemv_mma_kernel`` (no GPU needed): registers, spills, and the
instruction mix of its main loop (two 128-K steps, 256 codes per lane).

Usage (with Triton 3.6, the H200 image's version, installed aside:
``pip install --no-deps --target /tmp/t36 triton==3.6.0``):
``PYTHONPATH=/tmp/t36 python scripts/gemv_mma_sass.py [--p 4] [--fp16] [--m 8] [--warps 8 --wk 8] [--ragged]``
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch
from triton.experimental.gluon._runtime import GluonASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import gluon_gemv  # noqa: E402
from kernels.bench import _loop_mix  # noqa: E402
from sass_count import Launch, compile_sm90, cuobjdump_of  # noqa: E402  (this script's folder is on sys.path)

K = N = 8192


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gemv_mma_sass.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=2, choices=(2, 4), help="code width (default 2)")
    ap.add_argument("--fp16", action="store_true", help="fp16 activations (default bf16)")
    ap.add_argument("--m", type=int, default=1, choices=range(1, 17), metavar="1..16",
                    help="tokens compiled for (default 1; Triton specializes M = 1, so the others show the real loop)")
    ap.add_argument("--warps", type=int, default=1, help="warps per program (default 1)")
    ap.add_argument("--wk", type=int, default=1, help="rows of warps splitting a program's steps (default 1)")
    ap.add_argument("--ragged", action="store_true", help="compile for warp ranges that end early (masked loads)")
    a = ap.parse_args()
    x = torch.empty(16, K // 2, dtype=torch.int32)
    w = torch.empty(K * a.p // 32, N, dtype=torch.int32)
    s = torch.empty(K // 32, N // 4, dtype=torch.int32)
    rs = torch.empty(N)
    y = torch.empty(16, N, dtype=torch.bfloat16)
    cnt = torch.empty(16, dtype=torch.int32)
    if a.warps % a.wk:
        ap.error(f"--wk {a.wk} rows must divide --warps {a.warps}")
    # 16 steps per split over --wk rows, and a run-time split count (4) as launched: Triton would specialize 1 away
    args = (x, w, s, s, rs, rs, rs, y, rs, cnt, a.m, N, K // 128, 16, 16 // a.wk, K // 2, N, 0x43004300, 4)
    kw = dict(P=a.p, BF16=not a.fp16, NT=gluon_gemv.token_rows(a.m) // 8, WK=a.wk, RAGGED=a.ragged, ZOFF=31.5,
              ZMUL=1 / 64, COL_MULT=16384.0, HAS_TS=False, HAS_BIAS=False, num_warps=a.warps)
    c = compile_sm90(Launch(gluon_gemv.gemv_mma_kernel, args, kw), GluonASTSource)
    print(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", cuobjdump_of(c.asm["cubin"], "-res-usage")))
    n, mix = _loop_mix(cuobjdump_of(c.asm["cubin"], "-sass"))  # the largest loop: the two-step main loop
    print(f"main loop: {n} instructions per 256 codes per lane ({n / 256:.2f} per code):", dict(mix.most_common(16)))


if __name__ == "__main__":
    main()
