"""Offline sm_90 compile of ``kernels.gluon_gemv_ring.gemv_ring_kernel`` (no GPU needed): registers, spills, shared
memory and the instruction mix of its consumers' loop (one ring step: two 128-code blocks, 256 codes per lane).

The arguments are the ones :func:`kernels.gluon_gemv_ring.launch_gemv_ring` passes (recorded on CPU tensors).

Usage (with Triton 3.6, the H200 image's version, installed aside:
``pip install --no-deps --target /tmp/t36 triton==3.6.0``):
``PYTHONPATH=/tmp/t36 python scripts/gemv_ring_sass.py [--p 4] [--m 16] [--warps 8] [--stages 2] [--dump F]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import gluon_gemv_ring  # noqa: E402
from kernels.grid import quantize_weight  # noqa: E402
from kernels.ops import pack_linear  # noqa: E402
from sass_count import _Recorder, gluon_loop_report  # noqa: E402  (this script's folder is on sys.path)

K, N = 8192, 4096


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gemv_ring_sass.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=2, choices=(2, 4), help="code width (default 2)")
    ap.add_argument("--m", type=int, default=8, help="tokens, 2..16 (default 8)")
    ap.add_argument("--warps", type=int, default=4, choices=(4, 8), help="consumer warps (default 4)")
    ap.add_argument("--stages", type=int, default=4, help="ring steps in flight (default 4)")
    ap.add_argument("--dump", type=Path, help="write the SASS listing here (and the PTX beside it)")
    a = ap.parse_args()
    layer = pack_linear(quantize_weight(torch.randn(N, K) * 0.02), a.p)
    rec = _Recorder(gluon_gemv_ring.gemv_ring_kernel)
    gluon_gemv_ring.gemv_ring_kernel = rec
    try:
        gluon_gemv_ring.launch_gemv_ring(torch.randn(a.m, K, dtype=torch.bfloat16), layer.packed, layer.scales,
                                         layer.zeros, layer.row_scale, None, None, a.p, 1.0, 1.5, 1.0, a.warps,
                                         a.stages, torch.empty(a.m, N, dtype=torch.bfloat16))
    finally:
        gluon_gemv_ring.gemv_ring_kernel = rec.fn
    gluon_loop_report(rec.launch, 256, a.m, ("SETMAXREG", "EXIT"), a.dump)


if __name__ == "__main__":
    main()
