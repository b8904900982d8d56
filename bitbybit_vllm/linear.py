"""The bitbybit LinearMethod: checkpoint tensors in, the packed serving form out, ``kernels.ops.linear`` in between.

Per quantized layer ``P`` the checkpoint holds ``P.codes`` uint8 [N, Kq], ``P.scales`` e4m3 [N, G],
``P.zeros`` uint8 [N, G], ``P.row_scale`` fp32 [N] and, with split channels, ``P.split_index``
int32 [R] (:mod:`kernels.checkpoint`). vLLM's weight_loader_v2 path loads them:

- column-parallel layers (qkv_proj, gate_up_proj, ...) shard the output rows of all four like
  any vLLM weight; fused layers get their q/k/v or gate/up shards at vLLM's offsets;
- row-parallel layers (o_proj, down_proj) keep the rows and take the rank's groups of K and its
  split segments (:mod:`kernels.shard`);
- ``split_index`` is checked against config.json's ``splits`` (every rank reads it whole).

A compact single-precision checkpoint (``stored_bits`` B) holds ``P.packed`` int32 [N, Kq*B/32]
instead of ``P.codes``; it loads the same way (a row-parallel rank repacks its groups,
:func:`kernels.shard.take_packed_groups`) and serves at B only (other ``--bits`` fail at start-up).

``process_weights_after_loading`` slices the master codes to the serving precision and packs
them (:func:`kernels.ops.pack_linear`; compact codes go through
:func:`kernels.checkpoint.stored_weight` first); the master codes are dropped, so weight memory
scales with the chosen bits.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch.nn import Parameter
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.parameter import BasevLLMParameter, ChannelQuantScaleParameter, ModelWeightParameter

from kernels.checkpoint import stored_weight
from kernels.ops import PackedLinear, linear, pack_linear
from kernels.shard import check_row_shard, row_shard_groups, row_shard_split_index, take_groups, take_packed_groups
from kernels.split import quantized_width

from .config import BitbybitConfig

CHECKPOINT_TENSORS = ("codes", "packed", "scales", "zeros", "row_scale", "split_index")


class GroupedWeightParameter(ModelWeightParameter):
    """An [N, Kq]-layout tensor (codes: ``group_width`` = group size; scales, zeros: 1 column per group).

    Rows shard like any vLLM weight; a row-parallel rank takes ``rank_groups`` of the K layout
    (its channels' groups and its split segments) instead of one contiguous slice. ``packed_bits``:
    the tensor is a compact checkpoint's packed codes of that width (groups are taken unpacked).
    """

    def __init__(self, rank_groups: torch.Tensor | None, group_width: int, packed_bits: int | None = None,
                 **kwargs: Any) -> None:
        self.rank_groups = rank_groups
        self.group_width = group_width
        self.packed_bits = packed_bits
        super().__init__(**kwargs)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        if self.rank_groups is not None and self.packed_bits is not None:
            loaded_weight = take_packed_groups(loaded_weight, self.rank_groups, self.packed_bits, self.group_width)
        elif self.rank_groups is not None:
            loaded_weight = take_groups(loaded_weight, self.rank_groups, self.group_width)
        if loaded_weight.shape != self.data.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded_weight.shape)} does not fit this rank's "
                             f"{tuple(self.data.shape)}; is config.json's quantization_config from this checkpoint?")
        self.data.copy_(loaded_weight)


class SplitIndexParameter(BasevLLMParameter):
    """The layer's split index as stored (int32 [R], whole on every rank), checked against config.json."""

    def __init__(self, expected: torch.Tensor, layer_name: str, **kwargs: Any) -> None:
        self.expected = expected
        self.layer_name = layer_name
        super().__init__(**kwargs)

    def _check_and_load(self, loaded_weight: torch.Tensor) -> None:
        if not torch.equal(loaded_weight.to(torch.int32).cpu(), self.expected.cpu()):
            raise ValueError(f"{self.layer_name}: split_index in the safetensors disagrees with config.json's splits")
        self.data.copy_(loaded_weight)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._check_and_load(loaded_weight)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        self._check_and_load(loaded_weight)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._check_and_load(loaded_weight)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs: Any) -> None:
        self._check_and_load(loaded_weight)


class BitbybitLinearMethod(LinearMethodBase):
    """One quantized linear layer (``modules``: the checkpoint modules vLLM fused into it)."""

    def __init__(self, config: BitbybitConfig, modules: list[str]) -> None:
        self.config = config
        self.modules = modules
        self.split_index, self.segments = self._shared_split(config, modules)
        self.in_features: int | None = None
        self.local_split_index: torch.Tensor | None = None
        self.tensor_fields: list[str] = []
        self.static_fields: dict[str, Any] = {}

    @staticmethod
    def _shared_split(config: BitbybitConfig, modules: list[str]) -> tuple[torch.Tensor | None, int]:
        """The split set of a (fused) layer; fused modules read one input, so they must share it."""
        sets = [(config.quant.split_index(m), config.quant.split_segments(m)) for m in modules]
        index, segments = sets[0]
        for m, (idx, seg) in zip(modules[1:], sets[1:], strict=True):
            same = idx is None if index is None else idx is not None and torch.equal(idx, index)
            if not same or seg != segments:
                raise ValueError(f"vLLM fuses {modules} into one layer, but {m} has other split channels than "
                                 f"{modules[0]}; layers reading one input must share one split set")
        return index, segments

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs: Any) -> None:
        quant = self.config.quant
        gs = quant.group_size
        slots = 0 if self.split_index is None else self.split_index.numel()
        k_shards = input_size // input_size_per_partition  # > 1 only for a row-parallel layer at TP > 1
        rank = layer.tp_rank if k_shards > 1 else 0
        weight_loader = extra_weight_attrs["weight_loader"]
        rank_groups = None
        if k_shards > 1:
            check_row_shard(input_size, slots, self.segments, gs, k_shards, name="/".join(self.modules))
            rank_groups = row_shard_groups(input_size, slots, self.segments, gs, rank, k_shards)
        self.in_features = input_size_per_partition
        self.local_split_index = row_shard_split_index(self.split_index, input_size, self.segments, rank, k_shards)
        local_slots = 0 if self.local_split_index is None else self.local_split_index.numel()
        kq = quantized_width(input_size_per_partition, local_slots, gs)
        n = sum(output_partition_sizes)

        def grouped(width: int, dtype: torch.dtype, group_width: int,
                    packed_bits: int | None = None) -> GroupedWeightParameter:
            return GroupedWeightParameter(rank_groups=rank_groups, group_width=group_width, packed_bits=packed_bits,
                                          data=torch.empty(n, width, dtype=dtype), input_dim=1, output_dim=0,
                                          weight_loader=weight_loader)

        codes_dtype, codes_width = quant.stored_codes(kq)
        layer.register_parameter(quant.codes_suffix, grouped(codes_width, codes_dtype, gs,
                                                             quant.stored_bits if quant.compact else None))
        layer.register_parameter("scales", grouped(kq // gs, torch.float8_e4m3fn, 1))
        layer.register_parameter("zeros", grouped(kq // gs, torch.uint8, 1))
        layer.register_parameter("row_scale", ChannelQuantScaleParameter(
            data=torch.empty(n, dtype=torch.float32), output_dim=0, weight_loader=weight_loader))
        if self.split_index is not None:
            layer.register_parameter("split_index", SplitIndexParameter(
                expected=self.split_index, layer_name="/".join(self.modules),
                data=torch.empty(slots, dtype=torch.int32), weight_loader=weight_loader))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Slice to the serving precision, pack, and replace the checkpoint tensors by the packed form."""
        quant = self.config.quant
        codes = getattr(layer, quant.codes_suffix).data
        split_index = None if self.local_split_index is None else self.local_split_index.to(codes.device)
        qw = stored_weight(codes, layer.scales.data, layer.zeros.data, layer.row_scale.data, self.in_features,
                           quant, split_index)
        packed = pack_linear(qw, self.config.bits)
        for name in CHECKPOINT_TENSORS:
            if name in layer._parameters:
                del layer._parameters[name]
        for f in fields(packed):
            value = getattr(packed, f.name)
            if isinstance(value, torch.Tensor):
                layer.register_parameter(f.name, Parameter(value, requires_grad=False))
                self.tensor_fields.append(f.name)
            else:
                self.static_fields[f.name] = value

    def packed_linear(self, layer: torch.nn.Module) -> PackedLinear:
        """The layer's serving form, built from its registered tensors."""
        return PackedLinear(**{n: getattr(layer, n) for n in self.tensor_fields}, **self.static_fields)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return linear(x, self.packed_linear(layer), self.config.act_bits, bias)
