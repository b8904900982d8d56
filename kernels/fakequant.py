"""Fake quantization for QAT: the serving numerics in float, with straight-through gradients.

``FakeQuantLinear`` holds a linear layer's trainable weight in the split layout ``[N, Kq]``
(padding and split columns included, :func:`kernels.split.split_weight`). Its forward pass at
``bits = b`` uses exactly the weight the exported checkpoint will serve: master codes from
:func:`kernels.split.quantize_split_layout` (closed-form min/max grid, E4M3 scales), sliced and
dequantized by :func:`kernels.grid.dequantize`. Gradients pass straight through (identity),
since the grid is derived from the weights rather than learned. ``bits = None`` is the float
layer (the split layout is an identity in float, so it equals the unsplit layer).

The forward pass also traces under ``torch.compile`` (QAT's compiled training step): there the master
codes are recomputed inside the graph instead of read from the eager cache, and the format's
data-dependent input checks are skipped (:func:`kernels.e4m3.value_checks`), so the graph has no
host syncs and no breaks (and after :meth:`FakeQuantLinear.mark_split_dynamic`, one graph serves every
split width). Inductor's Triton code divides approximately (fp32 ``x / y``), so on a GPU a rounding at a
near-tie (a master code, a group's zero point) may go the other way than in the exported codes; the
compiled weight then differs there by whole master steps (tests/test_qat_compile.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .actquant import dequantize_activations, quantize_activations
from .grid import GROUP_SIZE, MASTER_BITS, QuantizedWeight, check_bits, dequantize, padded_width
from .split import expand_input, fold_split, quantize_split_layout, split_weight


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, identity gradient to ``x``."""
    return x + (quantized - x).detach()


def fake_quantize_activations(xe: torch.Tensor, x: torch.Tensor, act_bits: int, split_index: torch.Tensor | None,
                              group_size: int) -> torch.Tensor:
    """Activations ``x [..., K]`` quantized per token as served (layout ``[..., Kq]``), STE to ``xe``."""
    with torch.no_grad():
        xq = dequantize_activations(quantize_activations(x.detach(), act_bits, split_index, group_size), xe.dtype)
    return straight_through(xe, xq)


class FakeQuantLinear(nn.Module):
    """A linear layer trained in the split layout; ``bits``/``act_bits`` pick the precision of the next forward."""

    def __init__(self, linear: nn.Linear, split_index: torch.Tensor, split_step: torch.Tensor | float,
                 group_size: int = GROUP_SIZE, master_bits: int = MASTER_BITS) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        self.master_bits = master_bits
        w = linear.weight.detach()
        self.weight = nn.Parameter(split_weight(w, split_index.to(w.device), split_step, group_size))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())
        self.register_buffer("split_index", split_index.to(torch.int32).to(w.device))
        self._split_index_cpu = split_index.to(torch.int32).cpu()  # the format code's checks read it on the host
        # no data, only a length (split groups + 1) for torch.compile: see mark_split_dynamic; not saved
        self.register_buffer("split_groups", torch.empty(split_index.numel() // group_size + 1, 0, device=w.device),
                             persistent=False)
        self.bits: int | None = None
        self.act_bits: int | None = None
        self._cache: tuple[int, torch.Tensor, QuantizedWeight] | None = None

    @property
    def split_channels(self) -> int:
        return int((self.split_index >= 0).sum())

    def quantized(self) -> QuantizedWeight:
        """The master-code weight this layer exports (cached until the weight changes)."""
        w = self.weight
        if self._cache is None or self._cache[0] != w._version or self._cache[1] is not w:
            with torch.no_grad():
                qw = quantize_split_layout(w.detach().float(), self.in_features, self._split_index_cpu,
                                           self.group_size, self.master_bits)
            self._cache = (w._version, w, qw)
        return self._cache[2]

    def fake_weight(self, bits: int) -> torch.Tensor:
        """The b-bit served weight ``[N, Kq]`` with a straight-through gradient to ``self.weight``."""
        check_bits(bits, self.master_bits)
        with torch.no_grad():
            wq = dequantize(self._master(), bits).to(self.weight.device)
        return straight_through(self.weight, wq)

    def _master(self) -> QuantizedWeight:
        """:meth:`quantized`; while torch.compile traces, the same quantization traced afresh (the cache,
        keyed on the weight's version, cannot live in a graph)."""
        if torch.compiler.is_compiling():
            return quantize_split_layout(self.weight.detach().float(), self.in_features, self.split_index,
                                         self.group_size, self.master_bits)
        return self.quantized()

    def mark_split_dynamic(self) -> None:
        """Let torch.compile trace this layer once for any split width (blocks split different numbers of channels)
        instead of once per width: the dimensions the width sets become symbolic.

        The traced width is ``group_size * (len(split_groups) - 1)`` (:meth:`_split_width_checks`), so every size
        in the graph is linear in one whole-group count; written in ``split_index``'s own length (not known to be
        a multiple of the group size) the groups' floor divisions do not simplify and tracing a block is about 20x
        slower. The +1 keeps one split group from being a size 1, which dynamo always specializes. The weight's
        dimension follows only with ``torch._dynamo.config.force_parameter_static_shapes = False``."""
        for t, dim in ((self.split_groups, 0), (self.split_index, 0), (self.weight, 1)):
            torch._dynamo.maybe_mark_dynamic(t, dim)

    def _split_width_checks(self) -> None:
        """While tracing: the split width and ``Kq`` in terms of ``split_groups``' length (trivial when static)."""
        torch._check(self.split_index.shape[0] == self.group_size * (self.split_groups.shape[0] - 1))
        kp = padded_width(self.in_features, self.group_size)
        torch._check(self.weight.shape[1] == kp + self.split_index.shape[0])

    def float_weight(self) -> torch.Tensor:
        """The unsplit float weight ``[N, K]`` (split columns folded back)."""
        return fold_split(self.weight.detach(), self.split_index, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            self._split_width_checks()
        idx = self.split_index if self.split_index.numel() else None
        xe = expand_input(x, idx, self.group_size)
        if self.act_bits is not None and self.act_bits < 16:
            xe = fake_quantize_activations(xe, x, self.act_bits, idx, self.group_size)
        w = self.weight if self.bits is None else self.fake_weight(self.bits)
        y = xe @ w.to(xe.dtype).T
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        kq = padded_width(self.in_features, self.group_size) + self.split_index.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, Kq={kq}, "
                f"split={self.split_channels}, bits={self.bits}, act_bits={self.act_bits}")
