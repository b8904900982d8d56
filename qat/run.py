"""``python -m qat.run``: a Llama-family model -> one nested-grid bitbybit checkpoint (+ its PPL table).

With no arguments it runs the embedded demonstration: it builds and briefly pretrains a tiny
teacher on the project's own corpus, then splits, trains, exports and evaluates it (a few minutes
on a 2-core CPU, no network). With ``--model`` it quantizes a real model:

    python -m qat.run --model DIR --calib-data FILE [--recipe recipes/X.toml] [flags]

Methods: ``bitbybit`` (progressive nested QAT, the default), ``rtn`` (round-to-nearest into the
same format, no training, no splitting unless split flags are given), ``direct``
(single-precision QAT: ``--method direct --bits 2``). Ablations: ``--no-split``, ``--no-progressive``.

Block training runs under ``torch.compile`` on CUDA (``--no-compile`` for the eager step; ``--compile``
forces it on a CPU, where it is off by default).

``--export-bits B`` writes a compact checkpoint holding only the B-bit codes (its linear weights
about B/8 of the full one's); it serves at B only. Re-running a finished run directory with it
exports the same trained weights again without retraining.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from transformers import AutoConfig

from kernels.checkpoint import QuantConfig
from kernels.grid import MASTER_BITS

from .blockwise import quantize_blocks
from .data import calibration_windows, read_text, split_text, token_stream
from .demo import DEMO_RECIPE, demo_paths, prepare_demo
from .eval import EvalSettings, evaluate, parse_bits, save_table, to_markdown
from .export import export_checkpoint
from .models import check_model_source, load_teacher
from .recipe import METHODS, Recipe, build_recipe, read_recipe_file
from .rundir import RunDir, log

DEMO_NAME = "demo"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def resolve_compile(compile: bool | None, device: torch.device) -> bool:
    """``--compile``/``--no-compile`` as given, else on for CUDA and off for CPU."""
    return device.type == "cuda" if compile is None else compile


def default_run_dir(recipe: Recipe) -> Path:
    name = DEMO_NAME if recipe.model is None else Path(recipe.model.rstrip("/")).name
    parts = [name, recipe.method]
    if recipe.method == "direct":
        parts.append(f"w{recipe.bits[0]}")
    if recipe.method != "rtn" and not recipe.split:
        parts.append("nosplit")
    if recipe.method == "bitbybit" and not recipe.progressive:
        parts.append("noprog")
    if recipe.act_bits and recipe.act_bits < 16:
        parts.append(f"a{recipe.act_bits}")
    return Path("runs") / "-".join(parts)


def method_defaults(recipe: Recipe, given: set[str]) -> Recipe:
    """RTN does not split unless split options were given explicitly."""
    if recipe.method == "rtn" and not given & {"split", "split_ratio_first", "split_ratio_last"}:
        return replace(recipe, split=False)
    return recipe


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated on CUDA; the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class RunSummary:
    checkpoint: str
    train_seconds: float
    peak_memory_bytes: int
    eval_rows: list[dict]


def source_dtype(model: str) -> torch.dtype:
    """The dtype the source model is stored in (unquantized tensors are exported in it)."""
    dtype = getattr(AutoConfig.from_pretrained(model), "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def calibration_sequences(recipe: Recipe, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation windows from the training part of the calibration text (none for plain RTN)."""
    if not (recipe.trained or recipe.split):
        empty = torch.empty(0, recipe.seq_len, dtype=torch.long)
        return empty, empty
    if not recipe.calib_data:
        raise ValueError("this method needs calibration text: pass --calib-data FILE")
    train_text, _ = split_text(read_text(recipe.calib_data), recipe.heldout_fraction)
    stream = token_stream(tokenizer, train_text)
    train_ids, val_ids = calibration_windows(stream, recipe.n_train, recipe.n_val, recipe.seq_len, recipe.seed)
    log.info(f"data: {recipe.calib_data}, training part {stream.numel()} tokens -> {recipe.n_train} training + "
             f"{recipe.n_val} validation sequences of {recipe.seq_len}")
    return train_ids, val_ids


def evaluate_run(recipe: Recipe, checkpoint: Path, run_dir: Path, device: torch.device, command: str) -> list[dict]:
    """The PPL table of the exported checkpoint, saved under ``run_dir/eval`` (skipped without text)."""
    if not recipe.eval:
        return []
    if not (recipe.eval_data or recipe.calib_data):
        log.info("no evaluation text (--eval-data or --calib-data): perplexity table skipped")
        return []
    table = evaluate(checkpoint, recipe.exported_bits, recipe.act_bits, eval_settings(recipe, device))
    table.command = command
    save_table(table, run_dir / "eval")
    log.info("\n" + to_markdown(table))
    return table.rows


def run(recipe: Recipe, command: str = "") -> RunSummary:
    """Quantize (and train) per the recipe, export the checkpoint, evaluate it."""
    device = resolve_device(recipe.device)
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    autocast = device.type == "cuda"
    recipe = replace(recipe, compile=resolve_compile(recipe.compile, device))
    run_dir = Path(recipe.run_dir) if recipe.run_dir else default_run_dir(recipe)
    demo = recipe.model is None
    if demo:
        teacher_dir, corpus = demo_paths(run_dir)
        recipe = replace(recipe, model=str(teacher_dir), calib_data=recipe.calib_data or str(corpus))
    recipe = replace(recipe, run_dir=str(run_dir))
    rd = RunDir(run_dir, recipe)
    if demo:
        prepare_demo(run_dir, device)
    check_model_source(recipe.model)
    log.info(f"run directory {run_dir}; recipe in {run_dir / 'recipe.json'}")
    if recipe.compile and recipe.trained:
        log.info("block training runs under torch.compile: the first step at each target compiles (once for all "
                 "blocks' split widths), which takes a while; --no-compile runs it eagerly")
    teacher, tokenizer = load_teacher(recipe.model, device, torch.bfloat16 if autocast else torch.float32)
    train_ids, val_ids = calibration_sequences(recipe, tokenizer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(recipe.seed)
    start = time.perf_counter()
    result = quantize_blocks(teacher, recipe, rd, train_ids, val_ids, autocast)
    train_seconds = sum(m["seconds"] for m in result.metrics) if result.metrics else time.perf_counter() - start
    peak = peak_memory_bytes(device)
    qc = export_quant_config(recipe)
    output = Path(recipe.output) if recipe.output else run_dir / "checkpoint"
    info = {"source_model": str(Path(recipe.model).resolve()) if Path(recipe.model).exists() else recipe.model,
            "method": method_label(recipe), "recipe": recipe.to_dict(), "command": command,
            "train_seconds": train_seconds, "peak_memory_bytes": peak, "device": str(device)}
    tokenizer_source = recipe.model if Path(recipe.model).is_dir() else None
    export_checkpoint(teacher.to(source_dtype(recipe.model)), tokenizer, result.layers, qc, output,
                      result.segments, info, tokenizer_source)
    log.info(f"exported {output} (training {train_seconds:.1f}s, peak memory {peak / 2**20:.0f} MiB)")
    summary = RunSummary(str(output), train_seconds, peak, evaluate_run(recipe, output, run_dir, device, command))
    (run_dir / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")
    return summary


def export_quant_config(recipe: Recipe) -> QuantConfig:
    """The checkpoint's quantization_config: every trained precision, or only ``export_bits`` (compact)."""
    return QuantConfig(trained_bits=recipe.exported_bits,
                       default_bits=recipe.export_bits or recipe.default_bits or recipe.lowest_bits,
                       stored_bits=recipe.export_bits or MASTER_BITS, act_bits=recipe.act_bits or 16,
                       split_bits=recipe.split_bits or recipe.lowest_bits)


def method_label(recipe: Recipe) -> str:
    """The results-table name of what this recipe trains."""
    if recipe.method == "rtn":
        return "rtn-split" if recipe.split else "rtn"
    if recipe.method == "direct":
        return "direct-qat"
    if not recipe.split:
        return "no-split"
    if not recipe.progressive:
        return "no-progressive"
    return "bitbybit"


def eval_settings(recipe: Recipe, device: torch.device) -> EvalSettings:
    if recipe.eval_data:
        return EvalSettings(recipe.eval_data, "all", recipe.heldout_fraction, recipe.eval_ctx or recipe.seq_len,
                            None, recipe.eval_max_tokens, str(device))
    if recipe.heldout_fraction <= 0:
        raise ValueError("no held-out text to evaluate on (--heldout-fraction 0): pass --eval-data FILE, or --no-eval")
    return EvalSettings(recipe.calib_data, "heldout", recipe.heldout_fraction, recipe.eval_ctx or recipe.seq_len,
                        None, recipe.eval_max_tokens, str(device))


def parse_loss_weights(text: str) -> dict[str, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): float(value) for name, value in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid loss weights {text!r}: use e.g. w8a16=10,w4a16=3") from None


def parse_int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list {text!r}: use comma-separated integers, e.g. 1,1,2,3,3") from None


RUN_EXAMPLES = """\
examples:
  python -m qat.run                                       # the demo: minutes on a CPU, no network
  python -m qat.run --model runs/stories260K-hf --recipe recipes/stories260k.toml
  python -m qat.run --model DIR --calib-data calib.txt --bits 8,4,3,2 --act-bits 2 --out CKPT
  python -m qat.run --model DIR --calib-data calib.txt --method rtn   # baseline: no training
  python -m qat.run --model DIR --calib-data calib.txt --method direct --bits 2
  python -m qat.run ... --export-bits 2 --out CKPT-w2     # a finished run's flags: re-export only
"""


def parse_args(argv: list[str] | None) -> tuple[dict, dict, set[str]]:
    """(recipe file values, CLI overrides, names given on the command line)."""
    d = Recipe()
    demo = ", ".join(f"{k} {v}" for k, v in DEMO_RECIPE.items())
    ap = argparse.ArgumentParser(
        prog="python -m qat.run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantization-aware training of a Llama-family model into one nested-grid bitbybit checkpoint\n"
                    "(servable at every trained weight precision), then its perplexity table. With no arguments it\n"
                    "runs the embedded demo: a tiny teacher built locally, then split, trained, exported, evaluated.",
        epilog="Defaults: flags left out take the --recipe file's value, else the default shown (qat/recipe.py).\n"
               + textwrap.fill(f"Without --model and --recipe the demo recipe applies: {demo}.", 100) + "\n"
               "Run directory: recipe.json, log.txt, losses.json/png, blocks/ (resume state), checkpoint/, eval/,\n"
               "summary.json.\n\n"
               + RUN_EXAMPLES)
    g = ap.add_argument_group("model and run")
    g.add_argument("--recipe", metavar="TOML", help="recipe file (recipes/*.toml) of Recipe fields; flags override it")
    g.add_argument("--model", metavar="MODEL",
                   help="HF Llama-family model directory or hub id (default: the embedded demo teacher)")
    g.add_argument("--method", choices=METHODS,
                   help=f"bitbybit: progressive nested QAT; rtn: round-to-nearest, no training; direct: QAT of "
                        f"one precision (one --bits) (default {d.method})")
    g.add_argument("--run-dir", dest="run_dir", metavar="DIR",
                   help="run directory: logs, per-block resume state, checkpoint "
                        "(default runs/<model>-<method>[-ablation])")
    g.add_argument("--out", "--output", dest="output", metavar="DIR",
                   help="checkpoint directory to write (default RUN_DIR/checkpoint)")
    g.add_argument("--restart", action="store_const", const=True,
                   help="delete RUN_DIR's finished blocks and train from scratch (default: resume after the last "
                        "finished block; a changed training recipe is refused)")
    g = ap.add_argument_group("calibration data")
    g.add_argument("--calib-data", dest="calib_data", metavar="FILE",
                   help="UTF-8 plain-text calibration file; needed to train or split (the demo uses its own corpus)")
    g.add_argument("--heldout-fraction", dest="heldout_fraction", type=float, metavar="F",
                   help=f"tail of --calib-data never trained on, in [0, 1), cut at a paragraph break; the PPL "
                        f"table uses it unless --eval-data is given (default {d.heldout_fraction})")
    g.add_argument("--n-train", dest="n_train", type=int, metavar="N",
                   help=f"training sequences (random --seq-len windows of the training part) (default {d.n_train})")
    g.add_argument("--n-val", dest="n_val", type=int, metavar="N",
                   help=f"validation sequences, disjoint from the training ones, for the per-block validation "
                        f"MSE; 0: none (default {d.n_val})")
    g.add_argument("--seq-len", dest="seq_len", type=int, metavar="TOKENS",
                   help=f"tokens per calibration sequence (default {d.seq_len})")
    g.add_argument("--seed", type=int, metavar="N",
                   help=f"random seed: calibration windows, batch order (default {d.seed})")
    g = ap.add_argument_group("precisions")
    g.add_argument("--bits", type=parse_bits, metavar="B,B,...",
                   help="trained weight precisions, comma-separated, each in 1..8 "
                        f"(default {','.join(map(str, d.bits))})")
    g.add_argument("--default-bits", dest="default_bits", type=int, metavar="B",
                   help="precision the checkpoint serves when none is asked for; one of --bits "
                        "(default: the lowest of --bits)")
    g.add_argument("--export-bits", dest="export_bits", type=int, metavar="B",
                   help="compact export: store only the B-bit codes (one of --bits, below 8), bit-packed, so the "
                        "linear weights take ~B/8 of the full checkpoint; it then serves at B only "
                        "(default: the full nested checkpoint, servable at every trained precision)")
    g.add_argument("--no-progressive", dest="progressive", action="store_const", const=False,
                   help="ablation: train all precisions together in one stage (default: progressive stages, "
                        "highest first: {8} -> {8,4} -> {8,4,3} -> ...)")
    g.add_argument("--lock-bits", dest="lock_bits", type=int, metavar="L",
                   help="train the precisions <= L first (then + W{lowest}A{act}), then the higher ones with the "
                        "L-bit codes locked, e.g. 2: {2} -> {2,W2A2} -> {8,4,3} (default: highest first)")
    g.add_argument("--act-bits", dest="act_bits", type=int, metavar="A",
                   help="add a final stage that also trains W{lowest}A{A}, per-token activations at A bits (1..8; "
                        "16: none) (default: no activation stage)")
    g.add_argument("--loss-weights", dest="loss_weights", type=parse_loss_weights, metavar="T=W,...",
                   help="weight of each target's block-output MSE, others 1 "
                        f"(default {','.join(f'{k}={v:g}' for k, v in d.loss_weights.items())})")
    g = ap.add_argument_group("outlier channel splitting")
    g.add_argument("--no-split", dest="split", action="store_const", const=False,
                   help="ablation: no outlier channel splitting (default: split, except for --method rtn)")
    g.add_argument("--split", dest="split", action="store_const", const=True,
                   help="split outlier channels (also for rtn, which otherwise splits only when a split ratio "
                        "is given)")
    g.add_argument("--split-ratio-first", dest="split_ratio_first", type=float, metavar="F",
                   help=f"fraction of a layer's input channels split in the first block, in [0, 1] "
                        f"(default {d.split_ratio_first})")
    g.add_argument("--split-ratio-last", dest="split_ratio_last", type=float, metavar="F",
                   help=f"the same in the last block; linear in depth between the two (default {d.split_ratio_last})")
    g.add_argument("--split-bits", dest="split_bits", type=int, metavar="B",
                   help="precision whose grid step makes the split exact (default: the lowest of --bits)")
    g.add_argument("--split-segments", dest="split_segments", type=int, metavar="S",
                   help="tensor-parallel segments of the split region of o_proj/down_proj; vLLM can serve at "
                        f"TP size T only if T divides S (default {d.split_segments})")
    g = ap.add_argument_group("block-wise training")
    g.add_argument("--epochs-per-stage", dest="epochs_per_stage", type=int, metavar="N",
                   help=f"passes over the --n-train sequences per precision stage; 0: no training "
                        f"(default {d.epochs_per_stage})")
    g.add_argument("--stage-epochs", dest="stage_epochs", type=parse_int_list, metavar="N,N,...",
                   help="epochs of each precision stage in training order, e.g. 1,1,2,3,3 "
                        "(overrides --epochs-per-stage)")
    g.add_argument("--batch-size", dest="batch_size", type=int, metavar="N",
                   help=f"sequences per optimizer step (default {d.batch_size})")
    g.add_argument("--lr", type=float, metavar="LR",
                   help=f"AdamW learning rate at the start of each stage, cosine-decayed to lr/20 (default {d.lr:g})")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, metavar="WD",
                   help=f"AdamW weight decay (default {d.weight_decay:g})")
    g.add_argument("--block-input", dest="block_input", choices=("quantized", "fp"),
                   help="what a block trains on: the quantized prefix's outputs at each target (quantized) or "
                        f"the teacher's (fp) (default {d.block_input})")
    g.add_argument("--device", metavar="DEV",
                   help=f"auto (CUDA if available), cpu, cuda or cuda:I (default {d.device})")
    g.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's choice; tiny models run fastest with 1)")
    g.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the block-training step (the same math, equal up to float rounding, in far "
                        "fewer kernel launches); default: on for CUDA, off for CPU")
    g = ap.add_argument_group("evaluation after export (python -m qat.eval)")
    g.add_argument("--eval-data", dest="eval_data", metavar="FILE",
                   help="text file for the PPL table, scored whole (default: the held-out tail of --calib-data)")
    g.add_argument("--eval-ctx", dest="eval_ctx", type=int, metavar="TOKENS",
                   help="evaluation window length, non-overlapping windows (default: --seq-len)")
    g.add_argument("--eval-max-tokens", dest="eval_max_tokens", type=int, metavar="N",
                   help="score only the first N tokens of the evaluation text (default: all)")
    g.add_argument("--no-eval", dest="eval", action="store_const", const=False,
                   help="skip the perplexity table (default: evaluate every exported precision and the FP model)")
    args = vars(ap.parse_args(argv))
    if args.get("recipe"):
        file_values = read_recipe_file(args["recipe"])
    else:
        file_values = DEMO_RECIPE if args.get("model") is None else {}
    known = {f.name for f in fields(Recipe)}
    overrides = {k: v for k, v in args.items() if k in known}
    given = set(file_values) | {k for k, v in overrides.items() if v is not None}
    return file_values, overrides, given


def main(argv: list[str] | None = None) -> None:
    file_values, overrides, given = parse_args(argv)
    try:
        recipe = method_defaults(build_recipe(file_values, overrides), given)
    except (TypeError, ValueError) as e:
        sys.exit(f"error: {e}")
    command = "python -m qat.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        summary = run(recipe, command.strip())
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"checkpoint: {summary.checkpoint}")


if __name__ == "__main__":
    main()
