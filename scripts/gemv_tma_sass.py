"""Offline sm_90 compile of ``kernels.gluon_stream.gemv_tma_kernel`` (no GPU needed): registers, spills, shared
memory, the barriers and the instruction mix of the consumers' main loop (one step per iteration).

The arguments are the ones :func:`kernels.gluon_stream.launch_gemv_tma` passes (recorded on CPU tensors, so the
compiled variant is specialized as on the GPU). The main loop is the largest backward-branch loop that holds no
``SETMAXREG`` or ``EXIT`` (the worker warps' dispatch loop of ``gl.warp_specialize`` does) and no ``F2I`` (the loop
over chunks of activations, whose preparation rounds them to integers, holds the step loop).

Usage (with Triton 3.6, the H200 image's version, installed aside:
``pip install --no-deps --target /tmp/t36 triton==3.6.0``):
``PYTHONPATH=/tmp/t36 python scripts/gemv_tma_sass.py [--p 4] [--m 2] [--tile 32,512,4] [--stages 4] [--k 8192]
[--dump F]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import gluon_stream  # noqa: E402
from kernels.grid import quantize_weight  # noqa: E402
from kernels.ops import pack_linear  # noqa: E402
from sass_count import _Recorder, gluon_loop_report  # noqa: E402  (this script's folder is on sys.path)

N = 4096


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gemv_tma_sass.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=2, choices=gluon_stream.STREAM_BITS, help="code width (default 2)")
    ap.add_argument("--tile", default="32,512,4", help="block_n,block_k,warps (default %(default)s)")
    ap.add_argument("--stages", type=int, default=4, help="steps in flight (default 4)")
    ap.add_argument("--k", type=int, default=8192, help="input features (default 8192)")
    ap.add_argument("--m", type=int, default=1, choices=gluon_stream.STREAM_TOKENS,
                    help="tokens per program, block_m (default 1)")
    ap.add_argument("--dump", type=Path, help="write the SASS listing here (and the PTX beside it)")
    a = ap.parse_args()
    bn, bk, warps = map(int, a.tile.split(","))
    layer = pack_linear(quantize_weight(torch.randn(N, a.k) * 0.02), a.p)
    rec = _Recorder(gluon_stream.gemv_tma_kernel)
    gluon_stream.gemv_tma_kernel = rec
    try:
        gluon_stream.launch_gemv_tma(torch.randn(a.m, a.k, dtype=torch.bfloat16), layer.packed, layer.scales,
                                     layer.zeros, layer.row_scale, None, None, a.p, 1.0, 1.5, 1.0, a.m, bn, bk,
                                     a.stages, warps, torch.empty(a.m, N, dtype=torch.bfloat16))
    finally:
        gluon_stream.gemv_tma_kernel = rec.fn
    gluon_loop_report(rec.launch, bk * bn // (32 * warps), a.m, ("SETMAXREG", "EXIT", "F2I"), a.dump)


if __name__ == "__main__":
    main()
