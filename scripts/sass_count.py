"""Offline SASS instruction count of the GEMV and tile kernels: compile for sm_90 without a GPU, count the main loop.

The kernel arguments come from the real dispatch (``kernels.triton_ops.launch_linear`` on CPU
tensors, with the kernel replaced by a recorder), so the compiled variant is specialized as it
would be on the GPU (alignment, the values Triton folds); it is then compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the bundled ptxas) and disassembled with
the bundled ``cuobjdump``. The main loop is the largest backward-branch loop
(``kernels.bench._loop_mix``); ``per code`` divides its length by the codes one thread
dequantizes per iteration (GEMV: ``UNROLL`` steps of ``BG * 32`` codes of ``BN / (32 * warps)``
columns, per token; tiles ``gemm``/``gemm_t``, where ``--tile`` is ``BN,BK,WARPS``: ``BN * BK / (32 * warps)``).

Must run without ``TRITON_INTERPRET`` (the half2 kernel's inline PTX is off under the interpreter).

``.venv/bin/python scripts/sass_count.py`` (the default W2 variants) or, e.g.,
``.venv/bin/python scripts/sass_count.py --kernel gemv_h2 --bits 2 --m 2 --tile 512,1,4 --dump /tmp/h2.sass``
or ``--kernel gemm_t --m 16 --tile 64,128,4`` (a tensor-core tile, 3 pipeline stages).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import create_function_from_signature

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import triton_ops  # noqa: E402
from kernels.bench import _loop_mix  # noqa: E402
from kernels.grid import quantize_weight  # noqa: E402
from kernels.ops import pack_linear  # noqa: E402
from kernels.triton_ops import Config, launch_linear  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# Config.kernel -> attribute of triton_ops
KERNELS = {"gemv": "gemv_kernel", "gemv_h2": "gemv_h2_kernel", "gemm": "gemm_kernel", "gemm_t": "gemm_kernel"}
# (kernel, bits, M, (BN, groups per step, warps), steps per loop iteration): the W2 tiles of the H200 A/B
DEFAULT = [(kernel, 2, m, tile, unroll) for kernel, unroll in (("gemv_h2", 1), ("gemv_h2", 2))
           for m, tile in ((1, (512, 2, 4)), (1, (256, 2, 2)), (2, (512, 1, 4)), (2, (512, 2, 4)))]
DEFAULT.append(("gemv", 2, 1, (512, 2, 4), 1))


@dataclass
class Launch:
    """The kernel, positional and keyword arguments of one recorded launch."""
    fn: triton.runtime.JITFunction
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call instead of launching."""

    def __init__(self, fn: triton.runtime.JITFunction) -> None:
        self.fn = fn
        self.launch: Launch | None = None

    def __getitem__(self, grid: tuple):
        def record(*args, **kwargs) -> None:
            self.launch = Launch(self.fn, args, kwargs)
        return record


def record_launch(kernel: str, bits: int, m: int, tile: tuple[int, int, int], k: int, n: int,
                  dtype: torch.dtype, unroll: int) -> Launch:
    """The arguments the dispatch passes for ``Config(kernel, m, *tile)`` on a random K x N layer (CPU tensors),
    with ``UNROLL=unroll`` added for the half2 kernel."""
    bn, bg, warps = tile
    stages = dict(num_stages=3) if kernel.startswith("gemm") else {}
    layer = pack_linear(quantize_weight(torch.randn(n, k) * 0.02), bits)
    name = KERNELS[kernel]
    rec = _Recorder(getattr(triton_ops, name))
    setattr(triton_ops, name, rec)
    try:
        launch_linear(torch.randn(m, k).to(dtype), layer.packed, layer.scales, layer.zeros, layer.row_scale, None,
                      None, None, bits, layer.master_bits, layer.in_features, dtype,
                      Config(kernel, m, bn, bg, num_warps=warps, **stages))
    finally:
        setattr(triton_ops, name, rec.fn)
    assert rec.launch is not None
    if kernel == "gemv_h2":
        rec.launch.kwargs["UNROLL"] = unroll
    return rec.launch


def compile_sm90(launch: Launch, source=ASTSource):
    """Compile the recorded launch for sm_90 with the JIT's own specialization of its arguments (``source``:
    ``ASTSource`` for Triton kernels, Gluon's ``GluonASTSource`` for Gluon ones)."""
    backend = triton.compiler.make_backend(TARGET)
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    bound, spec, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(backend, launch.kwargs, bound, spec, options)
    return triton.compile(source(launch.fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def gluon_loop_report(launch: Launch, codes: int, tokens: int, skip: tuple[str, ...], dump: Path | None) -> None:
    """Compile a recorded Gluon launch for sm_90 and print its registers, spills and shared memory and its main loop's
    length and instruction mix per ``codes`` (codes one consumer thread dequantizes per iteration, for ``tokens``
    tokens); the main loop is the largest backward-branch loop holding none of ``skip`` (the worker warps' dispatch
    loop of ``gl.warp_specialize`` holds ``SETMAXREG`` and ``EXIT``). ``dump``: write the SASS listing there and the
    PTX beside it (``.ptx`` appended)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    compiled = compile_sm90(launch, GluonASTSource)
    cubin = compiled.asm["cubin"]
    print(re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", cuobjdump_of(cubin, "-res-usage")),
          f"dynamic shared memory {compiled.metadata.shared} bytes")
    sass = cuobjdump_of(cubin, "-sass")
    if dump:
        dump.write_text(sass)
        Path(f"{dump}.ptx").write_text(compiled.asm["ptx"])
    length, mix = _loop_mix(sass, skip=skip)
    print(f"consumer loop: {length} instructions per {codes} codes per thread ({length / codes:.2f} per code; "
          f"{tokens} tokens), {sum(v for k, v in mix.items() if k.startswith('BAR'))} barriers:",
          dict(mix.most_common(24)))


def cuobjdump() -> str:
    """The cuobjdump bundled with Triton (or the one on PATH)."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else (shutil.which("cuobjdump") or "cuobjdump")


def cuobjdump_of(cubin: bytes, flag: str) -> str:
    """``cuobjdump <flag>`` of a cubin (``-sass``: the listing, ``-res-usage``: registers and memory)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def count(kernel: str, bits: int, m: int, tile: tuple[int, int, int], unroll: int, k: int, n: int,
          dtype: torch.dtype, dump: Path | None = None) -> dict:
    """Registers, local memory (spills), shared memory and the main loop's length, per-code cost and instruction mix of one variant."""
    compiled = compile_sm90(record_launch(kernel, bits, m, tile, k, n, dtype, unroll))
    sass = cuobjdump_of(compiled.asm["cubin"], "-sass")
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", cuobjdump_of(compiled.asm["cubin"], "-res-usage")))
    if dump:
        dump.write_text(sass)
    length, ops = _loop_mix(sass)
    bn, bg, warps = tile
    codes = bg * bn // (32 * warps) if kernel.startswith("gemm") else unroll * bg * 32 * bn // (32 * warps) * m
    return dict(kernel=kernel, bits=bits, M=m, BN=bn, BG=bg, warps=warps, unroll=unroll, regs=int(usage["REG"]),
                local=int(usage["LOCAL"]), shared=compiled.metadata.shared, loop=length, codes=codes, per_code=round(length / codes, 2),
                mix=dict(ops.most_common(14)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[13:]))
    ap.add_argument("--kernel", choices=sorted(KERNELS), help="one variant instead of the default list")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--m", type=int, default=1, help="tokens (the tile's block_m)")
    ap.add_argument("--tile", type=lambda s: tuple(int(v) for v in s.split(",")), default=(512, 2, 4),
                    metavar="BN,BG,WARPS", help="columns, groups per step, warps (default 512,2,4)")
    ap.add_argument("--shape", type=lambda s: tuple(int(v) for v in s.split("x")), default=(8192, 8192),
                    metavar="KxN", help="layer shape the arguments come from (default 8192x8192)")
    ap.add_argument("--unroll", type=int, choices=[1, 2], default=2, help="gemv_h2: steps per loop iteration")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--dump", type=Path, help="write the SASS listing (one --kernel only)")
    ap.add_argument("--json", type=Path, help="also write the counts as JSON")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    variants = [(args.kernel, args.bits, args.m, args.tile, args.unroll)] if args.kernel else DEFAULT
    rows = []
    for kernel, bits, m, tile, unroll in variants:
        row = count(kernel, bits, m, tile, unroll, *args.shape, dtype, args.dump if args.kernel else None)
        rows.append(row)
        print(f"{kernel:8s} W{bits} M={m} BN={tile[0]} BG={tile[1]} w={tile[2]} x{unroll}: {row['regs']} regs, "
              f"{row['local']} B local, loop {row['loop']} instr / {row['codes']} codes = {row['per_code']}/code  "
              + " ".join(f"{op} {c}" for op, c in row["mix"].items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
