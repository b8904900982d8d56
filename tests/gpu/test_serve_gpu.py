"""``python -m serve`` on a CUDA GPU with vLLM: it picks vLLM, execs it with the plugin, and the API answers.

Run on the device machine with vLLM and this project installed (vLLM finds the plugin through its
entry point)::

    BITBYBIT_SERVE_CKPT=CKPT python -m pytest -m gpu tests/gpu/test_serve_gpu.py
"""

from __future__ import annotations

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
import torch

CKPT = os.environ.get("BITBYBIT_SERVE_CKPT")
REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
    pytest.mark.skipif(not CKPT, reason="set BITBYBIT_SERVE_CKPT to a bitbybit checkpoint directory"),
]


openai = pytest.importorskip("openai", reason="needs the openai client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_python_m_serve_execs_vllm_and_answers() -> None:
    port = free_port()
    log = open(Path(os.environ.get("OUT", "/tmp")) / "serve-gpu.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "serve", CKPT, "--bits", "2", "--host", "127.0.0.1", "--port",
                             str(port), "--served-model-name", "smoke", "--max-model-len", "256",
                             "--gpu-memory-utilization", "0.3", "--enforce-eager"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 480
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "the server exited; see serve-gpu.log"
            assert time.monotonic() < deadline, "vLLM did not come up within 480 s"
            time.sleep(1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["smoke"]
        r = c.completions.create(model="smoke", prompt="Once upon a time", max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8
        chat = c.chat.completions.create(model="smoke", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        assert chat.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(model="smoke", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        log.close()
    first = text.splitlines()[0]
    assert "serving with vLLM and the bitbybit plugin" in first, first
    assert "--quantization bitbybit --bits 2" in text
