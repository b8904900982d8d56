"""Where vLLM's decode time goes: a PyTorch-profiler table of one ``generate`` call on the Llama-2-7B-shaped
model of ``scripts/vllm_bench.py`` (dummy weights), with the engine in this process so the profiler sees
every CUDA kernel (CUDA-graph replays included).

It builds ``vllm.LLM`` like the benchmark's worker, runs ``generate`` once untimed and once timed (tok/s),
then profiles a third, shorter call (``--profile-tokens``) and writes the profiler's table of CUDA kernels
by total device time. ``--h2-small-m`` first adds table entries that run the half2 GEMV for 1..4 tokens
on the model's four linear shapes (the rule of branch ``h2-small-m-rule``), so the two runs differ only
in that choice.

GPU, vLLM staged: ``python3 scripts/vllm_profile.py --quant w2 --batch 32 [--h2-small-m] --out $OUT/prof.txt``
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import triton_ops  # noqa: E402
from kernels.triton_ops import Config, gemv_split, table_key  # noqa: E402
from scripts.vllm_bench import LLAMA2_7B, write_model_dir  # noqa: E402


def llama_shapes() -> list[tuple[int, int]]:
    """``(K, N)`` of the fused linear layers vLLM builds for the benchmark model (qkv, o, gate_up, down)."""
    h, f = LLAMA2_7B["hidden_size"], LLAMA2_7B["intermediate_size"]
    qkv = (LLAMA2_7B["num_attention_heads"] + 2 * LLAMA2_7B["num_key_value_heads"]) * LLAMA2_7B["head_dim"]
    return [(h, qkv), (h, h), (h, 2 * f), (f, h)]


def add_h2_small_m_entries(bits: int) -> None:
    """Table entries for the half2 GEMV at 1, 2 and 3..4 tokens on :func:`llama_shapes` (branch h2-small-m-rule)."""
    for kq, n in llama_shapes():
        for m, (bm, bn, bg, warps) in ((1, (1, 256, 2, 2)), (2, (2, 512, 1, 4)), (4, (4, 512, 1, 4))):
            triton_ops.TABLE[table_key(bits, kq, n, m)] = Config(
                "gemv_h2", bm, bn, bg, split_k=gemv_split(n, kq, bn, bg), num_warps=warps)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/vllm_profile.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="w2", help="bf16 or wB (default %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="concurrent requests (default %(default)s)")
    ap.add_argument("--input-len", type=int, default=32, help="prompt tokens (default %(default)s)")
    ap.add_argument("--output-len", type=int, default=256, help="tokens per request, timed call (default %(default)s)")
    ap.add_argument("--profile-tokens", type=int, default=32, help="tokens per request, profiled call (default %(default)s)")
    ap.add_argument("--h2-small-m", action="store_true", help="half2 GEMV entries for 1..4 tokens (see above)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the kernel table (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="text file for the results")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the profiler sees its kernels
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    bits = None if args.quant == "bf16" else int(args.quant.removeprefix("w"))
    if bits is not None:
        os.environ["BITBYBIT_BITS"] = str(bits)
        if args.h2_small_m:
            add_h2_small_m_entries(bits)
    import torch
    from vllm import LLM, SamplingParams

    lines = [f"{args.quant} batch {args.batch} h2_small_m={args.h2_small_m}"]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model_dir(Path(tmp), quantized=bits is not None)
        llm = LLM(model=str(model), skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
                  max_model_len=args.input_len + args.output_len + 16, max_num_seqs=args.batch,
                  gpu_memory_utilization=0.85, seed=0)
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(args.input_len)]}
                   for _ in range(args.batch)]
        greedy = {"temperature": 0.0, "ignore_eos": True, "detokenize": False}
        params = SamplingParams(max_tokens=args.output_len, **greedy)
        llm.generate(prompts, params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        lines.append(f"timed: {tokens} tokens in {elapsed:.3f} s = {tokens / elapsed:.1f} tok/s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, SamplingParams(max_tokens=args.profile_tokens, **greedy), use_tqdm=False)
        lines.append(f"profiled: {args.batch} x {args.profile_tokens} tokens")
        lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                               max_name_column_width=70))
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
