"""The CPU fallback: load the checkpoint with the kernels' reference ops and run the API with uvicorn."""

from __future__ import annotations

import logging

import torch
import uvicorn
from fastapi import FastAPI

from kernels.checkpoint import read_quant_config
from kernels.qmodel import load_quantized

from .app import create_app
from .engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_TIMEOUT_S, Engine

log = logging.getLogger("serve")


def build_app(ckpt: str, bits: int, act_bits: int | None, served_model_name: str, api_key: str | None,
              max_queue: int = DEFAULT_MAX_QUEUE, timeout: float = DEFAULT_TIMEOUT_S,
              max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """Load ``ckpt`` at W{bits}A{act_bits} (``act_bits`` None: the checkpoint's) and wrap it in the OpenAI-compatible app."""
    if act_bits is None:
        act_bits = read_quant_config(ckpt).act_bits
    model, tokenizer, qconfig = load_quantized(ckpt, bits=bits, act_bits=act_bits, device="cpu", dtype=torch.float32)
    log.info("loaded %s at W%dA%d (trained precisions %s), context %d tokens", ckpt, bits, act_bits,
             sorted(qconfig.trained_bits), model.config.max_position_embeddings)
    engine = Engine(model, tokenizer, max_queue=max_queue, timeout=timeout, max_batch=max_batch)
    return create_app(engine, served_model_name, api_key)


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C or SIGTERM), then stop the generation worker."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
