"""``Fp8Linear``: a linear layer whose weight is stored in FP8 E4M3, and the factory the model
builds its dense linears with.

Two runtime forms cover every checkpoint format (``loading`` converts them at load time):

* per channel: ``weight_scale`` [N] (online quantization; per-tensor checkpoints, whose scalar
  per shard becomes one value per row of the merged QKV / gate-up weight);
* block-scaled: ``weight_scale`` [ceil(N / group_n), ceil(K / group_k)] (``group_n`` is the
  checkpoint's block height, or 1 where a merged projection's shards do not end on a block
  boundary and the scales were repeated per row).

Activations are quantized at run time: per token (per channel form), per token and
``group_k`` columns (block form), or with the calibrated ``input_scale`` (static per-tensor
checkpoints). ``weight``, ``weight_scale`` and ``input_scale`` keep their dtypes whatever
``--dtype`` is (``KEEP_DTYPE``); the bias follows ``--dtype``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fp8 import FP8_DTYPE


@dataclass(frozen=True)
class Fp8LinearSpec:
    """The form one linear layer takes (decided by ``loading.plan_fp8_linears``)."""

    group_n: int = 1  # rows per weight scale
    group_k: int | None = None  # columns per weight scale; None: one scale per row (per channel)
    static_input: bool = False  # a calibrated per-tensor input_scale instead of dynamic activation scales


class Fp8Linear(nn.Module):
    KEEP_DTYPE = ("weight", "weight_scale", "input_scale")

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: Fp8LinearSpec, gemm):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.group_n, self.group_k = spec.group_n, spec.group_k
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        if spec.group_k is None:
            scale_shape = (out_features,)
        else:
            scale_shape = (-(-out_features // spec.group_n), -(-in_features // spec.group_k))
        self.weight_scale = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)
        self.input_scale = (nn.Parameter(torch.empty((), dtype=torch.float32), requires_grad=False)
                            if spec.static_input else None)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.gemm = gemm  # tandem.engine.quantization.gemm.Fp8Gemm: runs forward on the chosen kernel

    def _apply(self, fn, recurse=True):
        """``Module.to(dtype)``, ``.half()``, ``.cuda()``...: the FP8 weight and the float32 scales are the
        format, so they only follow the module's device (learnt from ``fn`` applied to an integer
        probe, which no dtype cast touches); the bias is converted like any parameter."""
        kept = {n: getattr(self, n) for n in self.KEEP_DTYPE if getattr(self, n) is not None}
        for n in kept:
            setattr(self, n, None)
        super()._apply(fn, recurse)
        for n, t in kept.items():
            device = fn(torch.empty(0, dtype=torch.uint8, device=t.device)).device
            setattr(self, n, nn.Parameter(t.data.to(device), requires_grad=False))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.gemm(self, x.reshape(-1, shape[-1]))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        form = "per-channel" if self.group_k is None else f"block {self.group_n}x{self.group_k}"
        act = "static" if self.input_scale is not None else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8 e4m3 {form}, {act} activations")


class Fp8LinearFactory:
    """``model.PlainLinears``' protocol: ``(name, in, out, bias) -> module`` and ``matmul``. Linears named
    in the plan are FP8, the others come from ``fallback`` (``nn.Linear``, or the batch-invariant
    linears of --enable-deterministic-inference)."""

    def __init__(self, plan: dict[str, Fp8LinearSpec], gemm, fallback=None):
        from tandem.engine.model import plain_linear

        self.plan, self.gemm = plan, gemm
        self.fallback = fallback or plain_linear
        self.matmul = self.fallback.matmul

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        spec = self.plan.get(name)
        if spec is None:
            return self.fallback(name, in_features, out_features, bias)
        return Fp8Linear(in_features, out_features, bias, spec, self.gemm)
