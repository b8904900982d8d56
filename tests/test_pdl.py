"""Programmatic dependent launch (:mod:`kernels.pdl`): where it is off, and the TMA ring's balance rule.

The launches themselves run on the H200 (``tests/gpu/test_kernels_gpu.py::test_pdl_chain_matches_launches_without_it``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from kernels.gluon_stream import pdl_keeps_balance
from kernels.pdl import pdl_for


def test_pdl_is_off_for_cpu_tensors_and_by_the_environment():
    assert not pdl_for(torch.zeros(1))
    code = "import kernels.pdl as p; print(p.ENABLED)"
    env = {**os.environ, "BITBYBIT_PDL": "0"}
    off = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    env["BITBYBIT_PDL"] = "1"
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert (off.stdout.strip(), on.stdout.strip()) == ("False", "True")


def test_ring_launches_with_pdl_unless_its_programs_could_crowd_some_sms():
    """More programs than SMs, or one program per SM by registers: PDL; at most one per SM while two fit: not."""
    sms = 132
    assert pdl_keeps_balance(256, 1, 4, sms) and pdl_keeps_balance(133, 2, 4, sms)
    assert not pdl_keeps_balance(128, 1, 4, sms)  # 8 warps x 96 registers: two programs fit
    assert not pdl_keeps_balance(132, 2, 4, sms)  # 8 warps x 128 registers: exactly two fit
    assert pdl_keeps_balance(128, 1, 8, sms) and pdl_keeps_balance(64, 4, 8, sms)  # 12 warps: one per SM
