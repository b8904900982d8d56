"""A/B of the half2 GEMV (``kernels/triton_gemv_h2.py``) against the current GEMV and bf16 ``F.linear``.

Half2 variants (:func:`h2_variants`, each launched through the normal dispatch): ``gemv_h2`` (two
steps per loop iteration, the kernel's default), ``gemv_h2_u1`` (one step per iteration) and, with
``--prev MODULE``, ``gemv_h2_prev``: the ``gemv_h2_kernel`` of an earlier version of the file, e.g.
``git show 1e70e0c:kernels/triton_gemv_h2.py > kernels/h2_prev.py`` and ``--prev kernels.h2_prev``.
The baseline, ``current``, is what the dispatch runs today for that shape (table or rule).

One run on a CUDA GPU:

1. Correctness of every half2 variant (and of ``current``, for comparison) on every shape, bit
   width, M (``--ms``, default 1, 2) and input dtype (bf16, fp16), with fresh random inputs, plain and with a few
   outlier channels at 1e4, into NaN-poisoned outputs, against the float64 reference op
   (``kernels.reference.linear_wa16``); ``rel_err = |out - ref| / |ref|`` must stay <= 1e-2.
2. Timing as ``kernels.bench`` times (CUDA-graph replays over enough weight copies that L2 does
   not help): bf16 ``F.linear``, ``current`` (its table / default configuration) and a small
   grid of configurations per half2 variant (every one also checked once against the reference).
3. Optionally (``--sass``) the compiler report of both GEMV kernels (``kernels.bench.sass_report``).

Writes JSON to ``--out`` after every shape and prints a table; exits 1 if a correctness check failed.

GPU: ``python3 scripts/gemv_ab.py --out $OUT/gemv_ab.json --sass $OUT/gemv_ab_sass.json [--prev kernels.h2_prev]``
CPU smoke test (interpreter, tiny shapes, correctness only):
``TRITON_INTERPRET=1 .venv/bin/python scripts/gemv_ab.py --smoke --out /tmp/gemv_ab.json``
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.grid import quantize_weight  # noqa: E402
from kernels.ops import PackedLinear, pack_linear  # noqa: E402
from kernels import triton_ops  # noqa: E402
from kernels.reference import linear_wa16  # noqa: E402
from kernels.triton_gemv_h2 import gemv_h2_kernel  # noqa: E402
from kernels.triton_ops import Config, choose_config, gemv_split, launch_linear  # noqa: E402

SHAPES = [(8192, 8192), (4096, 14336), (4096, 4096), (14336, 4096), (28672, 8192)]  # K x N
SMOKE_SHAPES = [(96, 40), (72, 24)]  # the second has a zero-padded K (EVEN_K off)
MAX_ERR = 1e-2
OUTLIER = 1e4
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Variant:
    """Stands in for the half2 kernel in the dispatch, launching it with extra constexprs (``UNROLL``)."""

    def __init__(self, kernel, **consts) -> None:
        self.kernel, self.consts = kernel, consts

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, **self.consts)


def h2_variants(prev: str | None) -> dict:
    """Variant name -> the object the dispatch launches as ``gemv_h2_kernel`` for it."""
    variants = {"gemv_h2": Variant(gemv_h2_kernel, UNROLL=2), "gemv_h2_u1": Variant(gemv_h2_kernel, UNROLL=1)}
    if prev:
        variants["gemv_h2_prev"] = importlib.import_module(prev).gemv_h2_kernel
    return variants


@contextmanager
def launching(kernel):
    """Make the dispatch launch ``kernel`` for ``Config("gemv_h2", ...)`` inside the block."""
    saved = triton_ops.gemv_h2_kernel
    triton_ops.gemv_h2_kernel = kernel
    try:
        yield
    finally:
        triton_ops.gemv_h2_kernel = saved


def h2_grid(bits: int, m: int, n: int, kq: int, wide: bool, tiles: list[tuple[int, int, int]] | None = None,
            split_mults: list[int] | None = None) -> list[Config]:
    """``gemv_h2`` configurations to time; the first is the one the correctness sweep uses.

    Tiles ``(BN, groups per step, warps)`` (``tiles`` overrides them) by default keep one column group of
    4 words per thread (``BN = 128 * warps``), like the current GEMV: the two that won somewhere on the
    first H200 A/B (docs/results/gemv-h2-ab-h200.json); split-K from ``gemv_split`` times each of
    ``split_mults`` (default: 1, and also 2 if ``wide``).
    (Tiles with more warps than their columns fill lost everywhere: docs/results/gemv-h2-ab4-h200.json.)
    """
    if tiles is None and m == 1:
        tiles = [(512, 2, 4), (256, 2, 2)] if bits == 2 else [(512, 2, 4), (512, 1, 4)]
    elif tiles is None:
        tiles = [(512, 2, 4), (512, 1, 4)] if bits == 2 else [(512, 1, 4), (256, 1, 2)]
    out = []
    for bn, bg, w in tiles:
        split = gemv_split(n, kq, bn, bg)
        out += [Config("gemv_h2", triton.next_power_of_2(m), bn, bg, split_k=s * split, num_warps=w)
                for s in (split_mults or ((1, 2) if wide else (1,)))]
    return out


def make_layer(k: int, n: int, bits: int, device: str) -> PackedLinear:
    return pack_linear(quantize_weight(torch.randn(n, k, device=device) * 0.02), bits)


def make_input(m: int, k: int, dtype: torch.dtype, outliers: bool, device: str) -> torch.Tensor:
    """Fresh N(0, 1) activations; with ``outliers`` four channels (the same for every token) at 1e4."""
    x = torch.randn(m, k, device=device)
    if outliers:
        x[:, torch.randperm(k, device=device)[:4]] = OUTLIER
    return x.to(dtype)


def run(layer: PackedLinear, x: torch.Tensor, cfg: Config | None) -> torch.Tensor:
    """``x @ W^T`` into a NaN-poisoned output (``cfg`` None: the table / default configuration)."""
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=x.device)
    launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, layer.split_index, None, None,
                  layer.bits, layer.master_bits, layer.in_features, x.dtype, cfg, out)
    return out


def rel_err(layer: PackedLinear, x: torch.Tensor, cfg: Config | None) -> float:
    """Relative error of one call against the float64 reference (inf if an output was not written)."""
    out = run(layer, x, cfg)
    if out.isnan().any():
        return float("inf")
    ref = linear_wa16(x.double(), layer.to_quantized_weight(), layer.bits)
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(layer: PackedLinear, k: int, n: int, m: int, dtype: str, outliers: bool, cfg: Config | None,
          device: str, name: str = "current") -> dict:
    """One correctness record of ``cfg`` (None: the current GEMV), run as the half2 variant ``name``."""
    x = make_input(m, k, DTYPES[dtype], outliers, device)
    rec = dict(K=k, N=n, M=m, bits=layer.bits, dtype=dtype, outliers=outliers, kernel=name)
    try:
        err = rel_err(layer, x, cfg)
    except Exception as e:  # a configuration that does not compile or launch
        return dict(rec, err=None, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return dict(rec, err=err, ok=err <= MAX_ERR, config=None if cfg is None else cfg.__dict__)


def correctness(k: int, n: int, bits: int, device: str, variants: dict, ms: list[int]) -> list[dict]:
    """The first ``gemv_h2`` configuration of every half2 variant and the current GEMV on every M, dtype and input."""
    layer = make_layer(k, n, bits, device)
    kq = layer.scales.shape[1] * 32
    recs = []
    for m in ms:
        for dtype in DTYPES:
            for outliers in (False, True):
                cfg = h2_grid(bits, m, n, kq, False)[0]
                runs = [(name, cfg, kernel) for name, kernel in variants.items()] + [("current", None, gemv_h2_kernel)]
                for name, c, kernel in runs:
                    with launching(kernel):
                        rec = check(layer, k, n, m, dtype, outliers, c, device, name)
                    recs.append(rec)
                    err = "-" if rec["err"] is None else f"{rec['err']:.2e}"
                    print(f"check K={k:5d} N={n:5d} W{bits} M={m} {dtype} {'outliers' if outliers else 'randn   '} "
                          f"{name:12s} err {err} {'ok' if rec['ok'] else 'FAIL ' + rec.get('error', '')}",
                          flush=True)
    return recs


def timing(k: int, n: int, bits: int, wide: bool, bw: float, variants: dict, ms: list[int],
           tiles: list[tuple[int, int, int]] | None = None,
           split_mults: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    """Time bf16, the current kernel and every half2 variant's grid at each M (bf16 inputs); each config checked once."""
    from kernels.bench import (bf16_calls, bf16_weights, copies_for, graph_time_us, make_layers, packed_bytes,
                               time_kernel)

    layers = make_layers(k, n, bits, copies_for(n * k * bits // 8))
    w16 = bf16_weights(k, n)
    nbytes = packed_bytes(layers[0])
    recs, checks = [], []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        y16 = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        bf16_us = graph_time_us(bf16_calls(x, w16, y16))
        io = 2 * m * k + 2 * m * n

        def record(kernel: str, cfg: Config, us: float | None, error: str | None = None) -> None:
            rec = dict(K=k, N=n, M=m, bits=bits, kernel=kernel, config=cfg.__dict__, us=us, bf16_us=round(bf16_us, 2))
            if us is not None:
                rec.update(us=round(us, 2), speedup=round(bf16_us / us, 2),
                           bw_pct=round(100 * (nbytes + io) / (us * 1e-6) / bw, 1))
            if error:
                rec["error"] = error
            recs.append(rec)
            shown = "failed: " + error if us is None else f"{us:7.2f} us  x{rec['speedup']:5.2f}  {rec['bw_pct']:5.1f}% bw"
            print(f"time  K={k:5d} N={n:5d} W{bits} M={m} {kernel:12s} {_cfg_str(cfg):24s} {shown}  "
                  f"(bf16 {bf16_us:.2f} us)", flush=True)

        record("current", choose_config(bits, m, n, k), time_kernel(layers, x, None, None))
        for name, kernel in variants.items():
            with launching(kernel):
                for cfg in h2_grid(bits, m, n, k, wide, tiles, split_mults):
                    chk = check(layers[0], k, n, m, "bf16", False, cfg, "cuda", name)
                    checks.append(chk)
                    if not chk["ok"]:
                        record(name, cfg, None, chk.get("error") or f"rel_err {chk['err']:.2e}")
                        continue
                    try:
                        record(name, cfg, time_kernel(layers, x, cfg, None))
                    except Exception as e:
                        record(name, cfg, None, f"{type(e).__name__}: {str(e)[:300]}")
    del layers, w16
    torch.cuda.empty_cache()
    return recs, checks


def _cfg_str(cfg: Config) -> str:
    return f"BN={cfg.block_n} BG={cfg.block_k} w={cfg.num_warps} s={cfg.split_k}"


def table(recs: list[dict]) -> str:
    """Per shape, bits and M: bf16, ``current`` and each half2 variant's best configuration (time and ratio)."""
    names = list(dict.fromkeys(r["kernel"] for r in recs if r["kernel"] != "current"))
    rows = ["| K x N | W | M | bf16 us | current us (x, bw) | " + " | ".join(f"{v} us (config) / current" for v in names)
            + " |",
            "|---|---|---|---|---|" + "---|" * len(names)]
    keys = dict.fromkeys((r["K"], r["N"], r["bits"], r["M"]) for r in recs)
    for k, n, bits, m in keys:
        here = [r for r in recs if (r["K"], r["N"], r["bits"], r["M"]) == (k, n, bits, m) and r["us"] is not None]
        old = next((r for r in here if r["kernel"] == "current"), None)
        cells = []
        for v in names:
            best = min((r for r in here if r["kernel"] == v), key=lambda r: r["us"], default=None)
            ratio = f"{best['us'] / old['us']:.2f}" if old and best else "-"
            cells.append("-" if best is None else f"{best['us']:.2f} ({_cfg_str(Config(**best['config']))}) / {ratio}")
        current = "-" if old is None else f"{old['us']:.2f} ({old['speedup']:.2f}x, {old['bw_pct']:.0f}%)"
        bf16 = here[0]["bf16_us"] if here else "-"
        rows.append(f"| {k} x {n} | {bits} | {m} | {bf16} | {current} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                    help="comma-separated KxN (default: " + ",".join(f"{k}x{n}" for k, n in SHAPES) + ")")
    ap.add_argument("--bits", type=lambda s: [int(v) for v in s.split(",")], default=[2, 4])
    ap.add_argument("--wide-shapes", type=int, default=2,
                    help="the first this many shapes time W2 at two split-K values, the others at one (time budget)")
    ap.add_argument("--sass", type=Path, help="write the compiler report of both GEMV kernels (JSON)")
    ap.add_argument("--prev", metavar="MODULE",
                    help="also time the gemv_h2_kernel of this module (an earlier kernel file), as gemv_h2_prev")
    ap.add_argument("--ms", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2],
                    help="token counts (default 1,2; the half2 kernel holds M <= 4 tokens per program). Under the "
                         "interpreter, 'current' at M >= 3 with bf16 runs the tensor-core tiles, whose bf16 tl.dot "
                         "Triton 3.9's interpreter computes wrongly (the test suite patches that; this script does not)")
    ap.add_argument("--tiles", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                    help="timed half2 tiles BNxBGxWARPS, comma-separated (default: two per bits and M, see h2_grid)")
    ap.add_argument("--split-mults", type=lambda s: [int(v) for v in s.split(",")],
                    help="time each tile at gemv_split times each of these (default: 1, and 2 on the wide shapes)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, correctness only (CPU interpreter)")
    args = ap.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("without a GPU run under TRITON_INTERPRET=1 (--smoke)")
    shapes = args.shapes or (SMOKE_SHAPES if smoke else SHAPES)
    device = "cpu" if smoke else "cuda"
    t0 = time.monotonic()
    info = dict(triton=triton.__version__, torch=torch.__version__,
                device="interpreter" if smoke else torch.cuda.get_device_name())
    bw = None
    if not smoke:
        from kernels.bench import copy_bandwidth
        bw = copy_bandwidth()
        info["copy_tbps"] = round(bw / 1e12, 3)
    print(info, flush=True)
    variants = h2_variants(args.prev)
    result = dict(info=info, correctness=[], timing=[], timing_checks=[])
    for i, (k, n) in enumerate(shapes):
        for bits in args.bits:
            result["correctness"] += correctness(k, n, bits, device, variants, args.ms)
            if not smoke:
                recs, checks = timing(k, n, bits, bits == 2 and i < args.wide_shapes, bw, variants, args.ms,
                                     args.tiles, args.split_mults)
                result["timing"] += recs
                result["timing_checks"] += checks
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.sass and not smoke:
        from kernels.bench import sass_report
        from kernels.triton_gemv import gemv_kernel
        from kernels.triton_gemv_h2 import gemv_h2_kernel
        result["sass"] = sass_report((gemv_kernel, gemv_h2_kernel))
        args.sass.write_text(json.dumps(result["sass"], indent=1) + "\n")
    result["seconds"] = round(time.monotonic() - t0, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    failed = [r for r in result["correctness"] + result["timing_checks"] if not r["ok"]]
    errs = [r["err"] for r in result["correctness"] if r["err"] is not None and r["kernel"] != "current"]
    if result["timing"]:
        print(table(result["timing"]))
    summary = f"max {max(errs):.2e}, median {sorted(errs)[len(errs) // 2]:.2e} over {len(errs)}" if errs else "no"
    print(f"half2 rel_err: {summary} checks; {len(failed)} failed checks; {result['seconds']} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
