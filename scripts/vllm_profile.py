"""Where vLLM's decode time goes: a PyTorch-profiler table of one ``generate`` call on the Llama-2-7B-shaped
model of ``scripts/vllm_bench.py`` (dummy weights), with the engine in this process so the profiler sees
every CUDA kernel (CUDA-graph replays included).

It builds ``vllm.LLM`` like the benchmark's worker, runs ``generate`` once untimed and once timed (tok/s),
then profiles a third, shorter call (``--profile-tokens``) and writes the profiler's table of CUDA kernels
by total device time. ``--before 1`` first runs a generate call at batch 1 (as ``vllm_bench.py`` does before
batch 32).

GPU, vLLM staged: ``python3 scripts/vllm_profile.py --quant w2 --batch 32 --out $OUT/prof.txt``
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

from scripts.vllm_bench import write_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(prog="python3 scripts/vllm_profile.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quant", default="w2", help="bf16 or wB (default %(default)s)")
    ap.add_argument("--batch", type=int, default=32, help="concurrent requests (default %(default)s)")
    ap.add_argument("--input-len", type=int, default=32, help="prompt tokens (default %(default)s)")
    ap.add_argument("--output-len", type=int, default=256, help="tokens per request, timed call (default %(default)s)")
    ap.add_argument("--profile-tokens", type=int, default=32, help="tokens per request, profiled call (default %(default)s)")
    ap.add_argument("--before", type=lambda t: [int(b) for b in t.split(",")], default=[], metavar="N,...",
                    help="batch sizes to run one generate call each at first, comma-separated (default: none)")
    ap.add_argument("--rows", type=int, default=25, help="rows of the kernel table (default %(default)s)")
    ap.add_argument("--out", type=Path, required=True, help="text file for the results")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the profiler sees its kernels
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    bits = None if args.quant == "bf16" else int(args.quant.removeprefix("w"))
    if bits is not None:
        os.environ["BITBYBIT_BITS"] = str(bits)
    import torch
    from vllm import LLM, SamplingParams

    most = max([args.batch, *args.before])
    lines = [f"{args.quant} batch {args.batch} (before it: {args.before or 'nothing'})"]
    with tempfile.TemporaryDirectory() as tmp:
        model = write_model_dir(Path(tmp), quantized=bits is not None)
        llm = LLM(model=str(model), skip_tokenizer_init=True, load_format="dummy", dtype="bfloat16",
                  max_model_len=args.input_len + args.output_len + 16, max_num_seqs=most,
                  gpu_memory_utilization=0.85, seed=0)
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(3, 32000) for _ in range(args.input_len)]}
                   for _ in range(most)]
        greedy = {"temperature": 0.0, "ignore_eos": True, "detokenize": False}
        params = SamplingParams(max_tokens=args.output_len, **greedy)
        for b in args.before:
            llm.generate(prompts[:b], params, use_tqdm=False)
        llm.generate(prompts[:args.batch], params, use_tqdm=False)
        start = time.perf_counter()
        outs = llm.generate(prompts[:args.batch], params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        lines.append(f"timed: {tokens} tokens in {elapsed:.3f} s = {tokens / elapsed:.1f} tok/s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts[:args.batch], SamplingParams(max_tokens=args.profile_tokens, **greedy), use_tqdm=False)
        lines.append(f"profiled: {args.batch} x {args.profile_tokens} tokens")
        lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows,
                                               max_name_column_width=70))
    text = "\n".join(lines)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
