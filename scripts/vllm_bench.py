"""Decode throughput of vLLM on a Llama-2-7B-shaped model: BF16 against bitbybit at chosen precisions.

A 7B checkpoint cannot travel to the GPU machine, so both sides use vLLM's ``--load-format dummy``
(random weights) on a config.json of Llama-2-7B's shape; the bitbybit side adds a
``quantization_config`` (default precisions, no split channels), so vLLM builds the bitbybit
layers, fills the checkpoint tensors with dummy values (the codes stay arbitrary bytes, the FP8 scales
small random values: speed does not depend on them) and packs them at ``--bits``. Prompts are
``--input-len`` random token ids (no tokenizer); every request generates ``--output-len`` tokens
(EOS ignored, greedy). Each configuration runs in its own process, through ``vllm.LLM`` with the
precision chosen by ``BITBYBIT_BITS`` (the documented non-CLI route). Each batch size is timed on the
second of two identical ``generate`` calls, so the timed one runs on compiled kernels only.

    python scripts/vllm_bench.py --quant bf16,w2,w4 --batches 1,32 --out docs/results/vllm-h200.json [--enforce-eager]

Records: ``{"model", "quant", "batch", "tok_per_s", "weights_gib", ...}``; ``weights_gib`` is vLLM's own
"Model loading took X GiB" for the rank-0 worker.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kernels.checkpoint import QuantConfig

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
MODEL_NAME = "llama-2-7b-shape (dummy weights)"
LOADING = re.compile(r"Model loading took ([\d.]+) GiB")


def write_model_dir(root: Path, quantized: bool) -> Path:
    """config.json of Llama-2-7B's shape, with a bitbybit quantization_config when ``quantized``."""
    out = root / ("bitbybit" if quantized else "bf16")
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(LLAMA2_7B)
    if quantized:
        cfg["quantization_config"] = QuantConfig().to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def worker(args: argparse.Namespace) -> None:
    """One configuration in this process: build vllm.LLM, then per batch size one untimed and one timed generate
    call; print RESULT lines."""
    import random

    from vllm import LLM, SamplingParams

    batches = [int(b) for b in args.batches.split(",")]
    llm = LLM(model=args.model, skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
              max_model_len=args.input_len + args.output_len + 16, max_num_seqs=max(batches),
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=0)
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(args.input_len)]}
               for _ in range(max(batches))]
    greedy = {"temperature": 0.0, "ignore_eos": True, "detokenize": False}
    params = SamplingParams(max_tokens=args.output_len, **greedy)
    for batch in batches:
        # an identical untimed call first: any Triton kernel still compiling (a shape or configuration the
        # engine's warm-up missed) compiles here, not inside the timed window
        llm.generate(prompts[:batch], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts[:batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print("RESULT " + json.dumps({"batch": batch, "tokens": tokens, "seconds": round(elapsed, 3),
                                      "tok_per_s": round(tokens / elapsed, 1)}), flush=True)


def run_config(quant: str, model_root: Path, args: argparse.Namespace, log_dir: Path) -> list[dict]:
    """Run one configuration (``bf16`` or ``wB``) in a fresh process; its records."""
    bits = None if quant == "bf16" else int(quant.removeprefix("w"))
    model = write_model_dir(model_root, quantized=bits is not None)
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": os.environ.get("VLLM_USE_FLASHINFER_SAMPLER", "0")}
    env.pop("BITBYBIT_BITS", None)
    if bits is not None:
        env["BITBYBIT_BITS"] = str(bits)
    cmd = [sys.executable, __file__, "--worker", "--model", str(model), "--batches", args.batches,
           "--input-len", str(args.input_len), "--output-len", str(args.output_len),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)] + (["--enforce-eager"] * args.enforce_eager)
    print(f"[bench] {quant}: {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = proc.stdout + proc.stderr
    (log_dir / f"vllm-bench-{quant}.log").write_text(log)
    if proc.returncode:
        raise RuntimeError(f"{quant}: worker failed with code {proc.returncode}:\n" + "\n".join(log.splitlines()[-40:]))
    loading = LOADING.search(log)
    label = "bf16" if bits is None else f"bitbybit-w{bits}a16"
    records = []
    for line in log.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line.removeprefix("RESULT "))
            records.append({"model": MODEL_NAME, "quant": label, "batch": r["batch"], "tok_per_s": r["tok_per_s"],
                            "weights_gib": float(loading.group(1)) if loading else None,
                            "input_len": args.input_len, "output_len": args.output_len,
                            "enforce_eager": args.enforce_eager})
            print(f"[bench] {label} batch {r['batch']}: {r['tok_per_s']} tok/s", flush=True)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python scripts/vllm_bench.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode throughput of vLLM on a Llama-2-7B-shaped model with dummy weights: BF16 against\n"
                    "bitbybit at chosen precisions, each configuration in its own process (CUDA GPU). Writes JSON\n"
                    "records {model, quant, batch, tok_per_s, weights_gib, ...} to --out and each worker's log\n"
                    "(vllm-bench-<quant>.log) beside it.",
        epilog="example:\n"
               "  python scripts/vllm_bench.py --quant bf16,w2,w4 --batches 1,32 --out docs/results/vllm-h200.json\n")
    ap.add_argument("--quant", default="bf16,w2,w4", metavar="Q,...",
                    help="comma-separated: bf16 and/or wB (bitbybit at B bits, W{B}A16) (default %(default)s)")
    ap.add_argument("--batches", default="1,32", metavar="N,...",
                    help="concurrent requests per timed generate call, comma-separated (default %(default)s)")
    ap.add_argument("--input-len", type=int, default=32, metavar="TOKENS",
                    help="random prompt tokens per request (default %(default)s)")
    ap.add_argument("--output-len", type=int, default=256, metavar="TOKENS",
                    help="tokens generated per request, greedy, EOS ignored (default %(default)s)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85, metavar="F",
                    help="vLLM's GPU memory fraction, 0..1 (default %(default)s)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / torch.compile (label results!)")
    ap.add_argument("--timeout", type=float, default=1800, metavar="S",
                    help="seconds per configuration before its worker is killed (default %(default)g)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs")) / "vllm-bench.json",
                    metavar="FILE", help="JSON records to write (default: $OUT/vllm-bench.json, runs/ without $OUT)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    import vllm

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        records = [r for q in args.quant.split(",") for r in run_config(q, Path(tmp), args, args.out.parent)]
    meta = {"vllm": vllm.__version__, "gpu": torch.cuda.get_device_name(0), "command": " ".join(sys.argv)}
    args.out.write_text(json.dumps([{**r, **meta} for r in records], indent=2) + "\n")
    print(f"[bench] wrote {args.out}")


if __name__ == "__main__":
    main()
