"""The training recipe: every knob of ``python -m qat.run``, read from a TOML file with CLI overrides.

A recipe file (``recipes/*.toml``) holds any subset of :class:`Recipe`'s fields at top level;
command-line flags override it; the resolved recipe is written to the run directory.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from kernels.grid import MASTER_BITS, check_bits

METHODS = ("bitbybit", "rtn", "direct")
BLOCK_INPUTS = ("quantized", "fp")
A16 = 16
TARGET_NAME = re.compile(r"w[1-8]a(16|[1-8])")


@dataclass(frozen=True)
class Target:
    """One precision a block is trained for: weights at ``w`` bits, activations at ``a`` bits (16 = float)."""

    w: int
    a: int = A16

    @property
    def name(self) -> str:
        return f"w{self.w}a{self.a}"


@dataclass
class Recipe:
    """Everything a run needs; ``None`` fields are derived in :meth:`resolved`."""

    model: str | None = None  # HF directory or hub id; None builds the embedded demo teacher
    method: str = "bitbybit"  # bitbybit | rtn (no training) | direct (single-precision QAT)
    run_dir: str | None = None  # default runs/<model>-<method>[-ablation]
    output: str | None = None  # checkpoint directory; default <run_dir>/checkpoint
    restart: bool = False  # ignore finished blocks in run_dir and start over
    # data
    calib_data: str | None = None  # text file; None = the embedded corpus (demo only)
    heldout_fraction: float = 0.1  # tail of calib_data never trained on (eval may use it)
    n_train: int = 128  # calibration sequences
    n_val: int = 16  # validation sequences (from the training part, disjoint from n_train)
    seq_len: int = 256
    seed: int = 0
    # precisions
    bits: list[int] = field(default_factory=lambda: [8, 4, 3, 2])
    default_bits: int | None = None  # default: lowest of bits
    progressive: bool = True  # stages {8} -> {8,4} -> ...; False: one stage with all precisions
    # Low precisions first: the precisions <= lock_bits (then + W{lowest}A{act}), then the higher ones with
    # the lock_bits codes locked (weights move only inside their lock_bits cells, so the low precisions keep
    # what their stages learned). E.g. 2: {2} -> {2, W2A2} -> {8,4,3}. None (default): highest first.
    lock_bits: int | None = None
    act_bits: int | None = None  # adds a final stage that also trains W{lowest}A{act_bits}
    export_bits: int | None = None  # None: the full nested checkpoint; B: a compact one holding only the B-bit codes
    # Target name -> weight of its MSE (others 1). Equal weights let the 2-bit loss, ~1000x the 8-bit one,
    # pull the shared weights away from full precision (stories260K: W8 PPL +4%); see docs/RESULTS.md.
    loss_weights: dict[str, float] = field(default_factory=lambda: {"w8a16": 10.0, "w4a16": 3.0})
    # outlier channel splitting
    split: bool = True
    split_ratio_first: float = 0.02  # fraction of a layer's input channels split in the first block
    split_ratio_last: float = 0.08  # ... and in the last block (linear in between)
    split_bits: int | None = None  # precision whose step makes the split exact; default lowest of bits
    split_segments: int = 1  # tensor-parallel segments of the split region of o_proj/down_proj
    # block-wise training
    epochs_per_stage: int = 2
    # epochs of each stage, in the order of stages() (one entry per stage); None: epochs_per_stage each.
    # Measured choices: docs/results/qat-stories260K-sweep2.json (recipes/stories260k-sweep2.sh).
    stage_epochs: list[int] | None = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    block_input: str = "quantized"  # quantized: the quantized prefix's outputs; fp: the teacher's
    device: str = "auto"  # auto | cpu | cuda[:i]
    threads: int | None = None  # CPU threads for torch (None: torch's default); 1 is fastest for tiny models
    # torch.compile the per-target loss + backward of block training (same math, far fewer kernel launches).
    # None: on for CUDA, off for CPU (there compiling takes longer than the small runs it would speed up).
    compile: bool | None = None
    # evaluation after export (python -m qat.eval with these settings)
    eval: bool = True
    eval_data: str | None = None  # text file; None: the held-out part of calib_data
    eval_ctx: int | None = None  # default: seq_len
    eval_max_tokens: int | None = None

    def validate(self) -> None:
        """Raise ValueError naming the bad field and how to fix it."""
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.block_input not in BLOCK_INPUTS:
            raise ValueError(f"block_input {self.block_input!r} is unknown; choose one of {', '.join(BLOCK_INPUTS)}")
        if not self.bits:
            raise ValueError("bits is empty; give the precisions to train, e.g. --bits 8,4,3,2")
        for b in self.bits:
            try:
                check_bits(b)
            except ValueError:
                raise ValueError(f"invalid bits list {self.bits}: every precision must be an integer in 1..8") from None
        if len(set(self.bits)) != len(self.bits):
            raise ValueError(f"invalid bits list {self.bits}: a precision is repeated")
        if self.lock_bits is not None and (self.method != "bitbybit" or not self.progressive
                                           or self.lock_bits not in self.bits or self.lock_bits == max(self.bits)):
            raise ValueError(f"lock_bits {self.lock_bits} must be one of the trained bits {self.bits} below the highest, "
                             "with the bitbybit method and progressive stages")
        if self.method == "direct" and len(self.bits) != 1:
            raise ValueError(f"direct QAT trains a single precision; pass one, e.g. --bits 2 (got {self.bits})")
        if self.default_bits is not None and self.default_bits not in self.bits:
            raise ValueError(f"default_bits {self.default_bits} is not among bits {self.bits}")
        if self.act_bits is not None and self.act_bits != A16:
            check_bits(self.act_bits)
        self._check_export_bits()
        if self.split_bits is not None:
            check_bits(self.split_bits)
        if not 0 <= self.split_ratio_first <= 1 or not 0 <= self.split_ratio_last <= 1:
            raise ValueError("split ratios must be fractions of the input channels in [0, 1]")
        if not 0 <= self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        for name in ("n_train", "seq_len", "batch_size", "split_segments"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        malformed = [n for n in self.loss_weights if not TARGET_NAME.fullmatch(n)]
        if malformed:
            raise ValueError(f"loss_weights keys {malformed} are not target names like 'w2a16' or 'w2a2'")
        if self.n_val < 0 or self.epochs_per_stage < 0 or self.lr <= 0:
            raise ValueError("n_val and epochs_per_stage must be >= 0 and lr > 0")
        if self.stage_epochs is not None:
            n = len(self.stages())
            if len(self.stage_epochs) != n or any(e < 0 for e in self.stage_epochs):
                raise ValueError(f"stage_epochs {self.stage_epochs} must give {n} non-negative epoch counts, one per "
                                 f"stage ({' -> '.join('+'.join(t.name for t in st) for st in self.stages())})")

    def _check_export_bits(self) -> None:
        b = self.export_bits
        if b is None:
            return
        if b not in self.bits:
            raise ValueError(f"export_bits {b} is not among the trained bits {self.bits}; pick one of them, "
                             "e.g. --export-bits 2")
        if b == MASTER_BITS:
            raise ValueError(f"export_bits {b} is the master precision: the full checkpoint already stores "
                             f"{MASTER_BITS}-bit codes; leave --export-bits out")

    @property
    def exported_bits(self) -> list[int]:
        """The precisions the exported checkpoint serves, highest first (only ``export_bits`` for a compact one)."""
        return [self.export_bits] if self.export_bits is not None else sorted(self.bits, reverse=True)

    @property
    def trained(self) -> bool:
        return self.method != "rtn" and sum(self.epochs_of_stages()) > 0

    def epochs_of_stages(self) -> list[int]:
        """Epochs of each stage of :meth:`stages`, in order."""
        if self.stage_epochs is not None:
            return list(self.stage_epochs)
        return [self.epochs_per_stage] * len(self.stages())

    @property
    def lowest_bits(self) -> int:
        return min(self.bits)

    def stages(self) -> list[list[Target]]:
        """The precision stages in training order; each lists the targets trained together.

        Highest precision first by default; with ``lock_bits`` the precisions <= lock_bits come first and the
        last stage trains the higher ones with the lock_bits codes held (:meth:`locked_bits`).
        """
        order = sorted(self.bits, reverse=True)
        act = self.act_bits is not None and self.act_bits != A16
        if self.lock_bits is not None:
            low = [Target(b) for b in order if b <= self.lock_bits]
            stages = [low, [*low, Target(self.lowest_bits, self.act_bits)]] if act else [low]
            return [*stages, [Target(b) for b in order if b > self.lock_bits]]
        if self.progressive:
            stages = [[Target(b) for b in order[:k + 1]] for k in range(len(order))]
        else:
            stages = [[Target(b) for b in order]]
        if act:
            stages.append([*stages[-1], Target(self.lowest_bits, self.act_bits)])
        return stages

    def targets(self) -> list[Target]:
        """Every target of any stage (the ones the checkpoint is trained for), in order of first appearance."""
        return list(dict.fromkeys(t for stage in self.stages() for t in stage))

    def locked_bits(self, stage: int) -> int | None:
        """The precision whose codes stage ``stage`` may not change (``lock_bits`` in the last stage), else None."""
        return self.lock_bits if stage == len(self.stages()) - 1 else None

    def loss_weight(self, target: Target) -> float:
        return float(self.loss_weights.get(target.name, 1.0))

    def split_ratio(self, block: int, n_blocks: int) -> float:
        """Fraction of input channels to split in ``block`` (linear in depth between the two ends)."""
        if not self.split:
            return 0.0
        t = block / (n_blocks - 1) if n_blocks > 1 else 1.0
        return self.split_ratio_first + t * (self.split_ratio_last - self.split_ratio_first)

    def to_dict(self) -> dict:
        return asdict(self)


def read_recipe_file(path: str | Path) -> dict:
    """A recipe TOML file as a dict of known fields."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {path} not found")
    data = tomllib.loads(path.read_text())
    known = {f.name for f in fields(Recipe)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown recipe keys {sorted(unknown)}; known keys: {sorted(known)}")
    return data


def build_recipe(file_values: dict, overrides: dict) -> Recipe:
    """Recipe from a file's values with CLI overrides (``None`` in overrides means 'not given')."""
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    recipe = Recipe(**values)
    recipe.validate()
    return recipe
