"""The Triton kernels on the CPU, under ``TRITON_INTERPRET=1``, against the reference ops (small shapes).

The module re-runs itself in a subprocess with ``TRITON_INTERPRET=1`` (``tests/interpreted.py``):
in the parent it holds one test that starts that run; in the child it holds the kernel tests.
"""

from __future__ import annotations

import pytest
from interpreted import INTERPRETED, rerun_interpreted

if not INTERPRETED:
    def test_triton_kernels_under_the_interpreter():
        rerun_interpreted(__file__, timeout=900)

else:
    import numpy as np
    import torch
    import triton.language as tl
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime import interpreter

    from kernels.actquant import dequantize_activations, quantize_activations
    from kernels.gluon_gemm import group_means, zero_terms
    from kernels.gluon_gemm_ra import launch_gemm_ra, launch_ra_order, ra_order, ra_plan, ra_programs, ra_split
    from kernels.gluon_stream import launch_gemv_tma
    from kernels.grid import affine_params, dequantize, slice_codes
    from kernels.ops import pack_linear
    from kernels.reference import linear_wa, linear_wa16
    from kernels.split import expand_input, quantize_split_weight, split_region_index
    from kernels import triton_ops
    from kernels.bench import candidates
    from kernels.triton_ops import ActQuantTile, Config, launch_actquant, launch_linear, launch_linear_wa

    _dot = interpreter.InterpreterBuilder.create_dot

    def _dot_bf16_as_fp32(self, a, b, d, input_precision, max_num_imprecise_acc):
        """The interpreter keeps bf16 as raw uint16 and multiplies those integers; widen to fp32 first."""
        def widen(h):
            if h.dtype.scalar != tl.bfloat16:
                return h
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return _dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = _dot_bf16_as_fp32

    K = 72  # Kq = 128: two groups of x, one partly padding, one of split slots
    SPLITS = [3, 40, 71]

    def layer(bits: int, n: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, K, generator=g) * torch.rand(n, 1, generator=g)
        return pack_linear(quantize_split_weight(w, split_region_index(SPLITS, K, 32)), bits)

    def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
        return ((out.double() - ref.double()).norm() / ref.double().norm()).item()

    def run(x, lay, cfg, dtype, token_scale=None, split=True, bias=None, in_features=K):
        out = torch.full((x.shape[0], lay.out_features), float("nan"), dtype=dtype)
        launch_linear(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, lay.split_index if split else None,
                      token_scale, bias, lay.bits, lay.master_bits, in_features, dtype, cfg, out)
        assert not out.isnan().any(), "an output element was not written"
        return out

    # The interpreter rounds fp32 -> bf16/fp16 by truncation, so its bf16 outputs carry up to 2^-8.
    TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}

    @pytest.mark.parametrize("bits", [2, 3, 4, 8])
    @pytest.mark.parametrize("m, cfg", [(1, Config("gemv", 1, 8, 2)), (2, Config("gemv", 2, 8, 1, split_k=2)),
                                        (2, Config("gemv", 2, 16, 2, split_k=3)),
                                        (5, Config("gemm", 16, 16, 32, split_k=3)),
                                        (5, Config("gemm_t", 16, 16, 32, split_k=3)),
                                        (4, Config("gemm_t", 16, 16, 32, split_k=2)),
                                        (19, Config("gemm", 16, 16, 64, group_m=2)),
                                        (19, Config("gemm_t", 16, 16, 64, group_m=2))])
    def test_linear_wa16_matches_reference(bits, m, cfg):
        lay = layer(bits, seed=bits)
        dtype = (torch.bfloat16, torch.float16)[m % 2]
        x = torch.randn(m, K).to(dtype)
        bias = torch.randn(lay.out_features).to(dtype) if m == 5 else None
        ref = linear_wa16(x.double(), lay.to_quantized_weight(), bits, bias=None if bias is None else bias.double())
        assert rel_err(run(x, lay, cfg, dtype, bias=bias), ref) < TOL[dtype]

    def test_linear_fp32_input_and_row_major_storage():
        lay = layer(2, seed=7)
        rowmajor = type(lay)(lay.packed.contiguous(), lay.scales.contiguous(), lay.zeros.contiguous(), lay.row_scale,
                             lay.split_index, 2, K, 32)
        x = torch.randn(3, K)
        ref = linear_wa16(x.double(), lay.to_quantized_weight(), 2)
        for cfg in (Config("gemv", 1, 8, 2), Config("gemm", 16, 16, 32), Config("gemm_t", 16, 16, 32)):
            xs = x[:1] if cfg.kernel == "gemv" else x
            assert rel_err(run(xs, rowmajor, cfg, torch.float32), ref[: xs.shape[0]]) < 1e-5

    def hard_activations(seed: int, dtype: torch.dtype) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(5, K, generator=g) * 10 * torch.rand(5, 1, generator=g)
        x[1] = 0.0  # all-zero token
        x[2, 30:64] = 0.0  # all-zero group
        x[3] *= 1e-6
        return x.to(dtype)

    # the default launch (one chunk per row here) and chunks of one group, two passes, pipelined loops
    ACTQUANT_TILES = [None, ActQuantTile(1, 4, stages=2)]

    @pytest.mark.parametrize("act_bits", [2, 3, 4, 8])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("tile", ACTQUANT_TILES)
    def test_actquant_is_bit_exact(act_bits, dtype, tile):
        x = hard_activations(act_bits, dtype)
        idx = split_region_index(SPLITS, K, 32)
        xq, ts, codes, scales, zeros = launch_actquant(x, idx, act_bits, write_codes=True, tile=tile)
        ref = quantize_activations(x, act_bits, idx)
        assert torch.equal(codes, ref.codes)
        assert torch.equal(scales, ref.scales.view(torch.uint8))
        assert torch.equal(zeros, ref.zeros)
        assert torch.equal(ts * 2.0**-act_bits, ref.token_scale)
        deq = dequantize_activations(ref, torch.float64)
        assert torch.allclose(xq.double() * ts.double()[:, None], deq, rtol=2**-11, atol=0)

    def test_actquant_off_the_gpu_takes_the_triton_kernel():
        """Many long rows on the CPU get a Triton launch (the rule checks that the staged Gluon kernel can run), and
        asking for the staged kernel there is an error that says what it needs."""
        x = torch.randn(1024, 14336, dtype=torch.bfloat16)
        assert not triton_ops.actquant_tile(x, 14336).staged
        with pytest.raises(ValueError, match="staged activation quantization .* on a CUDA GPU"):
            launch_actquant(x[:2], None, 2, tile=ActQuantTile(128, 8, staged=True, columns=16))

    @pytest.mark.parametrize("tile", ACTQUANT_TILES)
    def test_actquant_writes_dequantized_activations(tile):
        """``dequant_dtype``: the format's dequantized activations, exactly in fp32 (in bf16 up to the
        interpreter's truncating conversion)."""
        idx = split_region_index(SPLITS, K, 32)
        x = hard_activations(9, torch.bfloat16)
        ref = dequantize_activations(quantize_activations(x, 2, idx), torch.float32)
        xd, ts = launch_actquant(x, idx, 2, dequant_dtype=torch.float32, tile=tile)
        assert xd.dtype == torch.float32 and torch.equal(xd, ref)
        assert torch.equal(ts * 0.25, quantize_activations(x, 2, idx).token_scale)
        xd, _ = launch_actquant(x, idx, 2, dequant_dtype=torch.bfloat16, tile=tile)
        assert xd.dtype == torch.bfloat16 and torch.allclose(xd.float(), ref, rtol=2**-7, atol=0)

    @pytest.mark.parametrize("bits, act_bits", [(2, 2), (4, 4), (3, 8)])
    @pytest.mark.parametrize("m, cfg", [(1, Config("gemv", 1, 8, 2)), (6, Config("gemm", 16, 16, 32, split_k=2)),
                                        (6, Config("gemm_t", 16, 16, 32, split_k=2))])
    def test_linear_wa_matches_reference(bits, act_bits, m, cfg):
        lay = layer(bits, seed=10 + bits)
        x = torch.randn(m, K, dtype=torch.bfloat16)
        xq, ts = launch_actquant(x, lay.split_index, act_bits)
        out = run(xq, lay, cfg, torch.bfloat16, token_scale=ts, split=False, in_features=xq.shape[1])
        ref = linear_wa(x.double(), lay.to_quantized_weight(), bits, act_bits)
        assert rel_err(out, ref) < TOL[torch.bfloat16]

    def test_custom_ops_run_and_have_fake_shapes():
        lay = layer(2)
        args = (lay.packed, lay.scales, lay.zeros, lay.row_scale)
        x = torch.randn(2, 1, K, dtype=torch.float16)
        y = torch.ops.bitbybit.linear(x, *args, lay.split_index, None, None, 2, 8, K, torch.float16)
        assert y.shape == (2, 1, lay.out_features) and y.dtype == torch.float16
        assert rel_err(y, linear_wa16(x.double(), lay.to_quantized_weight(), 2)) < TOL[torch.float16]
        xq, ts = torch.ops.bitbybit.quantize_act(x, lay.split_index, 2)
        assert xq.shape == (2, 1, 128) and ts.shape == (2, 1)
        with FakeTensorMode() as mode:
            fx = mode.from_tensor(torch.empty(7, K, dtype=torch.bfloat16))
            fargs = [mode.from_tensor(t) for t in (*args, lay.split_index)]
            fy = torch.ops.bitbybit.linear(fx, *fargs, None, None, 2, 8, K, torch.bfloat16)
            fq, fts = torch.ops.bitbybit.quantize_act(fx, fargs[-1], 4)
        assert fy.shape == (7, lay.out_features) and fy.dtype == torch.bfloat16
        assert fq.shape == (7, 128) and fq.dtype == torch.float16 and fts.shape == (7,)

    def test_eager_calls_skip_the_dispatcher_and_compiled_graphs_keep_the_op():
        """``ops_for``: eager code calls the ops' functions directly (the same numbers as the custom op); fake tensors
        and the graph torch.compile records get the custom op."""
        lay = layer(2)
        args = (lay.packed, lay.scales, lay.zeros, lay.row_scale, lay.split_index, None, None, 2, 8, K, torch.float16)
        x = torch.randn(3, K, dtype=torch.float16)
        assert triton_ops.ops_for(x) is triton_ops.EAGER_OPS
        y = triton_ops.ops_for(x).linear(x, *args)
        assert torch.equal(y, torch.ops.bitbybit.linear(x, *args))
        with FakeTensorMode() as mode:
            assert triton_ops.ops_for(mode.from_tensor(x)) is torch.ops.bitbybit
        graphs = []

        def record(gm, inputs):
            graphs.append(gm)
            return gm.forward

        compiled = torch.compile(lambda t: triton_ops.ops_for(t).linear(t, *args), backend=record, fullgraph=True)
        assert torch.equal(compiled(x), y)
        assert [n.target for n in graphs[0].graph.nodes if n.op == "call_function"] == [torch.ops.bitbybit.linear]

    @pytest.mark.parametrize("bits", [2, 3])
    def test_dense_path_matches_reference(bits):
        """Dequantize-then-matmul, with bias and on quantized activations."""
        lay = layer(bits, seed=20 + bits)
        dense = Config("dense", 0, 16, 32)
        x = torch.randn(3, K, dtype=torch.float16)
        bias = torch.randn(lay.out_features, dtype=torch.float16)
        ref = linear_wa16(x.double(), lay.to_quantized_weight(), bits, bias=bias.double())
        assert rel_err(run(x, lay, dense, torch.float16, bias=bias), ref) < TOL[torch.float16]
        xq, ts = launch_actquant(x, lay.split_index, 4)
        out = run(xq, lay, dense, torch.float16, token_scale=ts, split=False, in_features=xq.shape[1])
        ref = linear_wa(x.double(), lay.to_quantized_weight(), bits, 4, bias=bias.double())
        assert rel_err(out + bias, ref) < TOL[torch.float16]
        # W{b}A{a} in one call: the quantizer writes dequantized activations for cuBLAS
        out = launch_linear_wa(x, lay.packed, lay.scales, lay.zeros, lay.row_scale, lay.split_index, bias, bits,
                               lay.master_bits, 4, torch.float16, dense)
        assert rel_err(out, ref) < TOL[torch.float16]

    def test_warp_specialized_config_off_hopper_runs_the_dense_path():
        """``Config("gemm_ws")`` needs a Hopper GPU (and Gluon has no interpreter): elsewhere the dense path runs."""
        lay = layer(2, seed=24)
        x = torch.randn(3, K, dtype=torch.bfloat16)
        out = run(x, lay, Config("gemm_ws", 256, 128, 64, num_warps=12, num_stages=4), torch.bfloat16)
        assert torch.equal(out, run(x, lay, triton_ops.DENSE, torch.bfloat16))
        assert rel_err(out, linear_wa16(x.double(), lay.to_quantized_weight(), 2)) < TOL[torch.bfloat16]

    def test_tma_gemv_config_off_hopper_runs_the_rule():
        """``Config("gemv_tma")`` needs a Hopper GPU (Gluon, TMA): elsewhere the rule's kernel for the shape runs;
        a tile (or a token count) the kernel cannot take is refused with what it takes."""
        lay = layer(2, seed=25)
        for m, tokens in ((1, 1), (3, 4)):
            x = torch.randn(m, K, dtype=torch.bfloat16)
            out = run(x, lay, Config("gemv_tma", tokens, 32, 512, num_warps=4, num_stages=4), torch.bfloat16)
            rule = triton_ops.default_config(2, m, lay.out_features, 128, mma=False)
            assert torch.equal(out, run(x, lay, rule, torch.bfloat16))
            assert rel_err(out, linear_wa16(x.double(), lay.to_quantized_weight(), 2)) < TOL[torch.bfloat16]
        for m, tokens, bn, bk, warps, match in ((1, 1, 16, 1024, 2, "multiple of 4 warps"),
                                                (1, 1, 48, 512, 4, "block_n 16, 32, 64 or 128"),
                                                (1, 1, 32, 256, 4, "threads sharing a column"),
                                                (3, 2, 32, 512, 4, "got 3 tokens on block_m 2"),
                                                (1, 3, 32, 512, 4, "block_m 1, 2 or 4")):
            with pytest.raises(ValueError, match=match):
                launch_gemv_tma(torch.zeros(m, 128, dtype=torch.bfloat16), lay.packed, lay.scales, lay.zeros,
                                lay.row_scale, None, None, 2, 1.0, 1.5, 1.0, tokens, bn, bk, 4, warps, out)

    def test_register_operand_config_off_hopper_runs_the_rule():
        """``Config("gemm_ra")`` needs a Hopper GPU (Gluon, TMA, wgmma): elsewhere the rule's kernel for the shape
        runs; a token tile or ring the kernel cannot take is refused with what it takes."""
        lay = layer(2, seed=26)
        for m in (3, 20):
            x = torch.randn(m, K, dtype=torch.bfloat16)
            out = run(x, lay, Config("gemm_ra", 32, 64, 128, num_warps=4, num_stages=5), torch.bfloat16)
            rule = triton_ops.default_config(2, m, lay.out_features, 128)
            assert torch.equal(out, run(x, lay, rule, torch.bfloat16))
            assert rel_err(out, linear_wa16(x.double(), lay.to_quantized_weight(), 2)) < TOL[torch.bfloat16]
        for tokens, stages, match in ((24, 3, "block_m in"), (64, 1, "at least 2 stages"), (128, 40, "bytes of slots")):
            with pytest.raises(ValueError, match=match):
                launch_gemm_ra(torch.zeros(tokens, 128, dtype=torch.bfloat16), lay.packed, lay.scales, lay.zeros,
                               lay.row_scale, None, None, 2, 1.0, 1.5, 1.0, tokens, stages, 1, torch.empty(1),
                               torch.zeros(1, dtype=torch.int32), torch.empty(tokens, lay.out_features))

    def test_register_operand_programs_per_sm_follow_the_waves():
        """Three programs per SM (fewer registers) only where their rings fit, at most 64 tokens, and the grid then
        needs fewer waves than at two per SM."""
        assert ra_programs(344, 132, 16, 5, 2) == 3  # one wave of three instead of two of two
        assert ra_programs(1024, 132, 32, 5, 4) == 3  # three waves instead of four
        assert ra_programs(256, 132, 16, 5, 2) == 2  # one wave of two: three would leave SMs idle
        assert ra_programs(512, 132, 16, 5, 2) == 2  # two waves either way
        assert ra_programs(1024, 132, 128, 2, 2) == 2  # the accumulator of 128 tokens needs the registers
        assert ra_programs(1024, 132, 64, 5, 2) == 2  # three rings of five 64-token slots do not fit

    def test_register_operand_split_fills_the_sms_with_long_enough_splits():
        """Split-K of the register-operand kernel: the most power-of-two splits that keep 64-row programs within two
        (or three) per SM on 132 SMs, while each split keeps at least 512 columns (four 128-K steps)."""
        assert ra_split(4096, 4096, 1, 132) == 4  # 64 row tiles: 256 programs of 8 steps
        assert ra_split(4096, 14336, 1, 132) == 4  # the same tiles, 28 steps each
        assert ra_split(8192, 8192, 1, 132) == 2  # 128 row tiles: 256 programs
        assert ra_split(14336, 4096, 1, 132) == 1  # 224 row tiles
        assert ra_split(8192, 8192, 2, 132) == 1  # two token tiles: 256 programs
        assert ra_split(4096, 1024, 1, 132, 3) == 2  # 8 steps: four splits would leave 2 per program
        assert ra_split(6144, 4096, 1, 132) == 2 and ra_split(6144, 4096, 1, 132, 3) == 4  # 192 or 384 programs

    def test_register_operand_plan_for_untuned_shapes():
        """:func:`ra_plan`: tokens rounded up to a power of two (at most 128, more in token tiles); up to three
        programs per SM where three rings fit at 64 tokens or fewer (at 64, only where each split keeps 24 steps); the
        deepest ring that runs the grid in the fewest waves (a shallower one where only it lets three programs share
        an SM)."""
        assert ra_plan(16, 5120, 5120, 2, 132) == (16, 4, 5)  # 80 row tiles: 320 programs, three per SM at depth 5
        assert ra_plan(64, 5120, 13824, 2, 132) == (64, 4, 3)  # three per SM need the 3-slot ring at 64 tokens
        assert ra_plan(64, 22016, 4096, 2, 132) == (64, 1, 3)  # 344 programs: one wave of three per SM
        assert ra_plan(64, 6144, 4096, 2, 132) == (64, 2, 5)  # three per SM would leave splits of 8 steps
        assert ra_plan(64, 8192, 8192, 2, 132) == (64, 2, 5)  # 256 programs: one wave of two, the deep ring
        assert ra_plan(100, 4096, 11008, 4, 132) == (128, 4, 3)  # 128 tokens: two per SM
        assert ra_plan(256, 8192, 8192, 2, 132) == (128, 1, 3)  # two token tiles

    def test_register_operand_order_gives_each_lane_its_group():
        """:func:`ra_order` moves group ``c`` of each 128-column block to the K positions wgmma's A operand gives lane
        ``c`` of a quad (``(k % 8) // 2 == c``), column ``16 W + 8 h + 2 t + u`` of the group to the position ``64 W
        + 16 t + 8 u + 2 c + h`` (the halves of a W2 word shifted by ``4 t``, bits ``2 u``), pads to whole blocks with
        zeros, and keeps every dot product."""
        kq = 352  # two whole blocks and one of three groups
        order = ra_order(torch.arange(1, kq + 1, dtype=torch.float64)[None])[0].long() - 1
        assert order.shape == (384,)
        pos = torch.arange(384)
        lane, half, chunk, reg, h = (pos % 8) // 2, (pos % 128) // 64, (pos // 16) % 4, (pos // 8) % 2, pos % 2
        kept = order >= 0  # the padding: lane 3's positions of the last block
        assert torch.equal(kept, (pos < 256) | (lane < 3)) and torch.equal(order[kept].sort().values, torch.arange(kq))
        src = order[kept]
        assert torch.equal(src // 32, ((pos // 128) * 4 + lane)[kept])
        assert torch.equal(src % 32, (16 * half + 8 * h + 2 * chunk + reg)[kept])
        g = torch.Generator().manual_seed(31)
        x = torch.randn(5, kq, generator=g, dtype=torch.float64)
        w = torch.randn(7, kq, generator=g, dtype=torch.float64)
        assert torch.allclose(ra_order(x) @ ra_order(w).T, x @ w.T)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_register_operand_order_pass_matches_its_reference(dtype):
        """The order pass (Triton) writes :func:`ra_order` exactly, on whole and partial blocks, rows of a strided
        input and a transposed one."""
        g = torch.Generator().manual_seed(32)
        for m, kq in ((3, 128), (2, 352), (1, 2080)):
            x = torch.randn(m, kq + 32, generator=g).to(dtype)[:, :kq]
            assert torch.equal(launch_ra_order(x), ra_order(x))
        xt = torch.randn(96, 5, generator=g).to(dtype).t()
        assert torch.equal(launch_ra_order(xt), ra_order(xt))

    @pytest.mark.parametrize("bits", [2, 4])
    def test_warp_specialized_operands_carry_the_zero_points(bits):
        """The warp-specialized kernel's split ``x W_b^T = x (q c)^T + means(x) zero_terms^T`` (times the column
        scale ``row_scale 256 2^(8-b)``): its two operand kernels, :func:`group_means` and :func:`zero_terms`, hold
        the zero points' part with the format's signs and scales (up to their one rounding to fp16)."""
        lay = layer(bits, n=40, seed=7)
        qw = lay.to_quantized_weight()
        x = expand_input(torch.randn(9, K), lay.split_index, 32).to(torch.float16)
        step_b, zero_b = affine_params(qw, bits)
        q = slice_codes(qw.codes, bits, qw.master_bits).double()
        codes_part = x.double() @ (q * step_b.double().repeat_interleave(32, dim=1)).T
        _, _, consts = triton_ops.weight_args(bits, lay.master_bits, x.shape[1])
        means, zt = group_means(x), zero_terms(lay.scales, lay.zeros, consts["ZOFF"], consts["ZMUL"], torch.float16)
        assert means.stride(0) % 8 == 0 and zt.stride(0) % 8 == 0  # rows 16-byte aligned for TMA
        col_scale = lay.row_scale.double() * 256 * 2 ** (lay.master_bits - bits)
        out = codes_part + (means.double() @ zt.double().T) * col_scale
        ref = x.double() @ dequantize(qw, bits, dtype=torch.float64).T
        assert rel_err(out, ref) < TOL[torch.float16]
        assert rel_err(means, x.double().view(9, -1, 32).mean(dim=2)) < 2 ** -10  # fp16, truncated here

    class Unrolled:
        """Launches a half2 GEMV kernel with ``UNROLL`` steps per loop iteration."""

        def __init__(self, kernel, unroll: int) -> None:
            self.kernel, self.unroll = kernel, unroll

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.kernel[grid](*args, **kwargs, UNROLL=self.unroll)

    @pytest.mark.parametrize("bits", [2, 4, 8])
    @pytest.mark.parametrize("unroll", [1, 2])
    @pytest.mark.parametrize("m, cfg", [(1, Config("gemv_h2", 1, 8, 2)), (2, Config("gemv_h2", 2, 16, 1, split_k=3)),
                                        (1, Config("gemv_h2", 1, 8, 4)),  # one step, odd for UNROLL=2
                                        # whole-column tiles (per-group accumulators); the second split is empty
                                        (1, Config("gemv_h2", 1, 8, 8)), (2, Config("gemv_h2", 2, 8, 8, split_k=2))])
    def test_gemv_h2_matches_reference(bits, unroll, m, cfg, monkeypatch):
        """The half2 GEMV (plain-op twins of its PTX) with split channels, K padding and a 1e4 outlier channel."""
        monkeypatch.setattr(triton_ops, "gemv_h2_kernel", Unrolled(triton_ops.gemv_h2_kernel, unroll))
        lay = layer(bits, seed=30 + bits)
        for dtype in (torch.bfloat16, torch.float16):
            x = torch.randn(m, K)
            x[0, 5] = 1e4
            x = x.to(dtype)
            ref = linear_wa16(x.double(), lay.to_quantized_weight(), bits)
            assert rel_err(run(x, lay, cfg, torch.float32), ref) < 2e-3  # fp16 products and group sums only
            assert rel_err(run(x, lay, cfg, dtype), ref) < TOL[dtype]

    def test_gemv_h2_quantized_activations_and_limits():
        lay = layer(2, seed=40)
        x = torch.randn(1, K, dtype=torch.bfloat16)
        xq, ts = launch_actquant(x, lay.split_index, 4)
        out = run(xq, lay, Config("gemv_h2", 1, 16, 1), torch.bfloat16, token_scale=ts, split=False,
                  in_features=xq.shape[1])
        assert rel_err(out, linear_wa(x.double(), lay.to_quantized_weight(), 2, 4)) < TOL[torch.bfloat16]
        with pytest.raises(ValueError, match="gemv_h2"):
            run(x.float(), lay, Config("gemv_h2", 1, 16, 1), torch.float32)
        with pytest.raises(ValueError, match="gemv_h2"):
            run(x, layer(3), Config("gemv_h2", 1, 16, 1), torch.bfloat16)

    class KernelSpy:
        """Wraps a Triton kernel and records the grid of every launch."""

        def __init__(self, kernel) -> None:
            self.kernel, self.grids = kernel, []

        def __getitem__(self, grid):
            self.grids.append(grid)
            return self.kernel[grid]

    def dispatch_spied(lay, bits: int, m: int, monkeypatch):
        """The dispatch (no configuration given) on bf16, then fp32 inputs, both checked against the reference
        op, with the two GEMV kernels spied: their launch grids ``(half2, fp32)`` after the bf16 call and
        after both."""
        h2, gemv = KernelSpy(triton_ops.gemv_h2_kernel), KernelSpy(triton_ops.gemv_kernel)
        monkeypatch.setattr(triton_ops, "gemv_h2_kernel", h2)
        monkeypatch.setattr(triton_ops, "gemv_kernel", gemv)
        x = torch.randn(m, K)
        ref = linear_wa16(x.double(), lay.to_quantized_weight(), bits)
        assert rel_err(run(x.to(torch.bfloat16), lay, None, torch.bfloat16), ref) < TOL[torch.bfloat16]
        after_bf16 = (list(h2.grids), list(gemv.grids))
        assert rel_err(run(x, lay, None, torch.float32), ref) < TOL[torch.float32]
        return after_bf16, (h2.grids, gemv.grids)

    @pytest.mark.parametrize("bits, m", [(2, 1), (2, 3), (2, 4), (4, 3), (4, 4)])
    def test_rule_runs_the_half2_gemv_for_few_tokens(bits, m, monkeypatch):
        """Without a table entry, 2-bit weights up to 4 tokens and 4-bit ones at 3..4 tokens take the half2
        GEMV for 16-bit inputs and the fp32 GEMV for fp32 inputs (on the same tile, or on its own where the rule's
        tile is a whole-column one, as at one token), both matching the reference. The rule names the TMA-ring GEMV
        at one and two tokens and the tensor-core decode kernel at 3..4, which need a (Hopper) GPU: off it, the half2
        GEMV is the fallback."""
        lay = layer(bits, seed=60 + bits)
        n, kq = lay.out_features, lay.scales.shape[1] * 32
        assert triton_ops.table_key(bits, kq, n, m) not in triton_ops.TABLE
        cfg = triton_ops.choose_config(bits, m, n, kq)
        assert cfg.kernel == ("gemv_mma" if m >= 3 else "gemv_tma")
        fallback = triton_ops.default_config(bits, m, n, kq, mma=False)
        assert fallback.kernel == "gemv_h2" and fallback.block_m >= m
        (h2_bf16, gemv_bf16), (h2_all, gemv_all) = dispatch_spied(lay, bits, m, monkeypatch)
        assert len(h2_bf16) == 1 and gemv_bf16 == []
        assert len(h2_all) == 1 and len(gemv_all) == 1

    @pytest.mark.parametrize("bits", [2, 4])
    @pytest.mark.parametrize("ms, channels, programs", [
        (range(3, 9), 32, ((8, 2), (2, 1), (8, 1))), (range(9, 17), 64, ((16, 2), (4, 1), (16, 1)))])
    def test_rule_gives_the_tensor_core_decode_kernel_three_to_sixteen_tokens(bits, ms, channels, programs):
        """2- and 4-bit weights at 3..16 tokens: 32 channels per token tile, rows of warps along K up to about
        ``MMA_WARPS_PER_SM`` warps per SM (8192 x 8192: 8 rows of eight steps; 8192 x 28672, 896 one-warp programs,
        7 per SM already: 2 rows), then split-K (4096 x 4096: 8 rows of two steps each, 2 splits); 3- and 8-bit weights, and
        17 tokens, keep the other kernels."""
        for m in ms:
            for (k, n), (warps, split) in zip(((4096, 4096), (8192, 28672), (8192, 8192)), programs):
                cfg = triton_ops.default_config(bits, m, n, k)
                assert cfg == Config("gemv_mma", 8 if m <= 8 else 16, channels, 128, split_k=split, num_warps=warps)
        assert triton_ops.default_config(3, 5, 4096, 4096).kernel == "gemm_t"
        assert triton_ops.default_config(bits, 17, 4096, 4096).kernel == "gemm_t"

    def test_hopper_rule_gives_untuned_shapes_the_ring_gemv_and_the_register_operand_kernel():
        """A shape the table does not list (Llama-2-13B's 5120 x 13824) at 2 and 4 bits: the TMA-ring GEMV at one and
        two tokens (64 whole columns per program: 216 programs), the decode kernel at 3..8, the register-operand kernel
        at 9..256 (one split: 216 row tiles already fill the SMs; rings as deep as two programs per SM allow), the dense
        path past 256; 3- and 8-bit weights keep the portable rule everywhere."""
        k, n = 5120, 13824
        for bits in (2, 4):
            assert not any(key.startswith(f"w{bits}:{k}x{n}:") for key in triton_ops.TABLE)
            assert triton_ops.choose_config(bits, 1, n, k) == Config("gemv_tma", 1, 64, 512, num_warps=4, num_stages=4)
            assert triton_ops.choose_config(bits, 2, n, k) == Config("gemv_tma", 2, 64, 512, num_warps=4, num_stages=2)
            for m in (3, 8):
                assert triton_ops.choose_config(bits, m, n, k).kernel == "gemv_mma"
            for m, tokens, stages in ((9, 16, 5), (64, 64, 5), (65, 128, 3), (256, 128, 3)):
                assert triton_ops.choose_config(bits, m, n, k) == Config("gemm_ra", tokens, 64, 128, split_k=1,
                                                                         num_warps=4, num_stages=stages)
            assert triton_ops.choose_config(bits, 257, n, k) == triton_ops.DENSE
        assert triton_ops.choose_config(2, 64, 4096, 5120).split_k == 4  # 64 row tiles: four splits of 10 steps
        for bits in (3, 8):
            for m in (1, 2, 16, 256):
                assert triton_ops.choose_config(bits, m, n, k) == triton_ops.default_config(bits, m, n, k)

    @pytest.mark.parametrize("bits, m", [(2, 1), (2, 2), (4, 1), (4, 2)])
    def test_tuned_gemv_h2_entry_round_trips_and_dispatches(bits, m, tmp_path, monkeypatch):
        """A ``--tune`` candidate naming gemv_h2 survives the table file, and the dispatch launches it for
        16-bit inputs (matching the reference op) and runs the fp32 GEMV on its tile for fp32 inputs."""
        lay = layer(bits, seed=50 + bits)
        n, kq = lay.out_features, lay.scales.shape[1] * 32
        cfg = next(c for c in candidates(bits, m, n, kq) if c.kernel == "gemv_h2")
        key = triton_ops.table_key(bits, kq, n, m)
        monkeypatch.setattr(triton_ops, "TABLE_PATH", tmp_path / "triton_table.json")
        triton_ops.save_table({key: cfg})
        assert triton_ops._load_table() == {key: cfg}
        monkeypatch.setitem(triton_ops.TABLE, key, cfg)
        assert triton_ops.choose_config(bits, m, n, kq) == cfg
        (h2_bf16, gemv_bf16), (h2_all, gemv_all) = dispatch_spied(lay, bits, m, monkeypatch)
        assert h2_bf16 == [(1, cfg.split_k)] and gemv_bf16 == []
        assert h2_all == [(1, cfg.split_k)] and gemv_all == [(1, cfg.split_k)]
