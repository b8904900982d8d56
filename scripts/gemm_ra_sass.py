"""Offline sm_90 compile of ``kernels.gluon_gemm_ra.gemm_ra_kernel``, as ``scripts/gemv_tma_sass.py`` does for the
TMA-ring GEMV: registers, spills, shared memory and the consumers' main loop (one 128-K step per iteration) of the
launch :func:`kernels.gluon_gemm_ra.launch_gemm_ra` makes (recorded on CPU tensors, so the variant is specialized as
on the GPU; the activation order is the torch reference there).

Usage (Triton 3.6, the H200 image's version, installed aside: ``pip install --no-deps --target /tmp/t36
triton==3.6.0``): ``PYTHONPATH=/tmp/t36 python scripts/gemm_ra_sass.py [--p 4] [--m 64] [--stages 5] [--split 2]
[--sms 132] [--fp16] [--dump F]`` (the split and SM count decide the programs per SM and so the registers)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import gluon_gemm_ra  # noqa: E402
from kernels.grid import quantize_weight  # noqa: E402
from kernels.ops import pack_linear  # noqa: E402
from sass_count import _Recorder, gluon_loop_report  # noqa: E402  (this script's folder is on sys.path)

N, K = 4096, 8192


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/gemm_ra_sass.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=int, default=2, choices=gluon_gemm_ra.RA_BITS, help="code width (default 2)")
    ap.add_argument("--m", type=int, default=64, choices=gluon_gemm_ra.RA_TOKENS, help="tokens per program (default 64)")
    ap.add_argument("--stages", type=int, default=5, help="slots in the ring (default 5)")
    ap.add_argument("--fp16", action="store_true", help="fp16 activations (default bf16)")
    ap.add_argument("--split", type=int, default=2, help="split-K (default 2)")
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU the launch is sized for (default 132)")
    ap.add_argument("--dump", type=Path, help="write the SASS listing here (and the PTX beside it)")
    a = ap.parse_args()
    layer = pack_linear(quantize_weight(torch.randn(N, K) * 0.02), a.p)
    dtype = torch.float16 if a.fp16 else torch.bfloat16
    rec = _Recorder(gluon_gemm_ra.gemm_ra_kernel)
    gluon_gemm_ra.gemm_ra_kernel = rec
    order, sms = gluon_gemm_ra.launch_ra_order, gluon_gemm_ra.sm_count
    gluon_gemm_ra.launch_ra_order = gluon_gemm_ra.ra_order  # the Triton pass needs a GPU
    gluon_gemm_ra.sm_count = lambda device: a.sms
    try:
        gluon_gemm_ra.launch_gemm_ra(torch.randn(a.m, K, dtype=dtype), layer.packed, layer.scales, layer.zeros,
                                     layer.row_scale, None, None, a.p, 1.0, 1.5, 1.0, a.m, a.stages, a.split,
                                     torch.empty(1), torch.zeros(64, dtype=torch.int32),
                                     torch.empty(a.m, N, dtype=dtype))
    finally:
        gluon_gemm_ra.gemm_ra_kernel = rec.fn
        gluon_gemm_ra.launch_ra_order, gluon_gemm_ra.sm_count = order, sms
    codes = gluon_gemm_ra.RA_STEP_K * gluon_gemm_ra.RA_ROWS // 128  # per consumer thread and step
    gluon_loop_report(rec.launch, codes, a.m, ("SETMAXREG", "EXIT"), a.dump)


if __name__ == "__main__":
    main()
