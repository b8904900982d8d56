"""Perplexity of a bitbybit checkpoint at several precisions, beside the full-precision model.

    python -m qat.eval CKPT --bits 8,4,3,2 [--act-bits 2] --data FILE [--data-part heldout]

The text becomes one stream (BOS + tokens) cut into windows of ``--ctx`` tokens that start every
``--stride`` tokens; each window is scored on its own, only the tokens no earlier window scored
count (with stride = ctx, the default: non-overlapping windows, every position after a window's
first predicted from the window's prefix; the last, shorter window included). Quantized rows use
:func:`kernels.qmodel.load_quantized`, i.e. the kernels' reference ops (the serving numerics);
the FP row is the source model the checkpoint records (``--fp`` to override).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from kernels.checkpoint import read_quant_config
from kernels.qmodel import load_quantized, set_act_bits

from .data import DATA_PARTS, read_text, text_part, token_stream
from .export import RUN_INFO_FILE


@dataclass
class PplResult:
    ppl: float
    tokens: int


@dataclass
class EvalSettings:
    data: str
    data_part: str = "all"
    heldout_fraction: float = 0.1
    ctx: int = 1024
    stride: int | None = None
    max_tokens: int | None = None
    device: str = "cpu"


@dataclass
class EvalTable:
    checkpoint: str
    method: str
    settings: EvalSettings
    tokens_scored: int = 0
    rows: list[dict] = field(default_factory=list)
    command: str = ""
    seconds: float = 0.0


def perplexity(model: PreTrainedModel, ids: torch.Tensor, ctx: int, stride: int, desc: str = "ppl") -> PplResult:
    """Perplexity of a 1-D id stream with windows of ``ctx`` tokens every ``stride`` tokens."""
    if stride > ctx or stride < 1:
        raise ValueError(f"stride must be in 1..ctx ({ctx}), got {stride}")
    device = next(model.parameters()).device
    windows = []  # (start, end, first scored position inside the window)
    scored_to = 0
    for start in range(0, max(ids.numel() - 1, 1), stride):
        end = min(start + ctx, ids.numel())
        first = max(scored_to - start, 1)
        if end - start >= 2 and first < end - start:
            windows.append((start, end, first))
        scored_to = end
        if end == ids.numel():
            break
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in tqdm(windows, desc=desc, leave=False, dynamic_ncols=True):
            x = ids[start:end].unsqueeze(0).to(device)
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            token_nll = -torch.log_softmax(logits, -1).gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)
            nll += token_nll[first - 1:].double().sum().item()
            count += token_nll.numel() - (first - 1)
    return PplResult(math.exp(nll / count), count)


def eval_stream(settings: EvalSettings, tokenizer) -> torch.Tensor:
    text = text_part(read_text(settings.data), settings.data_part, settings.heldout_fraction)
    ids = token_stream(tokenizer, text)
    if settings.max_tokens:
        ids = ids[: settings.max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"{settings.data} ({settings.data_part}) has fewer than 2 tokens to score")
    return ids


def run_info(ckpt: str | Path) -> dict:
    path = Path(ckpt) / RUN_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate(ckpt: str | Path, bits: list[int], act_bits: int | None, settings: EvalSettings,
             fp_model: str | None = None, with_fp: bool = True) -> EvalTable:
    """The perplexity table: FP (if available) and W{b}A16 (and W{b}A{act_bits}) for every b."""
    start = time.perf_counter()
    info = run_info(ckpt)
    table = EvalTable(str(ckpt), info.get("method", "bitbybit"), settings)
    stride = settings.stride or settings.ctx
    ids = None
    for b in bits:
        model, tokenizer, _ = load_quantized(ckpt, bits=b, device=settings.device)
        if ids is None:
            ids = eval_stream(settings, tokenizer)
        for a in [16] + ([act_bits] if act_bits and act_bits < 16 else []):
            set_act_bits(model, a)
            r = perplexity(model, ids, settings.ctx, stride, desc=f"W{b}A{a}")
            table.rows.append({"method": table.method, "w_bits": b, "a_bits": a, "ppl": r.ppl})
            table.tokens_scored = r.tokens
            print(f"  W{b}A{a}: ppl {r.ppl:.4f} over {r.tokens} tokens", file=sys.stderr)
        del model
    fp_model = fp_model or info.get("source_model")
    if with_fp and fp_model:
        if not Path(fp_model).exists():
            print(f"  FP model {fp_model} not found; skipping the FP row (pass --fp DIR)", file=sys.stderr)
        else:
            model = AutoModelForCausalLM.from_pretrained(fp_model, dtype=torch.float32).to(settings.device).eval()
            r = perplexity(model, ids, settings.ctx, stride, desc="FP")
            table.rows.insert(0, {"method": "fp", "w_bits": 16, "a_bits": 16, "ppl": r.ppl})
    table.seconds = time.perf_counter() - start
    return table


def to_markdown(table: EvalTable) -> str:
    s = table.settings
    stride = s.stride or s.ctx
    lines = [
        f"Perplexity of `{table.checkpoint}` on `{s.data}` (part: {s.data_part}"
        + (f", held-out fraction {s.heldout_fraction}" if s.data_part != "all" else "") + ")",
        f"context {s.ctx} tokens, stride {stride}"
        + (" (non-overlapping windows)" if stride == s.ctx else "") + f", {table.tokens_scored} tokens scored",
        "",
        "| method | weights | activations | PPL |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in table.rows:
        lines.append(f"| {r['method']} | {r['w_bits']} | {r['a_bits']} | {r['ppl']:.4f} |")
    if table.command:
        lines += ["", f"command: `{table.command}`"]
    return "\n".join(lines) + "\n"


def save_table(table: EvalTable, out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"ppl-{Path(table.settings.data).stem}-{table.settings.data_part}"
    js, md = out / f"{stem}.json", out / f"{stem}.md"
    payload = {"checkpoint": table.checkpoint, "method": table.method, "data": table.settings.data,
               "data_part": table.settings.data_part, "heldout_fraction": table.settings.heldout_fraction,
               "ctx": table.settings.ctx, "stride": table.settings.stride or table.settings.ctx,
               "tokens_scored": table.tokens_scored, "rows": table.rows, "command": table.command,
               "seconds": table.seconds}
    js.write_text(json.dumps(payload, indent=2) + "\n")
    md.write_text(to_markdown(table))
    return js, md


def parse_bits(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid bits list {text!r}: use comma-separated integers, e.g. 8,4,3,2") from None
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"invalid bits list {text!r}: every precision must be in 1..8")
    return bits


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m qat.eval", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Perplexity of a bitbybit checkpoint at several precisions, beside the full-precision model.\n"
                    "Quantized rows run the kernels' reference ops (the serving numerics); the text is one token\n"
                    "stream scored in windows of --ctx tokens every --stride tokens, each token counted once.",
        epilog="Writes ppl-<data stem>-<part>.json and .md under --out and prints the markdown table.\n\n"
               "examples:\n"
               "  python -m qat.eval CKPT --data calib.txt --data-part heldout   # the tail qat.run never trained on\n"
               "  python -m qat.eval CKPT --bits 2 --act-bits 2 --data heldout.txt --ctx 1024 --device cuda\n")
    ap.add_argument("checkpoint", metavar="CKPT", help="bitbybit checkpoint directory (written by python -m qat.run)")
    ap.add_argument("--bits", type=parse_bits, default=None, metavar="B,B,...",
                    help="weight precisions to score, comma-separated, each in 1..8 (default: the checkpoint's "
                         "trained set)")
    ap.add_argument("--act-bits", type=int, default=None, metavar="A",
                    help="also score W{b}A{A} for every b, activations quantized per token at A bits (1..8) "
                         "(default: A16 rows only)")
    ap.add_argument("--data", required=True, metavar="FILE", help="UTF-8 plain-text file to score (required)")
    ap.add_argument("--data-part", choices=DATA_PARTS, default="all",
                    help="part of --data to score: all, train (the head) or heldout (the tail qat.run never "
                         "trains on, same --heldout-fraction) (default %(default)s)")
    ap.add_argument("--heldout-fraction", type=float, default=0.1, metavar="F",
                    help="size of the held-out tail as a fraction of the text, cut at a paragraph break; use the "
                         "run's value (default %(default)s)")
    ap.add_argument("--ctx", type=int, default=None, metavar="TOKENS",
                    help="window length (default: the model's max positions, at most 1024)")
    ap.add_argument("--stride", type=int, default=None, metavar="TOKENS",
                    help="spacing of window starts, 1..ctx (default: --ctx, non-overlapping windows)")
    ap.add_argument("--max-tokens", type=int, default=None, metavar="N",
                    help="score only the first N tokens of the stream (default: all)")
    ap.add_argument("--fp", default=None, metavar="MODEL",
                    help="full-precision model directory for the FP row (default: the source model the "
                         "checkpoint records; the row is skipped if it is not found)")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP row")
    ap.add_argument("--device", default="cpu", metavar="DEV",
                    help="torch device, e.g. cpu or cuda (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, metavar="N",
                    help="CPU threads for torch (default: torch's choice; tiny models run fastest with 1)")
    ap.add_argument("--out", default=None, metavar="DIR", help="directory for the JSON + markdown (default: CKPT/eval)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        qc = read_quant_config(args.checkpoint)
        bits = args.bits or sorted(qc.trained_bits, reverse=True)
        ctx = args.ctx or min(1024, json.loads((Path(args.checkpoint) / "config.json").read_text())
                              .get("max_position_embeddings", 1024))
        settings = EvalSettings(args.data, args.data_part, args.heldout_fraction, ctx, args.stride, args.max_tokens,
                                args.device)
        table = evaluate(args.checkpoint, bits, args.act_bits, settings, args.fp, not args.no_fp)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    table.command = "python -m qat.eval " + shlex.join(sys.argv[1:] if argv is None else argv)
    js, md = save_table(table, args.out or Path(args.checkpoint) / "eval")
    print(to_markdown(table))
    print(f"saved {js} and {md}")


if __name__ == "__main__":
    main()
