"""A bounded load test of the OpenAI API on loopback: N concurrent completions, every one accounted for.

    python -m serve.loadtest CKPT [--bits 2] [--requests 64] [--max-tokens 32] [--stream]

starts ``python -m serve CKPT`` on a free 127.0.0.1 port (or uses ``--url`` of a server already
running on loopback), sends all requests at once through the ``openai`` client, checks that every
request got exactly one complete answer, and prints latency percentiles and tokens/s. Exits 1 if
any request failed, was lost, or the run exceeded ``--limit-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from urllib.parse import urlparse

import httpx
import openai

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = ("Once upon a time", "The little dog", "Lily and Ben went to the park. They", "One day, a bird",
           "Tom had a red ball.", "The sun was hot and", "Mom said,", "There was a big tree")


@dataclass
class Result:
    latency_s: float
    first_token_s: float | None
    completion_tokens: int
    finish_reason: str | None
    id: str


@dataclass
class Summary:
    requests: int
    ok: int
    errors: list[str]
    wall_s: float
    p50_s: float
    p95_s: float
    max_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    completion_tokens: int
    tokens_per_s: float


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


async def one_request(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int, stream: bool) -> Result:
    start = time.perf_counter()
    kwargs = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
              "seed": i}
    if not stream:
        r = await client.completions.create(**kwargs)
        return Result(time.perf_counter() - start, None, r.usage.completion_tokens, r.choices[0].finish_reason, r.id)
    first, finish, rid, usage = None, None, None, None
    async for chunk in await client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        rid = chunk.id
        if chunk.choices:
            if first is None and chunk.choices[0].text:
                first = time.perf_counter() - start
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
    return Result(time.perf_counter() - start, first, usage or 0, finish, rid or "")


async def run_load(base_url: str, model: str, requests: int, max_tokens: int, stream: bool, api_key: str) -> Summary:
    """Fire ``requests`` completions at once and account for every one."""
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=None,
                                http_client=httpx.AsyncClient(limits=limits, timeout=None))
    start = time.perf_counter()
    outcomes = await asyncio.gather(*(one_request(client, model, i, max_tokens, stream) for i in range(requests)),
                                    return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    results = [o for o in outcomes if isinstance(o, Result)]
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if not isinstance(o, Result)]
    bad = [r for r in results if r.finish_reason not in ("stop", "length") or not r.completion_tokens]
    errors += [f"incomplete answer {r}" for r in bad]
    if len({r.id for r in results}) != len(results):
        errors.append("duplicate response ids: some request got another's answer")
    lat = [r.latency_s for r in results] or [float("nan")]
    ttft = [r.first_token_s for r in results if r.first_token_s is not None]
    tokens = sum(r.completion_tokens for r in results)
    return Summary(requests, len(results) - len(bad), errors, wall, percentile(lat, 50), percentile(lat, 95), max(lat),
                   percentile(ttft, 50) if ttft else None, percentile(ttft, 95) if ttft else None, tokens, tokens / wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "serve", args.ckpt, "--port", str(port), "--host", "127.0.0.1", "--backend", "cpu",
           "--served-model-name", args.model, "--max-queue", str(max(64, args.requests)),
           "--timeout", str(args.limit_s), "--log-level", "warning"]
    if args.bits is not None:
        cmd += ["--bits", str(args.bits)]
    for flag in ("threads", "max_batch"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 120 s")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m serve.loadtest", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A bounded load test of the OpenAI API on loopback: N concurrent completions, every one\n"
                    "accounted for. Starts `python -m serve CKPT --backend cpu` on a free 127.0.0.1 port (or uses\n"
                    "--url), sends all requests at once, prints latency percentiles and tokens/s; exits 1 if any\n"
                    "request failed or was lost, or the run passed --limit-s.",
        epilog="examples:\n"
               "  python -m serve.loadtest CKPT --bits 2 --requests 64 --max-tokens 32 --stream\n"
               "  python -m serve.loadtest --url http://127.0.0.1:8000 --model bitbybit --api-key sk-local\n")
    p.add_argument("ckpt", nargs="?", metavar="CKPT", help="checkpoint to serve on the CPU server (omit with --url)")
    p.add_argument("--url", help="a server already running on loopback, e.g. http://127.0.0.1:8000 (vLLM or CPU)")
    p.add_argument("--model", default="loadtest",
                   help="model id sent in requests; with --url: the server's served name (default %(default)s)")
    p.add_argument("--api-key", default="unused", metavar="KEY",
                   help="bearer key sent with every request (default %(default)s)")
    p.add_argument("--bits", type=int, metavar="B",
                   help="weight precision of the started server (default: the checkpoint's)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads of the started server (default: torch's)")
    p.add_argument("--max-batch", type=int, metavar="N",
                   help="batch size of the started server (default: python -m serve's)")
    p.add_argument("--requests", type=int, default=64, metavar="N",
                   help="concurrent requests, 1..1024 (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, metavar="N",
                   help="max_tokens of each completion (default %(default)s)")
    p.add_argument("--stream", action="store_true", help="stream the answers and report time to first token")
    p.add_argument("--limit-s", type=float, default=600.0, metavar="S",
                   help="abort the run after this many seconds; also the started server's --timeout "
                        "(default %(default)g)")
    p.add_argument("--json", metavar="FILE", help="also write the summary here (default: print only)")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1024:
        p.error("--requests must be within 1..1024")
    if (args.url is None) == (args.ckpt is None):
        p.error("give either CKPT (to start a server) or --url (a running one)")
    if args.url is not None and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must point at loopback ({', '.join(LOOPBACK)}); this tool never sends load elsewhere")
    proc = None
    try:
        if args.url is None:
            port = free_port()
            proc = start_server(args, port)
            args.url = f"http://127.0.0.1:{port}"
        load = run_load(args.url, args.model, args.requests, args.max_tokens, args.stream, args.api_key)
        try:
            summary = asyncio.run(asyncio.wait_for(load, args.limit_s))
        except TimeoutError:
            raise SystemExit(f"FAILED: the run did not finish within --limit-s {args.limit_s:g}") from None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    print(report(summary, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "api_key"}, **asdict(summary)}, f, indent=2)
    if summary.errors or summary.ok != summary.requests:
        raise SystemExit(1)


def report(s: Summary, args: argparse.Namespace) -> str:
    lines = [f"requests {s.requests} (all at once), answered {s.ok}, errors {len(s.errors)}",
             f"wall {s.wall_s:.2f} s, completion tokens {s.completion_tokens}, {s.tokens_per_s:.1f} tokens/s",
             f"latency p50 {s.p50_s:.2f} s, p95 {s.p95_s:.2f} s, max {s.max_s:.2f} s"]
    if s.ttft_p50_s is not None:
        lines.append(f"time to first token p50 {s.ttft_p50_s:.2f} s, p95 {s.ttft_p95_s:.2f} s")
    lines += [f"  {e}" for e in s.errors[:10]]
    lines.append(f"cpu cores {os.cpu_count()}, max_tokens {args.max_tokens}, stream {args.stream}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
