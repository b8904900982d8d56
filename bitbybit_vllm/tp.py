"""Which tensor-parallel sizes a bitbybit checkpoint supports in vLLM.

    python -m bitbybit_vllm.tp CKPT

A size T must satisfy vLLM's own Llama sharding (attention heads, KV heads divided or replicated,
intermediate size) and, for every quantized row-parallel layer (o_proj, down_proj), keep groups
and split segments whole per rank (:func:`kernels.shard.row_shard_problem`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kernels.checkpoint import read_quant_config
from kernels.shard import MAX_TP_SIZE, row_shard_problem


def tp_problem(ckpt_dir: str | Path, tp_size: int) -> str | None:
    """Why ``ckpt_dir`` cannot run at ``tp_size`` in vLLM, or None if it can."""
    cfg = json.loads((Path(ckpt_dir) / "config.json").read_text())
    qc = read_quant_config(ckpt_dir)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if heads % tp_size:
        return f"{heads} attention heads do not divide into {tp_size}"
    if kv % tp_size and tp_size % kv:
        return f"{kv} KV heads neither divide into nor replicate over {tp_size}"
    if cfg["intermediate_size"] % tp_size:
        return f"intermediate_size {cfg['intermediate_size']} does not divide into {tp_size}"
    for i in range(cfg["num_hidden_layers"]):
        for module, k in (("self_attn.o_proj", heads * head_dim), ("mlp.down_proj", cfg["intermediate_size"])):
            name = f"model.layers.{i}.{module}"
            if not qc.is_quantized(name):
                continue
            index = qc.split_index(name)
            slots = 0 if index is None else index.numel()
            problem = row_shard_problem(k, slots, qc.split_segments(name), qc.group_size, tp_size)
            if problem is not None:
                return f"{name}: {problem}"
    return None


def supported_tp_sizes(ckpt_dir: str | Path, limit: int = MAX_TP_SIZE) -> list[int]:
    """Every tensor-parallel size up to ``limit`` that vLLM can serve ``ckpt_dir`` at."""
    return [t for t in range(1, limit + 1) if tp_problem(ckpt_dir, t) is None]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bitbybit_vllm.tp", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the tensor-parallel sizes (1..%d) at which vLLM can serve a bitbybit checkpoint, and why\n"
                    "2, 4 or 8 cannot: vLLM's Llama sharding (attention/KV heads, intermediate size) and, per\n"
                    "row-parallel layer (o_proj, down_proj), whole quantization groups and split segments per rank.\n"
                    "Reads config.json only; no GPU needed." % MAX_TP_SIZE,
        epilog="example:\n"
               "  python -m bitbybit_vllm.tp CKPT    # e.g. 'CKPT: tensor-parallel sizes [1, 2, 4]'\n"
               "A checkpoint with split channels serves at T only if T divides its segments\n"
               "(python -m qat.run ... --split-segments 4).\n")
    ap.add_argument("ckpt", metavar="CKPT", help="bitbybit checkpoint directory (written by python -m qat.run)")
    ckpt = ap.parse_args(sys.argv[1:] if argv is None else argv).ckpt
    sizes = supported_tp_sizes(ckpt)
    print(f"{ckpt}: tensor-parallel sizes {sizes}")
    for t in (2, 4, 8):
        if t not in sizes:
            print(f"  {t}: {tp_problem(ckpt, t)}")


if __name__ == "__main__":
    main()
