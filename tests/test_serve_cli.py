"""``python -m serve``: backend choice, the vLLM command line (built and checked on the CPU), the CPU process."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve import cli
from serve.vllm_launch import vllm_command

REPO = Path(__file__).resolve().parents[1]


def test_vllm_command_line() -> None:
    cmd = vllm_command("/ckpt", 2)
    assert cmd == [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", "/ckpt",
                   "--quantization", "bitbybit", "--bits", "2"]
    cmd = vllm_command("/ckpt", 4, act_bits=2, host="127.0.0.1", port=8011, api_key="k", served_model_name="m",
                       extra=["--max-model-len", "512", "--enforce-eager"])
    assert cmd[4:] == ["/ckpt", "--quantization", "bitbybit", "--bits", "4", "--act-bits", "2", "--host", "127.0.0.1",
                       "--port", "8011", "--api-key", "k", "--served-model-name", "m", "--max-model-len", "512",
                       "--enforce-eager"]
    for flag in (["--quantization", "awq"], ["--quantization=awq"], ["-q", "awq"]):
        with pytest.raises(ValueError, match="bitbybit"):
            vllm_command("/ckpt", 2, extra=flag)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_real_vllm_with_the_plugin_accepts_the_command_line(vllm_cpu, stories_rtn_ckpt, monkeypatch) -> None:
    """The argv after ``vllm.entrypoints.cli.main`` goes through vLLM's own ``serve`` parser, plugin flags included."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from bitbybit_vllm.config import ACT_BITS_ENV, BITS_ENV

    monkeypatch.setenv(BITS_ENV, "")
    monkeypatch.setenv(ACT_BITS_ENV, "")
    cmd = vllm_command(str(stories_rtn_ckpt), 3, act_bits=8, port=8011, api_key="k", served_model_name="stories",
                       extra=["--max-model-len", "256", "--enforce-eager"])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.cli.main"] and importlib.util.find_spec(cmd[2]) is not None
    parser = FlexibleArgumentParser()
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(cmd[3:])
    assert (args.model_tag, args.quantization, args.bits, args.act_bits) == (str(stories_rtn_ckpt), "bitbybit", 3, 8)
    assert (args.port, args.api_key, args.served_model_name) == (8011, ["k"], ["stories"])
    assert (args.max_model_len, args.enforce_eager) == (256, True)


def test_backend_choice(monkeypatch) -> None:
    monkeypatch.setattr(cli, "vllm_usable", lambda: (False, "vLLM is not installed"))
    assert cli.choose_backend("auto") == ("cpu", "vLLM is not installed")
    assert cli.choose_backend("cpu")[0] == "cpu"
    with pytest.raises(ValueError, match="not installed"):
        cli.choose_backend("vllm")
    monkeypatch.setattr(cli, "vllm_usable", lambda: (True, "vLLM and a CUDA GPU found"))
    assert cli.choose_backend("auto")[0] == "vllm"
    assert cli.choose_backend("cpu")[0] == "cpu"


def test_main_execs_vllm_with_the_chosen_precision(monkeypatch, stories_rtn_ckpt, caplog) -> None:
    """The whole CLI on the vLLM path, with exec captured instead of run."""
    caplog.set_level("INFO", logger="serve")
    monkeypatch.setattr(cli, "vllm_usable", lambda: (True, "vLLM and a CUDA GPU found"))
    calls = []
    monkeypatch.setattr(cli.os, "execv", lambda path, argv: calls.append(argv))
    monkeypatch.setattr(cli, "_serve_cpu", lambda *a: pytest.fail("fell back to the CPU server"))
    cli.main([str(stories_rtn_ckpt), "--bits", "3", "--port", "9000", "--api-key", "secret",
              "--max-model-len", "256", "--gpu-memory-utilization", "0.5"])
    assert calls == [[sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(stories_rtn_ckpt),
                      "--quantization", "bitbybit", "--bits", "3", "--port", "9000", "--api-key", "secret",
                      "--max-model-len", "256", "--gpu-memory-utilization", "0.5"]]
    assert "serving with vLLM" in caplog.records[0].getMessage()
    assert "secret" not in caplog.text
    calls.clear()
    cli.main([str(stories_rtn_ckpt)])
    assert calls[0][-2:] == ["--bits", "2"]  # the checkpoint's default precision


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "--bits", "9"], "bits"),
    (["{ckpt}", "--act-bits", "0"], "bits"),
    (["{ckpt}", "--max-queue", "0"], "--max-queue"),
    (["{ckpt}", "--timeout", "-1"], "--timeout"),
    (["{ckpt}", "--max-batch", "0"], "--max-batch"),
    (["/no/such/checkpoint"], "not found"),
])
def test_bad_command_lines_exit_with_a_message(stories_rtn_ckpt, capsys, args, message) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(ckpt=stories_rtn_ckpt) for a in args] + ["--backend", "cpu"])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_compact_checkpoint_serves_at_its_stored_bits(stories_rtn_w2_ckpt, monkeypatch, capsys) -> None:
    """A ``--export-bits 2`` checkpoint: the CPU server loads it at W2 by default; ``--bits 4`` exits naming W2."""
    served = []
    monkeypatch.setattr(cli, "_serve_cpu", lambda args, bits, *rest: served.append(bits))
    cli.main([str(stories_rtn_w2_ckpt), "--backend", "cpu"])
    assert served == [2]
    with pytest.raises(SystemExit) as e:
        cli.main([str(stories_rtn_w2_ckpt), "--bits", "4", "--backend", "cpu"])
    assert e.value.code == 2 and "compact 2-bit export" in capsys.readouterr().err


async def concurrent_statuses(url: str, n: int) -> list[int]:
    """Send ``n`` long completions at once; their HTTP statuses."""
    body = {"model": "s", "prompt": "Once upon a time", "max_tokens": 100, "temperature": 0}
    async with httpx.AsyncClient(timeout=60) as c:
        replies = await asyncio.gather(*(c.post(f"{url}/v1/completions", json=body) for _ in range(n)))
    return [r.status_code for r in replies]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_serve_runs_the_cpu_fallback(stories_rtn_ckpt) -> None:
    """The real process: CPU fallback named in the first log line, answers, a small --max-queue gives 503s."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve", str(stories_rtn_ckpt), "--bits", "4", "--port", str(port),
                             "--threads", "1", "--served-model-name", "s", "--max-queue", "1", "--max-batch", "1",
                             "--enforce-eager"],
                            cwd=REPO, stderr=subprocess.PIPE, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        first = proc.stderr.readline()
        assert "CPU fallback" in first, first
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                       json={"model": "s", "prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        statuses = asyncio.run(concurrent_statuses(f"http://127.0.0.1:{port}", 6))
        assert 1 <= statuses.count(200) <= 2 and statuses.count(503) == 6 - statuses.count(200), statuses
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    assert "ignoring flags the CPU server does not use (vLLM flags): --enforce-eager" in rest
    assert "W4A16" in rest
