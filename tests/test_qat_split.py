"""Outlier channel splitting on a real model (stories260K): shared split sets, depth ratio, exact identity."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from qat.blocks import capture_layer0_inputs, make_student, run_block_batched
from qat.data import calibration_windows, read_text, token_stream
from qat.models import SHARED_INPUT_GROUPS, load_teacher
from qat.ocs import InputNorms, channel_metric, check_split_identity, choose_splits
from qat.recipe import Recipe


def test_split_model_reproduces_the_full_precision_model(stories_hf: Path, shared_data: Path) -> None:
    """Every block split (ratio growing with depth, calibrated channel choice): the float logits do not change."""
    teacher, tokenizer = load_teacher(str(stories_hf), torch.device("cpu"), torch.float32)
    text = read_text(shared_data / "tinystories-val" / "tinystories_val.txt")[:60_000]
    ids, _ = calibration_windows(token_stream(tokenizer, text), 8, 0, 128, seed=0)
    fp, kwargs = capture_layer0_inputs(teacher, ids, 8, torch.float32)
    recipe = Recipe(split_ratio_first=0.05, split_ratio_last=0.25)
    layers = teacher.model.layers
    students, counts = [], []
    for i, block in enumerate(layers):
        norms = InputNorms(block)
        out = run_block_batched(block, fp, kwargs, 8, autocast=False)
        channel_norms = norms.remove()
        splits = choose_splits(block, channel_norms, recipe.split_ratio(i, len(layers)), 32, 1)
        for group in SHARED_INPUT_GROUPS:  # one split set per input
            assert all(torch.equal(splits[n], splits[group[0]]) for n in group)
            chosen = splits[group[0]][splits[group[0]] >= 0].long()
            metric = channel_metric(block, group, channel_norms[group[0]])
            assert metric[chosen].min() >= metric.topk(chosen.numel()).values.min()  # the top channels by metric
        student = make_student(block, splits, 2, 32, 8)
        assert check_split_identity(block, student, fp, kwargs, autocast=False) < 1e-5
        counts.append(sum(int((idx >= 0).sum()) for idx in splits.values()))
        students.append(student)
        fp = out
    assert counts == sorted(counts) and counts[0] < counts[-1]  # more channels deeper
    split_model = copy.deepcopy(teacher)
    split_model.model.layers = nn.ModuleList(students)
    with torch.no_grad():
        ref, got = teacher(ids).logits, split_model(ids).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
