"""The int8 tensor-core W{b}A{a} kernel (``kernels/triton_mma.py``) on a CUDA GPU, against float64 references.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_mma_gpu.py``. As in
``test_kernels_gpu.py``: fresh random inputs per case, outputs poisoned with NaN,
``||out - ref|| / ||ref|| <= 1e-2``, activations quantized for the reference on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kernels.actquant import dequantize_activations, quantize_activations
from kernels.bench import SHAPES
from kernels.grid import dequantize
from kernels.split import split_region_index
from kernels.triton_ops import launch_linear_wa, mma8_config

from test_kernels_gpu import gen, make_layer, poisoned, rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MS = (1, 16, 256, 1024)


def mma(x: torch.Tensor, layer, act_bits: int, bias: torch.Tensor | None = None, rescale: bool = True) -> torch.Tensor:
    out = poisoned(x.shape[0], layer.out_features, x.dtype)
    launch_linear_wa(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, layer.split_index, bias, layer.bits,
                     layer.master_bits, act_bits, x.dtype,
                     mma8_config(x.shape[0], layer.out_features, layer.scales.shape[1] * 32), out, rescale)
    assert not out.isnan().any(), f"M={x.shape[0]}: output not fully written"
    return out


def reference(x: torch.Tensor, layer, act_bits: int) -> torch.Tensor:
    w = dequantize(layer.to_quantized_weight(), layer.bits, dtype=torch.float64)
    split = None if layer.split_index is None else layer.split_index.cpu()
    xa = dequantize_activations(quantize_activations(x.cpu(), act_bits, split), torch.float64)
    return xa.cuda() @ w.T


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bits, act_bits", [(2, 2), (4, 4)])
def test_mma_every_shape(k, n, bits, act_bits):
    layer = make_layer(k, n, bits, gen("mma", k, n, bits))
    for m in MS:
        x = torch.randn(m, k, device="cuda", generator=gen("mma", k, n, bits, m)).to(torch.bfloat16)
        err = rel_err(mma(x, layer, act_bits), reference(x, layer, act_bits))
        assert err <= 1e-2, f"W{bits}A{act_bits} {k}x{n} M={m}: rel err {err:.2e}"


@pytest.mark.parametrize("bits, act_bits, dtype", [(3, 2, torch.bfloat16), (8, 4, torch.float16),
                                                   (2, 4, torch.float16)])
def test_mma_split_channels_bias_and_other_bits(bits, act_bits, dtype):
    k, n = 4096, 1024
    idx = split_region_index(list(range(5, k, 61)), k, 32, segments=4)
    layer = make_layer(k, n, bits, gen("mma-s", bits), idx)
    bias = torch.randn(n, device="cuda", generator=gen("mma-b", bits)).to(dtype)
    for m in MS:
        x = torch.randn(m, k, device="cuda", generator=gen("mma-s", bits, m)).to(dtype)
        ref = reference(x, layer, act_bits) + bias.double()
        err = rel_err(mma(x, layer, act_bits, bias), ref)
        assert err <= 1e-2, f"W{bits}A{act_bits} {dtype} M={m}: rel err {err:.2e}"


def test_mma_rescale_off_compiles_and_writes_every_output():
    """The benchmark's timing-only variant (wrong numbers by design) at a benchmark shape."""
    layer = make_layer(8192, 8192, 2, gen("mma-off"))
    for m in MS:
        mma(torch.randn(m, 8192, device="cuda", generator=gen("mma-off", m)).to(torch.bfloat16), layer, 2,
            rescale=False)


def test_linear_wa_op_under_torch_compile_with_cuda_graphs():
    """``torch.ops.bitbybit.linear_wa(kernel="mma8")`` compiled with ``mode="reduce-overhead"`` (fullgraph, captured
    into CUDA graphs: warm-up, recording, replay) matches the eager op bit for bit."""
    layer = make_layer(4096, 4096, 2, gen("mma-g"))
    args = (layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None, 2, 8, 2, torch.bfloat16, "mma8")

    def f(inp):
        return torch.ops.bitbybit.linear_wa(inp, *args)

    x = torch.randn(256, 4096, device="cuda", generator=gen("mma-g", 0)).to(torch.bfloat16)
    assert rel_err(f(x), reference(x, layer, 2)) <= 1e-2
    counters.clear()
    compiled = torch.compile(f, fullgraph=True, mode="reduce-overhead")
    for i in range(3):
        x = torch.randn(256, 4096, device="cuda", generator=gen("mma-g", i)).to(torch.bfloat16)
        assert torch.equal(compiled(x), f(x))
    assert not counters["inductor"]["cudagraph_skips"], "the compiled op was not captured into a CUDA graph"
