"""``python -m serve CKPT``: vLLM with the bitbybit plugin on a CUDA GPU, the CPU fallback elsewhere."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections.abc import Sequence

from kernels.checkpoint import read_quant_config
from kernels.grid import check_bits

from .engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S
from .vllm_launch import vllm_command, vllm_usable

log = logging.getLogger("serve")

CPU_FLAGS = ("--max-queue", "--timeout", "--max-batch", "--threads")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a bitbybit checkpoint through the OpenAI API: vLLM with the bitbybit plugin when vLLM\n"
                    "and a CUDA GPU are present, otherwise a CPU server running the kernels' reference ops.\n"
                    "Flags not listed here are passed to `vllm serve` (ignored, with a warning, on the CPU).",
        epilog="examples:\n"
               "  python -m serve CKPT --bits 2 --act-bits 16         # W2A16 on port 8000\n"
               "  python -m serve CKPT --bits 2 --act-bits 2 --api-key sk-local --served-model-name bitbybit\n"
               "  python -m serve CKPT --bits 4 --max-model-len 4096 --tensor-parallel-size 2   # vLLM flags\n"
               "  python -m serve CKPT --backend cpu --threads 1      # the CPU server, also on a GPU machine\n")
    p.add_argument("ckpt", metavar="CKPT", help="checkpoint directory written by `python -m qat.run`")
    p.add_argument("--bits", type=int, metavar="B",
                   help="weight precision, 1..8 (default: the checkpoint's default_bits; a compact checkpoint "
                        "serves its B only)")
    p.add_argument("--act-bits", type=int, metavar="A",
                   help="activation precision: 16 (not quantized) or 1..8, e.g. 2 for W2A2 (default: the "
                        "checkpoint's act_bits)")
    p.add_argument("--host", help="address to bind (CPU default 127.0.0.1; vLLM's own default otherwise)")
    p.add_argument("--port", type=int, help="port to bind (default 8000, as vLLM's)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 requests "
                                                   "(default: no auth)")
    p.add_argument("--served-model-name", metavar="NAME", help="model id clients send (default: CKPT as given)")
    p.add_argument("--max-queue", type=int, metavar="N",
                   help=f"CPU: requests allowed to wait before a 503 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--timeout", type=float, metavar="S",
                   help=f"CPU: seconds a request may take, waiting included, before a 504 "
                        f"(default {DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help=f"CPU: requests decoded together in one batch (default {DEFAULT_MAX_BATCH})")
    p.add_argument("--threads", type=int, metavar="N", help="CPU: torch threads for generation (default: torch's "
                                                            "choice); 1 is fastest for tiny models or a busy machine")
    p.add_argument("--backend", choices=("auto", "vllm", "cpu"), default="auto",
                   help="auto: vLLM if vLLM and a CUDA GPU are present, else the CPU server; vllm: fail if it "
                        "cannot run; cpu: the CPU server (default %(default)s)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="logging level of this launcher and the CPU server (default %(default)s)")
    return p


def choose_backend(requested: str) -> tuple[str, str]:
    """``("vllm" | "cpu", reason)`` for ``--backend``; an explicit ``vllm`` that cannot run is an error."""
    if requested == "cpu":
        return "cpu", "--backend cpu"
    usable, reason = vllm_usable()
    if requested == "vllm" and not usable:
        raise ValueError(f"--backend vllm: {reason}")
    return ("vllm" if usable else "cpu"), reason


def main(argv: Sequence[str] | None = None) -> None:
    p = parser()
    args, extra = p.parse_known_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    try:
        backend, reason = choose_backend(args.backend)
        if backend == "vllm":
            log.info("serving with vLLM and the bitbybit plugin (%s)", reason)
        else:
            log.info("serving with the CPU fallback server, reference ops on the CPU (%s)", reason)
        qconfig = read_quant_config(args.ckpt)
        bits = qconfig.resolve_bits(args.bits)
        if args.act_bits is not None and args.act_bits != 16:
            check_bits(args.act_bits)
        if args.max_queue is not None and args.max_queue < 1:
            raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}")
        for flag in ("max_batch", "threads"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
        if args.timeout is not None and args.timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {args.timeout}")
        name = args.served_model_name or args.ckpt
        if backend == "vllm":
            _exec_vllm(args, bits, extra)
        else:
            _serve_cpu(args, bits, name, extra)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))


def _exec_vllm(args: argparse.Namespace, bits: int, extra: list[str]) -> None:
    ignored = [f for f in CPU_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if ignored:
        log.warning("%s apply to the CPU server only; vLLM schedules and times requests itself", ", ".join(ignored))
    cmd = vllm_command(args.ckpt, bits, args.act_bits, args.host, args.port, args.api_key,
                       args.served_model_name, extra)
    log.info("exec: %s", shlex.join(c if c != args.api_key else "***" for c in cmd))
    os.execv(cmd[0], cmd)


def _serve_cpu(args: argparse.Namespace, bits: int, name: str, extra: list[str]) -> None:
    import torch

    from .cpu_server import build_app, run

    if extra:
        log.warning("ignoring flags the CPU server does not use (vLLM flags): %s", shlex.join(extra))
    host, port = args.host or "127.0.0.1", args.port if args.port is not None else 8000
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    app = build_app(args.ckpt, bits, args.act_bits, name, args.api_key,
                    args.max_queue if args.max_queue is not None else DEFAULT_MAX_QUEUE,
                    args.timeout if args.timeout is not None else DEFAULT_TIMEOUT_S,
                    args.max_batch if args.max_batch is not None else DEFAULT_MAX_BATCH)
    log.info("OpenAI API for model %r on http://%s:%d/v1%s", name, host, port,
             " (bearer auth required)" if args.api_key else "")
    run(app, host, port, args.log_level)
