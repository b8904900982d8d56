"""Tell a 16-bit run of ``scripts/vllm_e2e.py`` apart from a kernel error: compare both of its sides with float32.

A ``--dtype bfloat16`` e2e record holds, per precision and prompt, the greedy tokens of the project's reference
(:func:`kernels.qmodel.load_quantized` on the GPU, in bf16: the Triton kernels) and of vLLM, and both sides'
held-out perplexities. This recomputes the same prompts and windows with the reference in float32 on the CPU
(the plain-torch reference ops, no Triton) and reports how many prompts each bf16 side keeps identical to float32
for all of the record's tokens, and the float32 perplexity next to the record's two. Where the bf16 reference
diverges from float32 as often as vLLM does and the perplexities agree, the divergences are bf16 rounding.

    python scripts/e2e_float32_check.py --record docs/results/vllm-e2e-bf16-h200.json --ckpt CKPT \\
        --heldout ../shared/data/gutenberg-sample/heldout.txt --out float32-check.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vllm_e2e import first_divergence, greedy_tokens, heldout_windows, reference_model, window_nll  # noqa: E402

from kernels.qmodel import load_tokenizer  # noqa: E402


def check_precision(ckpt: str, result: dict, heldout: Path, tokens: int) -> dict:
    """Float32 greedy tokens and perplexity at one precision of the record, against both of its sides."""
    if (result.get("act_bits") or 16) < 16:
        raise ValueError("quantized activations: compare perplexities only (docs/VLLM.md)")
    tokenizer = load_tokenizer(ckpt)
    model = reference_model(ckpt, result["bits"], None, torch.float32, "cpu")
    prompts = result["prompts"]
    fp32 = greedy_tokens(model, [tokenizer(p["prompt"]).input_ids for p in prompts], tokens)
    ppl = result["perplexity"]
    windows = heldout_windows(tokenizer, heldout, ppl["windows"], ppl["ctx"])
    nll = window_nll(model, windows)
    rows = [{"reference_vs_float32": first_divergence(p["reference"], want), "vllm_vs_float32":
             first_divergence(p["vllm"], want), "vllm_vs_reference": p["first_divergence"]}
            for p, want in zip(prompts, fp32, strict=True)]
    return {"bits": result["bits"], "prompts": rows,
            "identical": {key: sum(r[key] is None for r in rows) for key in rows[0]},
            "perplexity": {"float32_cpu": math.exp(sum(nll) / ppl["tokens"]), "reference": ppl["reference"],
                           "vllm": ppl["vllm"]}}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python scripts/e2e_float32_check.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--record", type=Path, required=True, help="JSON written by scripts/vllm_e2e.py")
    ap.add_argument("--ckpt", required=True, help="the checkpoint the record was made on (a local copy)")
    ap.add_argument("--heldout", type=Path, required=True, help="the held-out text the record scored")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record = json.loads(args.record.read_text())
    results = []
    for result in record["results"]:
        res = check_precision(args.ckpt, result, args.heldout, record["tokens"])
        results.append(res)
        print(f"W{res['bits']}A16: identical to float32 for {record['tokens']} tokens: bf16 reference "
              f"{res['identical']['reference_vs_float32']}/16, vLLM {res['identical']['vllm_vs_float32']}/16 "
              f"(vLLM vs bf16 reference {res['identical']['vllm_vs_reference']}/16); perplexity float32 "
              f"{res['perplexity']['float32_cpu']:.3f}, bf16 reference {res['perplexity']['reference']:.3f}, "
              f"vLLM {res['perplexity']['vllm']:.3f}", flush=True)
    args.out.write_text(json.dumps({"record": str(args.record), "dtype": record["dtype"], "results": results},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
