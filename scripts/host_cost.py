"""Host time of one eager ``kernels.ops.linear`` call per kernel path, against ``F.linear`` in bf16 (CUDA GPU).

Outside a CUDA graph (``--enforce-eager``, or a vLLM prefill larger than its captured sizes) every call pays its
Python-side dispatch, descriptor set-up and launches on the host. This times ``--calls`` calls back to back without
synchronizing (host time per call while the GPU keeps up; GPU time where it does not) and with a synchronization after
each, for ``kernels.ops.linear`` (in eager code it calls the op's function directly:
:func:`kernels.triton_ops.ops_for`), for the ``torch.ops.bitbybit.linear`` custom op (what a torch.compile graph
runs), for :func:`~kernels.triton_ops.launch_linear` called directly and for bf16 ``F.linear``; then it profiles 50
calls of ``kernels.ops.linear`` with ``cProfile`` and prints the functions with the most own time.

GPU: ``python3 scripts/host_cost.py --shape 4096x12288 --ms 1,2,8,32,256,1024 --out $OUT/host-cost.json``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import make_layers, parse_shapes  # noqa: E402
from kernels.ops import linear  # noqa: E402
from kernels.triton_ops import choose_config, launch_linear  # noqa: E402


def per_call_us(fn, calls: int, sync_each: bool) -> float:
    """Wall time per call of ``calls`` calls of ``fn``: without a sync between them (host time while the GPU keeps up),
    or with one after each (host and GPU time together)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def top_functions(fn, rows: int) -> str:
    """``cProfile`` of 50 calls of ``fn``: the ``rows`` functions with the most own time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(rows)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/host_cost.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="4096x12288", help="K x N (default %(default)s)")
    ap.add_argument("--bits", type=int, default=2, help="weight width (default %(default)s)")
    ap.add_argument("--ms", default="1,2,8,32,256,1024", help="token counts, comma-separated (default %(default)s)")
    ap.add_argument("--calls", type=int, default=500, help="calls per timing (default %(default)s)")
    ap.add_argument("--rows", type=int, default=12, help="cProfile rows printed per token count (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    (k, n), = parse_shapes(args.shape)
    layer = make_layers(k, n, args.bits, 1)[0]
    w16 = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    records = []
    for m in map(int, args.ms.split(",")):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        ours, dense = (lambda: linear(x, layer)), (lambda: F.linear(x, w16))
        op = (lambda: torch.ops.bitbybit.linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale,
                                                layer.split_index, None, None, layer.bits, layer.master_bits,
                                                layer.in_features, x.dtype))
        direct = (lambda: launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, layer.split_index,
                                        None, None, layer.bits, layer.master_bits, layer.in_features, x.dtype))
        for fn in (ours, op, direct, dense):  # compile and warm up
            fn()
        rec = dict(K=k, N=n, M=m, bits=args.bits, kernel=choose_config(args.bits, m, n, k).kernel,
                   host_us=round(per_call_us(ours, args.calls, False), 1),
                   synced_us=round(per_call_us(ours, args.calls, True), 1),
                   op_host_us=round(per_call_us(op, args.calls, False), 1),
                   direct_host_us=round(per_call_us(direct, args.calls, False), 1),
                   direct_synced_us=round(per_call_us(direct, args.calls, True), 1),
                   bf16_host_us=round(per_call_us(dense, args.calls, False), 1),
                   bf16_synced_us=round(per_call_us(dense, args.calls, True), 1))
        records.append(rec)
        print(json.dumps(rec), flush=True)
        print(top_functions(ours, args.rows), flush=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
