"""How far tiny float differences move a W{b}A{a} model's outputs: why ``vllm_e2e.py`` compares perplexity there.

With quantized activations an activation code flips when its input crosses a rounding boundary, the
flip moves that activation by a whole step, and the change flips codes further on. This measures it
on the project's own reference model alone (no vLLM), against the same model:

1. float64 instead of float32: each prompt's first greedy divergence;
2. every quantized linear's input multiplied by ``1 + eps * N(0, 1)`` (float32): each prompt's first
   greedy divergence, the teacher-forced top-1 agreement on the unperturbed continuations, and the
   perplexity of ``--windows`` held-out windows (unperturbed, then ``--draws`` noise draws).

    python scripts/act_quant_sensitivity.py --ckpt CKPT [--bits 2] [--act-bits 2] [--eps 1e-5] [--out FILE]

The prompts and windows are ``vllm_e2e.py``'s (first sentences of held-out books; evenly spaced
windows of ``heldout.txt``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vllm_e2e import (HELDOUT, first_divergence, greedy_tokens, heldout_prompts, heldout_windows,  # noqa: E402
                      reference_model, window_nll)

from kernels.qmodel import QuantLinear, load_tokenizer  # noqa: E402


@contextmanager
def perturbed_inputs(model: torch.nn.Module, eps: float, seed: int) -> Iterator[None]:
    """Inside the block, every QuantLinear's input is multiplied by ``1 + eps * N(0, 1)`` (fresh noise per call)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)

    def hook(_module, args):
        x = args[0]
        return (x * (1 + eps * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)),)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_forced_top1(model: torch.nn.Module, prompt_ids: list[list[int]], continuations: list[list[int]]
                        ) -> list[list[int]]:
    """The model's argmax at each continuation position, given the prompt and the continuation so far."""
    device = next(model.parameters()).device
    out = []
    for ids, cont in zip(prompt_ids, continuations, strict=True):
        logits = model(input_ids=torch.tensor([ids + cont], device=device)).logits[0]
        out.append(logits[len(ids) - 1:-1].argmax(-1).tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example: python scripts/act_quant_sensitivity.py --ckpt runs/t56-rtn/ckpt --out s.json")
    ap.add_argument("--ckpt", required=True, help="bitbybit checkpoint directory")
    ap.add_argument("--bits", type=int, default=2, help="weight precision (default %(default)s)")
    ap.add_argument("--act-bits", type=int, default=2, help="activation precision, 16 for none (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts, at most 16 (default %(default)s)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default %(default)s)")
    ap.add_argument("--eps", type=float, default=1e-5, help="relative input noise (default %(default)s)")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows for the perplexity (default %(default)s)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window (default %(default)s)")
    ap.add_argument("--draws", type=int, default=2, help="noise draws for the perplexity (default %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    ap.add_argument("--heldout", type=Path, default=HELDOUT, help="held-out text (default: ../shared's heldout.txt)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = ap.parse_args()
    act = None if args.act_bits == 16 else args.act_bits
    tokenizer = load_tokenizer(args.ckpt)
    prompt_ids = [tokenizer(p).input_ids for p in heldout_prompts(args.heldout)[:args.prompts]]
    windows = heldout_windows(tokenizer, args.heldout, args.windows, args.ctx)
    scored = sum(len(w) - 1 for w in windows)
    name = f"W{args.bits}A{args.act_bits}"

    model = reference_model(args.ckpt, args.bits, act, torch.float32, args.device)
    base = greedy_tokens(model, prompt_ids, args.tokens)
    ppl = [math.exp(sum(window_nll(model, windows)) / scored)]
    wide = reference_model(args.ckpt, args.bits, act, torch.float64, args.device)
    f64 = [first_divergence(t, b) for t, b in zip(greedy_tokens(wide, prompt_ids, args.tokens), base)]
    del wide
    with perturbed_inputs(model, args.eps, seed=0):
        noisy = [first_divergence(t, b) for t, b in zip(greedy_tokens(model, prompt_ids, args.tokens), base)]
        top1 = teacher_forced_top1(model, prompt_ids, base)
    agree = sum(a == b for t, c in zip(top1, base) for a, b in zip(t, c)) / sum(map(len, base))
    for draw in range(args.draws):
        with perturbed_inputs(model, args.eps, seed=1 + draw):
            ppl.append(math.exp(sum(window_nll(model, windows)) / scored))

    res = {"ckpt": args.ckpt, "precision": name, "eps": args.eps, "prompts": len(prompt_ids), "tokens": args.tokens,
           "float64_first_divergence": f64, "noise_first_divergence": noisy, "noise_teacher_forced_top1": agree,
           "windows": args.windows, "ctx": args.ctx, "ppl_clean": ppl[0], "ppl_noise": ppl[1:]}
    print(f"{name}, {len(prompt_ids)} prompts x {args.tokens} tokens")
    print(f"  float64 vs float32: first divergence {f64}, identical {sum(d is None for d in f64)}")
    print(f"  input noise {args.eps:g}: first divergence {noisy}, identical {sum(d is None for d in noisy)}; "
          f"teacher-forced top-1 agreement {agree:.3f}")
    print(f"  perplexity over {args.windows} x {args.ctx} held-out tokens: {ppl[0]:.3f} clean, "
          + ", ".join(f"{p:.3f}" for p in ppl[1:]) + f" with noise {args.eps:g}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
