"""The int8 tensor-core W{b}A{a} kernel (``kernels/triton_mma.py``) on the CPU under ``TRITON_INTERPRET=1``.

The module re-runs itself in a subprocess with the interpreter switched on (``tests/interpreted.py``). Every case draws fresh random inputs, poisons
the output with NaN and compares with ``reference.linear_wa`` in float64.
"""

from __future__ import annotations

import pytest
from interpreted import INTERPRETED, rerun_interpreted

if not INTERPRETED:
    def test_mma_kernel_under_the_interpreter():
        rerun_interpreted(__file__, timeout=600)

else:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kernels.grid import quantize_weight
    from kernels.ops import pack_linear
    from kernels.reference import linear_wa
    from kernels.split import quantize_split_weight, split_region_index
    from kernels.triton_ops import Config, launch_linear, launch_linear_wa, mma8_config

    K = 72  # not a multiple of 32: Kq = 96, or 128 with the split region
    SPLITS = [3, 40, 71]

    def layer(bits: int, split: bool, n: int = 12):
        w = torch.randn(n, K) * torch.rand(n, 1)
        qw = quantize_split_weight(w, split_region_index(SPLITS, K, 32)) if split else quantize_weight(w)
        return pack_linear(qw, bits)

    def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
        return ((out.double() - ref.double()).norm() / ref.double().norm()).item()

    def run(x, lay, act_bits, cfg, bias=None, rescale=True):
        out = torch.full((x.shape[0], lay.out_features), float("nan"), dtype=x.dtype)
        launch_linear_wa(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, lay.split_index, bias, lay.bits,
                         lay.master_bits, act_bits, x.dtype, cfg, out, rescale)
        assert not out.isnan().any(), "an output element was not written"
        return out

    @pytest.mark.parametrize("bits", [2, 3, 4, 8])
    @pytest.mark.parametrize("act_bits", [2, 4])
    @pytest.mark.parametrize("split, m, dtype, cfg", [
        (True, 19, torch.bfloat16, Config("mma8", 16, 16, 32, split_k=2)),  # 2 M tiles, N not a multiple of BN
        (False, 5, torch.float16, Config("mma8", 16, 32, 32, num_warps=2)),
    ])
    def test_mma_matches_reference(bits, act_bits, split, m, dtype, cfg):
        lay = layer(bits, split)
        x = torch.randn(m, K).to(dtype)
        bias = torch.randn(lay.out_features).to(dtype) if split else None
        ref = linear_wa(x.double(), lay.to_quantized_weight(), bits, act_bits,
                        bias=None if bias is None else bias.double())
        assert rel_err(run(x, lay, act_bits, cfg, bias), ref) <= 1e-2

    def test_mma_rescale_off_writes_every_output():
        """The timing-only variant (int32 partials summed across groups) runs and writes the whole output."""
        lay = layer(2, True)
        run(torch.randn(7, K, dtype=torch.bfloat16), lay, 2, Config("mma8", 16, 16, 32, split_k=3), rescale=False)

    def test_linear_wa_op_runs_both_kernels_and_has_fake_shapes():
        lay = layer(4, True)
        args = (lay.packed, lay.scales, lay.zeros, lay.row_scale, lay.split_index, None, 4, 8, 2)
        x = torch.randn(3, 1, K, dtype=torch.float16)
        ref = linear_wa(x.double(), lay.to_quantized_weight(), 4, 2)
        for kernel in ("mma8", "auto"):
            y = torch.ops.bitbybit.linear_wa(x, *args, torch.float16, kernel)
            assert y.shape == (3, 1, lay.out_features) and y.dtype == torch.float16
            assert rel_err(y, ref) <= 1e-2
        with pytest.raises(ValueError, match="kernel"):
            torch.ops.bitbybit.linear_wa(x, *args, torch.float16, "gemm")
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(torch.empty(7, K, dtype=torch.bfloat16))
            fargs = [mode.from_tensor(t) for t in args[:5]]
            fy = torch.ops.bitbybit.linear_wa(fx, *fargs, *args[5:], torch.bfloat16, "mma8")
        assert fy.shape == (7, lay.out_features) and fy.dtype == torch.bfloat16

    def test_mma_limits_and_config_rule():
        lay = layer(2, False)
        x = torch.randn(2, K, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="act_bits <= 7"):
            run(x, lay, 8, Config("mma8", 16, 16, 32))
        with pytest.raises(ValueError, match="launch_linear_wa"):
            launch_linear(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, None, None, None, 2, 8, K,
                          torch.bfloat16, Config("mma8", 16, 16, 32))
        with pytest.raises(ValueError, match="mma8 kernel only"):
            run(x, lay, 2, None, rescale=False)
        assert mma8_config(1, 8192, 8192) == Config("mma8", 16, 64, 32, split_k=4, num_warps=4, num_stages=3)
        assert mma8_config(1024, 8192, 8192) == Config("mma8", 128, 128, 32, num_warps=8, num_stages=3)
