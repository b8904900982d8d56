"""The run directory: resolved recipe, log, loss curves (JSON + PNG), and per-block state for resuming.

    <run_dir>/recipe.json        the resolved recipe
    <run_dir>/log.txt            everything logged
    <run_dir>/blocks/NNN.pt      a finished block: its trained student state, split indices and metrics
    <run_dir>/losses.json        per block: training loss per step and target, validation MSE per stage
    <run_dir>/losses.png         the same, plotted
    <run_dir>/checkpoint/        the exported checkpoint (unless --output says elsewhere)

A run restarted with the same recipe continues after the last finished block; a different
recipe in a directory that has finished blocks is refused (``--restart`` starts over).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from .recipe import Recipe

log = logging.getLogger("qat")
# Fields that do not change what is trained: a resumed run may differ in these.
NOT_TRAINING_FIELDS = ("run_dir", "output", "restart", "export_bits", "device", "threads", "compile", "eval",
                       "eval_data", "eval_ctx", "eval_max_tokens")


class RunDir:
    def __init__(self, path: str | Path, recipe: Recipe) -> None:
        self.path = Path(path)
        self.blocks = self.path / "blocks"
        if recipe.restart and self.blocks.exists():
            shutil.rmtree(self.blocks)
        self.blocks.mkdir(parents=True, exist_ok=True)
        self._check_same_recipe(recipe)
        (self.path / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        self._setup_log()

    def _check_same_recipe(self, recipe: Recipe) -> None:
        old_file = self.path / "recipe.json"
        if not old_file.is_file() or not self.finished_blocks():
            return
        old, new = json.loads(old_file.read_text()), recipe.to_dict()
        changed = sorted(k for k in new if k not in NOT_TRAINING_FIELDS and old.get(k) != new[k])
        if changed:
            raise ValueError(f"{self.path} holds finished blocks of a run with a different recipe "
                             f"(changed: {', '.join(changed)}); pass --restart to start over or choose another --run-dir")

    def _setup_log(self) -> None:
        log.setLevel(logging.INFO)
        for h in list(log.handlers):
            log.removeHandler(h)
            h.close()
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        for h in (logging.FileHandler(self.path / "log.txt"), logging.StreamHandler()):
            h.setFormatter(fmt)
            log.addHandler(h)
        log.propagate = False

    def block_file(self, i: int) -> Path:
        return self.blocks / f"{i:03d}.pt"

    def finished_blocks(self) -> int:
        """How many leading blocks are finished (0, 1, ... without gaps)."""
        n = 0
        while self.block_file(n).is_file():
            n += 1
        return n

    def save_block(self, i: int, state: dict) -> None:
        tmp = self.block_file(i).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.block_file(i))  # atomic: a killed run never leaves a half-written block

    def load_block(self, i: int) -> dict:
        return torch.load(self.block_file(i), map_location="cpu", weights_only=False)

    def write_curves(self, metrics: list[dict]) -> None:
        """losses.json and losses.png from every finished block's metrics."""
        (self.path / "losses.json").write_text(json.dumps(metrics, indent=1) + "\n")
        plot_curves(metrics, self.path / "losses.png")


def plot_curves(metrics: list[dict], path: Path) -> None:
    """One panel per block: training loss of each target over steps (log scale), stage boundaries dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [m for m in metrics if m.get("train")]
    if not trained:
        return
    cols = min(4, len(trained))
    rows = -(-len(trained) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, m in zip(axes.flat, trained):
        for target, points in m["train"].items():
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, label=target, linewidth=0.8)
        for boundary in m.get("stage_starts", [])[1:]:
            ax.axvline(boundary, color="grey", linestyle="--", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_title(f"block {m['block']}")
        ax.set_xlabel("step")
        ax.set_ylabel("MSE")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(trained):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
