"""Probe (H200): what limits the TMA-ring GEMV's streaming at one token, the layout or the ring?

Ring-only kernels: a loader warp copies a W2 layer's bytes step by step into a ring of shared-memory slots, as
:mod:`kernels.gluon_stream` does, and 4 consumer warps wait for each slot, read it into registers, sum it and hand
it back (no activations, no dot products; the sums are stored only so that the loads are kept). All variants are
timed in one graph-timed rotation with the real kernel and ``kernels.bench``'s bare read of the same bytes
(``floor_calls``).

``--probe layouts`` keeps the ring GEMV's table tiles and compares three layouts of the same bytes:

- ``strided``: the real K-major codes, scale and zero tensors, three copies per step (the kernel's);
- ``tiled``: each program's column tile stored contiguously along K, three copies per step;
- ``packed``: each program's step one contiguous 10 KiB block, in two copies.

``--probe rings`` keeps the real layout and varies the ring: column tile, step, slots, a split of K over 2 or 4
programs per tile, and the register limit (64 lets four programs share an SM, 96 two).

GPU: ``python3 scripts/ring_probe.py --probe layouts --out $OUT/ring-layouts.json`` (and ``--probe rings``)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.bench import copies_for, floor_calls, graph_times_us, kernel_calls, make_layers, packed_bytes  # noqa: E402
from kernels.gluon_gemm import cta_barrier, tma_descriptor, tma_load  # noqa: E402
from kernels.gluon_stream import LOADER_REGS, ring_descriptors  # noqa: E402
from kernels.triton_ops import Config  # noqa: E402

BITS = 2
# (K, N, block_n, block_k, slots): the table's ring tiles of two shapes, and both at another depth
LAYOUT_CASES = ((8192, 8192, 32, 1024, 4), (4096, 14336, 64, 512, 2), (4096, 14336, 64, 512, 4),
                (8192, 8192, 32, 1024, 2))
# (block_n, block_k, slots, split of K, register limit)
RING_CASES = ((32, 1024, 4, 1, 96), (32, 512, 8, 1, 96), (32, 1024, 4, 2, 96), (32, 1024, 4, 2, 64),
              (32, 1024, 2, 2, 64), (64, 512, 4, 1, 96), (64, 512, 4, 2, 64), (16, 1024, 4, 1, 96),
              (16, 1024, 4, 1, 64), (32, 1024, 6, 1, 96), (32, 1024, 4, 4, 64),
              # session 27: 8 slots, every step of a program in flight at once (K = 4096 at either tile, K = 8192 at
              # 32 x 1024; half of K = 8192 at 64 x 512)
              (32, 1024, 8, 1, 96), (64, 512, 8, 1, 96))


@gluon.jit
def _consume(a_bufs, b_bufs, c_bufs, ready, empty, n_steps, LA: gl.constexpr, LB: gl.constexpr,
             THREE: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    RA: gl.constexpr = a_bufs.type.shape[1]
    CA: gl.constexpr = a_bufs.type.shape[2]
    RB: gl.constexpr = b_bufs.type.shape[1]
    CB: gl.constexpr = b_bufs.type.shape[2]
    acc_a = gl.zeros([RA, CA], gl.int32, LA)
    acc_b = gl.zeros([RB, CB], gl.int32, LB)
    for i in range(n_steps):
        s = i % STAGES
        mbarrier.wait(ready.index(s), (i // STAGES) & 1)
        acc_a += a_bufs.index(s).load(LA).to(gl.int32)
        acc_b += b_bufs.index(s).load(LB).to(gl.int32)
        if THREE:
            acc_b += c_bufs.index(s).load(LB).to(gl.int32)
        fence_async_shared()
        cta_barrier()
        mbarrier.arrive(empty.index(s))
    return (gl.sum(gl.sum(acc_a, 1), 0) + gl.sum(gl.sum(acc_b, 1), 0), )


@gluon.jit
def _load(a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, a_row0, b_row0, b_off, col0, n_steps,
          THREE: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    RA: gl.constexpr = a_desc.block_type.shape[0]
    RB: gl.constexpr = b_desc.block_type.shape[0]
    for i in range(n_steps):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(s)
        if THREE:
            mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * b_desc.block_type.nbytes)
            tma_load(a_desc, [a_row0 + i * RA, col0], bar, a_bufs.index(s))
            tma_load(b_desc, [b_row0 + i * RB, col0], bar, b_bufs.index(s))
            tma_load(c_desc, [b_row0 + i * RB, col0], bar, c_bufs.index(s))
        else:  # one contiguous block per step: a then b right after it
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma_load(a_desc, [a_row0 + i * b_off, 0], bar, a_bufs.index(s))
            tma_load(b_desc, [a_row0 + i * b_off + RA, 0], bar, b_bufs.index(s))


@gluon.jit
def ring_kernel(a_desc, b_desc, c_desc, out_ptr, n_all, MODE: gl.constexpr, STAGES: gl.constexpr,
                SPLIT: gl.constexpr):
    """Program ``(tile, part)`` streams part ``part`` of ``SPLIT`` of its tile's ``n_all`` steps. ``MODE`` 0: the
    strided layout (a column offset per tile), 1: tiled (a row offset per tile), 2: packed (``a_desc`` and ``b_desc``
    the two boxes of one contiguous block per step; ``c_desc`` unused)."""
    W: gl.constexpr = gl.num_warps()
    RA: gl.constexpr = a_desc.block_type.shape[0]
    CA: gl.constexpr = a_desc.block_type.shape[1]
    RB: gl.constexpr = b_desc.block_type.shape[0]
    CB: gl.constexpr = b_desc.block_type.shape[1]
    LA: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (CA // 4) if CA < 128 else 1, CA // 4 if CA < 128 else 32],
                                        [W, 1], [1, 0])
    LB: gl.constexpr = gl.BlockedLayout([1, 4], [32 // (CB // 4) if CB < 128 else 1, CB // 4 if CB < 128 else 32],
                                        [W, 1], [1, 0])
    pid = gl.program_id(0)
    n_steps = n_all // SPLIT
    first = gl.program_id(1) * n_steps
    if MODE == 0:
        a_row0 = first * RA
        b_row0 = first * RB
        col0 = pid * CA
    else:
        a_row0 = (pid * n_all + first) * RA
        b_row0 = (pid * n_all + first) * RB
        col0 = 0
    if MODE == 2:
        a_row0 = (pid * n_all + first) * (RA + RB)
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, RA, CA], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, RB, CB], b_desc.layout)
    c_bufs = gl.allocate_shared_memory(c_desc.dtype, [STAGES, RB, CB], c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(ready.index(b), count=1)
        mbarrier.init(empty.index(b), count=1)
    fence_async_shared()
    total, = gl.warp_specialize([
        (_consume, (a_bufs, b_bufs, c_bufs, ready, empty, n_steps, LA, LB, MODE < 2)),
        (_load, (a_desc, b_desc, c_desc, a_bufs, b_bufs, c_bufs, ready, empty, a_row0, b_row0, RA + RB, col0,
                 n_steps, MODE < 2)),
    ], [1], [LOADER_REGS])
    gl.store(out_ptr + pid * SPLIT + gl.program_id(1), total)


def _launch(descs, out, grid, steps, mode, stages, split, regs):
    return lambda: ring_kernel[grid](*descs, out, steps, MODE=mode, STAGES=stages, SPLIT=split, num_warps=4,
                                     maxnreg=regs)


def _timed(k: int, n: int, layers, calls: dict, cfg: Config | None) -> dict:
    """Time ``calls`` with the real kernel (``cfg``; None: the table's) and the bare read, one rotation."""
    calls["kernel"] = kernel_calls(layers, torch.randn(1, k, dtype=torch.bfloat16, device="cuda"), cfg, None)
    nbytes = packed_bytes(layers[0])
    calls["floor"] = floor_calls(nbytes, False)
    times = graph_times_us(list(calls.values()), trials=11, min_ms=10.0)
    return dict(K=k, N=n, bytes=nbytes, **{name: round(t, 2) for name, t in zip(calls, times)})


def layouts() -> list[dict]:
    records = []
    for k, n, bn, bk, stages in LAYOUT_CASES:
        g, rw, steps, tiles = bk // 32, bk * BITS // 32, k // bk, n // bn
        layers = make_layers(k, n, BITS, copies_for(n * k * BITS // 8))
        out = torch.empty(tiles, dtype=torch.int32, device="cuda")
        calls = {"strided": [_launch(ring_descriptors(lay.packed, lay.scales, lay.zeros, BITS, bn, bk), out, (tiles, 1),
                                     steps, 0, stages, 1, 96)
                             for lay in layers]}
        keep = []  # the synthetic layouts' buffers, alive while their calls are
        calls["tiled"], calls["packed"] = [], []
        for _ in layers:
            codes = torch.randint(-2**31, 2**31 - 1, (tiles * k * BITS // 32, bn), dtype=torch.int32, device="cuda")
            sz = [torch.randint(0, 255, (tiles * k // 32, bn), dtype=torch.uint8, device="cuda") for _ in range(2)]
            descs = (tma_descriptor(codes, [rw, bn], False), *(tma_descriptor(t, [g, bn], False) for t in sz))
            calls["tiled"].append(_launch(descs, out, (tiles, 1), steps, 1, stages, 1, 96))
            block_rows = (bn * bk * BITS // 8 + 2 * bn * g) // 1024  # one step: 10 KiB = 8 + 2 rows of 1 KiB
            buf = torch.randint(-2**31, 2**31 - 1, (tiles * steps * block_rows, 256), dtype=torch.int32,
                                device="cuda")
            descs = (tma_descriptor(buf, [8, 256], False), tma_descriptor(buf, [block_rows - 8, 256], False),
                     tma_descriptor(buf, [block_rows - 8, 256], False))
            calls["packed"].append(_launch(descs, out, (tiles, 1), steps, 2, stages, 1, 96))
            keep += [codes, *sz, buf]
        rec = dict(block_n=bn, block_k=bk, stages=stages,
                   **_timed(k, n, layers, calls, Config("gemv_tma", 1, bn, bk, num_warps=4, num_stages=stages)))
        print(json.dumps(rec), flush=True)
        records.append(rec)
        del layers, calls, keep
        torch.cuda.empty_cache()
    return records


def rings() -> list[dict]:
    records = []
    for k, n in ((8192, 8192), (4096, 14336)):
        layers = make_layers(k, n, BITS, copies_for(n * k * BITS // 8))
        out = torch.empty(4096, dtype=torch.int32, device="cuda")
        calls = {}
        for bn, bk, stages, split, regs in RING_CASES:
            name = f"bn{bn}_bk{bk}_st{stages}_split{split}_r{regs}"
            calls[name] = [_launch(ring_descriptors(lay.packed, lay.scales, lay.zeros, BITS, bn, bk), out,
                                   (n // bn, split), k // bk, 0, stages, split, regs)
                           for lay in layers]
        rec = _timed(k, n, layers, calls, None)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        del layers, calls
        torch.cuda.empty_cache()
    return records


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/ring_probe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--probe", choices=("layouts", "rings"), required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON records to write")
    args = ap.parse_args()
    records = layouts() if args.probe == "layouts" else rings()
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
