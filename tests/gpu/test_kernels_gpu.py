"""The Triton kernels on a CUDA GPU at every benchmark shape, against float64 references of the same quantized values.

Run on the device machine: ``python -m pytest -m gpu tests/gpu``. Every check draws fresh random
inputs (seeded per case), poisons the output with NaN first and requires
``||out - ref|| / ||ref|| <= 1e-2``. Activations are quantized for the references on the CPU:
PyTorch's CUDA division by a scalar multiplies by its reciprocal, so the reference ops on a
GPU can round a scale differently from the format's definition (IEEE division, as on the CPU).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kernels.actquant import dequantize_activations, quantize_activations
from kernels.bench import MS, SHAPES, WS_TILES
from kernels.gluon_gemm import WARPS as WS_WARPS
from kernels.gluon_gemm_ra import launch_ra_order, ra_order
from kernels.grid import dequantize, quantize_weight
from kernels.ops import linear, pack_linear
from kernels.split import expand_input, quantize_split_weight, split_region_index
from kernels.triton_ops import TABLE, ActQuantTile, Config, launch_actquant, launch_linear, launch_linear_wa, table_key

BF16, F16 = torch.bfloat16, torch.float16
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def gen(*key) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(repr(key).encode()))


def make_layer(k: int, n: int, bits: int, g: torch.Generator, split_index: torch.Tensor | None = None):
    w = torch.randn(n, k, device="cuda", generator=g) * (0.5 + torch.rand(n, 1, device="cuda", generator=g))
    qw = quantize_weight(w) if split_index is None else quantize_split_weight(w, split_index.cuda())
    return pack_linear(qw, bits)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def poisoned(m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full((m, n), float("nan"), dtype=dtype, device="cuda")


def check_wa16(layer, m: int, dtype: torch.dtype, g: torch.Generator, config: Config | None = None) -> None:
    x = torch.randn(m, layer.in_features, device="cuda", generator=g).to(dtype)
    out = poisoned(m, layer.out_features, dtype)
    launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, layer.split_index, None, None,
                  layer.bits, layer.master_bits, layer.in_features, dtype, config, out)
    assert not out.isnan().any(), f"M={m}: output not fully written"
    w = dequantize(layer.to_quantized_weight(), layer.bits, dtype=torch.float64)
    ref = expand_input(x.double(), layer.split_index, 32) @ w.T
    err = rel_err(out, ref)
    assert err <= 1e-2, f"M={m} {dtype}: rel err {err:.2e}"


def check_token_scale_bias(layer, m: int, dtype: torch.dtype, config: Config, tag: str) -> None:
    """One call of ``config`` with a token scale per row and a bias, against the float64 reference."""
    k, n = layer.in_features, layer.out_features
    x = torch.randn(m, k, device="cuda", generator=gen(f"{tag}-ts", k)).to(dtype)
    ts = torch.rand(m, device="cuda", generator=gen(f"{tag}-ts")) + 0.5
    bias = torch.randn(n, device="cuda", generator=gen(f"{tag}-b")).to(dtype)
    out = poisoned(m, n, dtype)
    launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, ts, bias, layer.bits,
                  layer.master_bits, k, dtype, config, out)
    w = dequantize(layer.to_quantized_weight(), layer.bits, dtype=torch.float64)
    err = rel_err(out, (x.double() @ w.T) * ts.double()[:, None] + bias.double())
    assert not out.isnan().any() and err <= 1e-2, f"token scale and bias: rel err {err:.2e}"


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bits, dtype, ms", [(2, torch.bfloat16, MS), (4, torch.float16, [1, 2, 3, 16, 64, 128, 1024]),
                                             (3, torch.bfloat16, [1, 16, 1024]), (8, torch.bfloat16, [1, 16, 1024])])
def test_wa16_every_shape(k, n, bits, dtype, ms):
    layer = make_layer(k, n, bits, gen(k, n, bits))
    for m in ms:
        check_wa16(layer, m, dtype, gen(k, n, bits, m))


@pytest.mark.parametrize("k, n", SHAPES)
@pytest.mark.parametrize("bits", [2, 4])
def test_wa_every_shape(k, n, bits):
    layer = make_layer(k, n, bits, gen("a", k, n, bits))
    w = dequantize(layer.to_quantized_weight(), bits, dtype=torch.float64)
    for m in (1, 2, 16, 256, 4096):
        x = torch.randn(m, k, device="cuda", generator=gen("a", k, n, bits, m)).to(torch.bfloat16)
        out = poisoned(m, n, torch.bfloat16)
        launch_linear_wa(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None, bits, 8, bits,
                         torch.bfloat16, out=out)
        assert not out.isnan().any()
        ref = dequantize_activations(quantize_activations(x.cpu(), bits), torch.float64).cuda() @ w.T
        err = rel_err(out, ref)
        assert err <= 1e-2, f"W{bits}A{bits} M={m}: rel err {err:.2e}"


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                            reason="the warp-specialized kernel needs a Hopper GPU")


@hopper
@pytest.mark.parametrize("tile", WS_TILES)
@pytest.mark.parametrize("bits, dtype", [(2, torch.bfloat16), (2, torch.float16), (4, torch.bfloat16),
                                         (4, torch.float16), (8, torch.float16)])
def test_gemm_ws_tiles(tile, bits, dtype):
    """The warp-specialized kernel on every tile ``--tune`` tries, with partial tiles in M, N and K steps (8-bit
    codes run the dense path)."""
    bm, bn, stages = tile
    cfg = Config("gemm_ws", bm, bn, 64, num_warps=WS_WARPS, num_stages=stages)
    for k, n in ((4096, 1000), (1056, 4096)):  # 1000 columns: a partial N tile; K = 1056: a partial K step
        layer = make_layer(k, n, bits, gen("ws", k, n, bits))
        for m in (1, 200, 1024):
            check_wa16(layer, m, dtype, gen("ws", k, n, bits, m, tile), cfg)


@pytest.mark.parametrize("bits, dtype, channels, warps, split", [
    (bits, dtype) + program for bits, dtype in ((2, torch.bfloat16), (2, torch.float16), (4, torch.bfloat16),
                                                (4, torch.float16)) for program in ((32, 1, 1), (64, 2, 4), (128, 4, 16))
] + [(2, torch.bfloat16, 32, 4, 1), (4, torch.float16, 32, 4, 1), (2, torch.float16, 64, 8, 3),
     (4, torch.bfloat16, 64, 8, 3), (2, torch.bfloat16, 32, 8, 2), (4, torch.float16, 32, 8, 2)])
def test_gemv_mma(bits, dtype, channels, warps, split):
    """The tensor-core decode kernel at 1..16 tokens (one and two token tiles): partial program tiles in N (N = 4000
    with 64 and 128 channels per program), split counts that do not divide the steps, rows of warps splitting a
    program's steps (4 rows of 1 and 2 warps, 8 rows of 1; ragged ranges on both shapes), token scales and bias; 17
    tokens fall back to the other kernels."""
    cfg = Config("gemv_mma", 16, channels, 128, split_k=split, num_warps=warps)
    for k, n in ((4096, 4000), (11008, 1024)):
        layer = make_layer(k, n, bits, gen("mma", k, n, bits))
        for m in (1, 2, 3, 5, 8, 9, 12, 16, 17):
            check_wa16(layer, m, dtype, gen("mma", k, n, bits, m, warps, split), cfg)
        check_token_scale_bias(layer, 3, dtype, cfg, "mma")


@hopper
@pytest.mark.parametrize("bits, dtype, tokens, block_n, block_k, warps, stages", [
    (2, BF16, 1, 64, 512, 4, 4), (2, F16, 2, 32, 512, 4, 3), (2, BF16, 4, 128, 256, 4, 6), (2, F16, 1, 64, 1024, 8, 1),
    (2, BF16, 4, 16, 1024, 4, 5), (2, BF16, 2, 32, 1024, 8, 2), (4, BF16, 2, 64, 512, 8, 4), (4, F16, 1, 32, 1024, 4, 2),
    (4, BF16, 4, 128, 256, 4, 3), (4, F16, 4, 16, 1024, 4, 3), (4, BF16, 1, 32, 1024, 8, 8), (4, F16, 2, 64, 256, 4, 2)])
def test_gemv_tma(bits, dtype, tokens, block_n, block_k, warps, stages):
    """The kernel fed by a TMA ring on programs of 1, 2 and 4 tokens, every token count up to them (the rows past the
    call's zeroed and not stored): partial column tiles (N = 4000), a last step past Kq and rows prepared in chunks (K =
    11008), one to six slots, token scales and bias; one token more than the programs take falls back to the other
    kernels."""
    cfg = Config("gemv_tma", tokens, block_n, block_k, num_warps=warps, num_stages=stages)
    for k, n in ((4096, 4000), (11008, 1024)):
        layer = make_layer(k, n, bits, gen("tma", k, n, bits))
        for m in range(1, tokens + 2):
            check_wa16(layer, m, dtype, gen("tma", k, n, bits, m, block_n, stages), cfg)
        check_token_scale_bias(layer, max(tokens - 1, 1), dtype, cfg, "tma")


@hopper
@pytest.mark.parametrize("bits, tokens, block_n, block_k, warps", [
    (2, 1, 64, 512, 4), (2, 1, 64, 512, 8), (4, 1, 32, 1024, 4), (2, 1, 16, 1024, 4), (4, 1, 16, 1024, 4),
    (2, 4, 16, 1024, 4), (4, 2, 32, 1024, 4)])
def test_gemv_tma_many_programs_repeated(bits, tokens, block_n, block_k, warps):
    """448 to 1792 programs on 8192 x 28672 (several per SM), 3 slots for 8 or 16 steps, 20 calls with fresh inputs: a
    slot refilled before the consumers' shared loads have read it shows up as a wrong call (without the proxy fence
    before the hand-back, 20 of 20 calls were wrong with 16 x 1024 tiles at one token, docs/KERNELS.md)."""
    k, n = 8192, 28672
    layer = make_layer(k, n, bits, gen("tma-many", bits))
    w = dequantize(layer.to_quantized_weight(), bits, dtype=torch.float64)
    cfg = Config("gemv_tma", tokens, block_n, block_k, num_warps=warps, num_stages=3)
    g = gen("tma-many-x", bits, block_n, warps, tokens)
    for call in range(20):
        x = torch.randn(tokens, k, device="cuda", generator=g).to(torch.bfloat16)
        out = poisoned(tokens, n, torch.bfloat16)
        launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None, None, bits,
                      layer.master_bits, k, torch.bfloat16, cfg, out)
        err = rel_err(out, x.double() @ w.T)
        assert not out.isnan().any() and err <= 1e-2, f"call {call}: rel err {err:.2e}"


@hopper
@pytest.mark.parametrize("bits, dtype, tokens, stages, split", [
    (2, BF16, 16, 3, 1), (2, F16, 32, 5, 3), (2, BF16, 64, 4, 2), (2, BF16, 128, 2, 1), (4, BF16, 16, 5, 2),
    (4, F16, 64, 3, 1), (4, BF16, 128, 5, 4), (4, F16, 32, 4, 5)])
def test_gemm_ra(bits, dtype, tokens, stages, split):
    """The register-operand wgmma kernel on programs of 16..128 tokens: token counts in one and several token tiles
    (partial ones), partial weight-row tiles (N = 4000), a last step past Kq (K = 1056), split counts that do not
    divide the steps, 2..5 slots, token scales and bias; split channels fall back to the other kernels."""
    cfg = Config("gemm_ra", tokens, 64, 128, split_k=split, num_warps=4, num_stages=stages)
    for k, n in ((4096, 4000), (1056, 1024)):
        layer = make_layer(k, n, bits, gen("ra", k, n, bits))
        for m in sorted({1, tokens - 1, tokens, tokens + 3, 2 * tokens + 1}):
            check_wa16(layer, m, dtype, gen("ra", k, n, bits, m, tokens, split), cfg)
        check_token_scale_bias(layer, tokens - 3, dtype, cfg, "ra")
    idx = split_region_index(list(range(5, 4096, 61)), 4096, 32, segments=4)
    check_wa16(make_layer(4096, 1024, bits, gen("ra-split", bits), idx), tokens, dtype, gen("ra-split", 1), cfg)


@hopper
@pytest.mark.parametrize("bits, dtype", [(2, BF16), (4, F16)])
def test_rule_on_shapes_the_table_does_not_list(bits, dtype):
    """The dispatch's own choice where the table has no entry (the Hopper rule, ``hopper_config``) on Llama-3-8B's
    fused QKV (4096 x 6144) and a partial shape (K = 1056, N = 4000) from one to 300 tokens: the ring GEMV, the
    decode kernel, the register-operand kernel and the dense path, each against the float64 reference."""
    ms = (1, 2, 5, 9, 16, 33, 100, 256, 300)
    for k, n in ((4096, 6144), (1056, 4000)):
        assert not any(table_key(bits, k, n, m) in TABLE for m in ms)
        layer = make_layer(k, n, bits, gen("rule", k, n, bits))
        for m in ms:
            check_wa16(layer, m, dtype, gen("rule", k, n, bits, m))


def test_ra_order_pass_matches_its_reference():
    """The register-operand kernel's activation order (a Triton pass) on the GPU, exactly as the torch reference."""
    g = gen("ra-order")
    for m, kq in ((1, 4096), (37, 1056), (256, 28672)):
        x = torch.randn(m, kq, device="cuda", generator=g).to(torch.bfloat16)
        assert torch.equal(launch_ra_order(x), ra_order(x))


@hopper
def test_gemm_ra_many_programs_repeated():
    """896 programs of 64 tokens on 8192 x 28672 (two per SM, several waves), 3 slots for 128 steps, 20 calls with
    fresh inputs: a slot handed back to the loader before its reads were done would show up as a wrong call."""
    k, n = 8192, 28672
    layer = make_layer(k, n, 2, gen("ra-many"))
    w = dequantize(layer.to_quantized_weight(), 2, dtype=torch.float64)
    cfg = Config("gemm_ra", 64, 64, 128, num_warps=4, num_stages=3)
    g = gen("ra-many-x")
    for call in range(20):
        x = torch.randn(128, k, device="cuda", generator=g).to(torch.bfloat16)
        out = poisoned(128, n, torch.bfloat16)
        launch_linear(x, layer.packed, layer.scales, layer.zeros, layer.row_scale, None, None, None, 2,
                      layer.master_bits, k, torch.bfloat16, cfg, out)
        err = rel_err(out, x.double() @ w.T)
        assert not out.isnan().any() and err <= 1e-2, f"call {call}: rel err {err:.2e}"


@hopper
def test_gemm_ws_split_channels_token_scale_bias_and_graphs():
    """Split channels (expanded input), W2A2 (token scales), bias, and a CUDA-graph replay through the kernel."""
    k, n = 4096, 1024
    idx = split_region_index(list(range(5, k, 61)), k, 32, segments=4)
    layer = make_layer(k, n, 2, gen("wss"), idx)
    cfg = Config("gemm_ws", 256, 128, 64, num_warps=WS_WARPS, num_stages=4)
    check_wa16(layer, 300, torch.bfloat16, gen("wss", 1), cfg)
    bias = torch.randn(n, device="cuda", generator=gen("wsb")).to(torch.bfloat16)
    w = dequantize(layer.to_quantized_weight(), 2, dtype=torch.float64)
    x = torch.randn(300, k, device="cuda", generator=gen("wss", 2)).to(torch.bfloat16)

    def run(inp):
        return launch_linear_wa(inp, layer.packed, layer.scales, layer.zeros, layer.row_scale, layer.split_index, bias,
                                2, 8, 2, torch.bfloat16, cfg)

    out = run(x)
    ref = dequantize_activations(quantize_activations(x.cpu(), 2, idx), torch.float64).cuda() @ w.T + bias.double()
    assert not out.isnan().any() and rel_err(out, ref) <= 1e-2
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run(static_x)
    fresh = torch.randn(300, k, device="cuda", generator=gen("wss", 3)).to(torch.bfloat16)
    static_x.copy_(fresh)
    graph.replay()
    assert torch.equal(static_out, run(fresh))


@pytest.mark.parametrize("k", sorted({k for k, _ in SHAPES}))
@pytest.mark.parametrize("act_bits", [2, 4, 8])
def test_actquant_bit_exact(k, act_bits):
    idx = split_region_index(list(range(0, k, 97)), k, 32, segments=2).cuda()
    for m in (1, 300, 1024):
        x = torch.randn(m, k, device="cuda", generator=gen("q", k, act_bits, m)) * 3
        x[0, :64] = 0.0
        x = x.to(torch.bfloat16)
        xq, ts, codes, scales, zeros = launch_actquant(x, idx, act_bits, write_codes=True)
        ref = quantize_activations(x.cpu(), act_bits, idx.cpu())
        xq, ts, codes, scales, zeros = (t.cpu() for t in (xq, ts, codes, scales, zeros))
        assert torch.equal(codes, ref.codes) and torch.equal(zeros, ref.zeros)
        assert torch.equal(scales, ref.scales.view(torch.uint8))
        assert torch.equal(ts * 2.0**-act_bits, ref.token_scale)
        deq = dequantize_activations(ref, torch.float64)
        assert torch.allclose(xq.double() * ts.double()[:, None], deq, rtol=2**-11, atol=0)
        xd, _ = launch_actquant(x, idx, act_bits, dequant_dtype=torch.float32)
        assert torch.equal(xd.cpu(), dequantize_activations(ref, torch.float32))


STAGED_TILES = [ActQuantTile(groups, warps, staged=True, columns=columns)
                for groups, warps, columns in ((128, 8, 16), (64, 4, 16), (64, 8, 8), (64, 2, 32))]


@pytest.mark.parametrize("tile", STAGED_TILES, ids=lambda t: f"groups{t.groups}-warps{t.warps}-columns{t.columns}")
@pytest.mark.parametrize("k,splits", [(1040, 0), (4096, 0), (4096, 2100), (11008, 0), (11008, 300), (28672, 40)])
def test_staged_actquant_bit_exact(tile, k, splits):
    """The Gluon kernel that stages rows in shared memory: codes, bytes, xq and the dequantized activations equal
    the reference's, with padding columns (K = 1040), rows that end inside a chunk and split slots (about
    ``splits``; on 4096 more than a chunk of them)."""
    idx = split_region_index(list(range(3, k, k // splits)), k, 32).cuda() if splits else None
    for act_bits, m in ((2, 300), (4, 5), (8, 64)):
        x = (torch.randn(m, k, device="cuda", generator=gen("st", k, splits, act_bits)) * 3).to(torch.bfloat16)
        x[0] = 0.0
        ref = quantize_activations(x.cpu(), act_bits, None if idx is None else idx.cpu())
        xq, ts, codes, scales, zeros = (t.cpu() for t in launch_actquant(x, idx, act_bits, True, tile=tile))
        assert torch.equal(codes, ref.codes) and torch.equal(zeros, ref.zeros)
        assert torch.equal(scales, ref.scales.view(torch.uint8))
        assert torch.equal(ts * 2.0**-act_bits, ref.token_scale)
        assert torch.equal(xq, launch_actquant(x, idx, act_bits, tile=ActQuantTile(32, 4))[0].cpu())
        xd, _ = launch_actquant(x, idx, act_bits, dequant_dtype=torch.float32, tile=tile)
        assert torch.equal(xd.cpu(), dequantize_activations(ref, torch.float32))


@pytest.mark.parametrize("act_bits", [None, 2])
def test_split_channels_and_bias_through_ops_linear(act_bits):
    k, n = 4096, 1024
    idx = split_region_index(list(range(5, k, 61)), k, 32, segments=4)
    layer = make_layer(k, n, 2, gen("s", act_bits), idx)
    qw = layer.to_quantized_weight()
    bias = torch.randn(n, device="cuda", generator=gen("b")).to(torch.bfloat16)
    w = dequantize(qw, 2, dtype=torch.float64)
    for m in (1, 7, 200):
        x = torch.randn(m, k, device="cuda", generator=gen("s", act_bits, m)).to(torch.bfloat16)
        out = linear(x, layer, act_bits, bias)
        if act_bits is None:
            ref = expand_input(x.double(), idx.cuda(), 32) @ w.T + bias.double()
        else:
            ref = dequantize_activations(quantize_activations(x.cpu(), act_bits, idx), torch.float64).cuda() @ w.T
            ref = ref + bias.double()
        assert out.dtype == torch.bfloat16 and not out.isnan().any()
        assert rel_err(out, ref) <= 1e-2


def test_cuda_graph_and_torch_compile():
    layer = make_layer(4096, 4096, 2, gen("g"))
    x = torch.randn(4, 4096, device="cuda", generator=gen("g", 1)).to(torch.bfloat16)

    def f(inp):
        return linear(inp, layer) + linear(inp, layer, act_bits=2)

    eager = f(x)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x), eager)
    static_x = x.clone()
    f(static_x)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = f(static_x)
    fresh = torch.randn(4, 4096, device="cuda", generator=gen("g", 2)).to(torch.bfloat16)
    static_x.copy_(fresh)
    graph.replay()
    assert torch.equal(static_out, f(fresh))


@hopper
@pytest.mark.parametrize("bits, m, act_bits, config", [
    (2, 1, None, Config("gemv_tma", 1, 16, 1024, num_warps=4, num_stages=2)),
    (4, 2, None, Config("gemv_tma", 2, 16, 1024, num_warps=4, num_stages=3)),
    (2, 1, 2, Config("gemv_tma", 1, 32, 1024, num_warps=8, num_stages=4)),
    (2, 2, None, Config("gemv_tma", 2, 32, 1024, num_warps=4, num_stages=2)),
    (2, 8, None, Config("gemv_mma", 8, 32, 128, split_k=4, num_warps=4)),
    (4, 3, None, Config("gemv_h2", 4, 128, 2, split_k=4, num_warps=1)),
    (2, 16, None, Config("gemm_t", 16, 64, 64, split_k=4, num_warps=4, num_stages=3)),
    (2, 64, None, Config("gemm_ra", 64, 64, 128, split_k=4, num_warps=4, num_stages=5)),
    (4, 32, 4, Config("gemm_ra", 32, 64, 128, split_k=2, num_warps=4, num_stages=3)),
    (2, 2, 4, None)])
def test_pdl_chain_matches_launches_without_it(bits, m, act_bits, config):
    """Four layers back to back, each reading the previous one's output, launched with programmatic dependent launch
    (each kernel's programs launch while the one before finishes, :mod:`kernels.pdl`): eagerly and as 10 replays of a
    captured graph, bit-identical to the same chain without PDL (a read of the activations, the split-K workspace or
    counters before the wait would see the previous layer's unfinished output). The TMA ring on 256 programs, on 128
    with one per SM, and on 128 of which two fit on an SM (launched without PDL: ``pdl_keeps_balance``); the
    activation quantizer before the ring; the decode, half2 and ``W @ x^T`` kernels and the register-operand wgmma kernel
    (also after the quantizer) with split-K."""
    from kernels import pdl

    g = gen("pdl", bits, m, act_bits)
    layers = [make_layer(4096, 4096, bits, g) for _ in range(4)]
    x = (torch.randn(m, 4096, device="cuda", generator=g) / 64).to(torch.bfloat16)

    def chain(inp: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            args = (inp, layer.packed, layer.scales, layer.zeros, layer.row_scale, None)
            inp = (launch_linear(*args, None, None, bits, layer.master_bits, 4096, BF16, config) if act_bits is None
                   else launch_linear_wa(*args, None, bits, layer.master_bits, act_bits, BF16, config))
        return inp

    before = pdl.ENABLED
    try:
        pdl.ENABLED = False
        plain = chain(x)
        pdl.ENABLED = True
        assert torch.equal(chain(x), plain)
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = chain(static_x)
    finally:
        pdl.ENABLED = before
    assert plain.isfinite().all()
    for _ in range(10):
        graph.replay()
        assert torch.equal(static_out, plain)
