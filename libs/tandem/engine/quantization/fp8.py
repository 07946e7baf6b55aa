"""FP8 E4M3 quantization in plain torch: the definitions the Triton kernels are tested against,
and the CPU path.

One rule everywhere (weights at load time, activations at run time): a group of values with
absolute maximum ``amax`` gets the scale ``s = max(amax, EPS) / 448`` (float32), and each value
``x`` becomes ``e4m3(clamp(x * (448 / max(amax, EPS)), -448, 448))`` (float32, the divisions
IEEE-rounded, the cast round-to-nearest-even); ``s`` is the dequantisation multiplier,
``x ~= q * s``. A static scale ``s`` quantizes with ``x * (1 / s)``. One division per group and a
multiply per value: the kernels quantize the same values on every program that reads them. Groups: a whole row (per-channel weights,
per-token activations), a block of rows x columns (block-scaled weights), a row's run of
``group`` columns (per-token-group activations, matching the weight blocks' columns).
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-10  # floor of a group's amax: an all-zero group gets a tiny scale, its values stay 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8_max_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, FP8_MAX)


# Both divisions are tensor / tensor on purpose: a correctly rounded float32 division on every
# device, as the Triton kernels compute it (div_rn). On CUDA, torch turns ``tensor / scalar`` into
# a multiplication by the scalar's reciprocal and ``scalar / tensor`` into reciprocal() * scalar:
# two roundings, which differ from the division in the last bit (the 2026-12-07 H100 check found
# the scales of 3 shapes not bit-equal and 0.08% of the FP8 values one step off).
def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The dequantisation multiplier of a group with absolute maximum ``amax``."""
    a = amax.float().clamp(min=EPS)
    return a / _fp8_max_like(a)


def inverse_scale_of(amax: torch.Tensor) -> torch.Tensor:
    """What a group's values are multiplied by before the cast."""
    a = amax.float().clamp(min=EPS)
    return _fp8_max_like(a) / a


def to_fp8(x: torch.Tensor, inverse_scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(x * inverse_scale)), ``inverse_scale`` broadcast against ``x`` (float32 arithmetic)."""
    return (x.float() * inverse_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token / per-output-channel) quantization: (q [M, K] e4m3, scales [M, 1] float32)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    return to_fp8(x, inverse_scale_of(amax)), scale_of(amax)


def quantize_row_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization: each row's runs of ``group`` columns (the last may be short).
    Returns (q [M, K] e4m3, scales [M, ceil(K / group)] float32)."""
    M, K = x.shape
    G = _cdiv(K, group)
    padded = torch.nn.functional.pad(x.float(), (0, G * group - K)).view(M, G, group)
    amax = padded.abs().amax(dim=-1)
    return to_fp8(x, inverse_scale_of(amax).repeat_interleave(group, dim=1)[:, :K]), scale_of(amax)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor activation quantization with a calibrated ``scale`` (0-d or [1] float32):
    (q [M, K] e4m3, scales [M, 1] float32, every row ``scale``)."""
    s = scale.float().reshape(1, 1)
    return to_fp8(x, 1.0 / s), s.expand(x.shape[0], 1).contiguous()


def quantize_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled weight quantization: (q [N, K] e4m3, scale [ceil(N / bn), ceil(K / bk)] float32),
    the layout of DeepSeek-V3 / Qwen3-FP8 checkpoints (``weight``, ``weight_scale_inv``)."""
    bn, bk = block
    N, K = w.shape
    Nb, Kb = _cdiv(N, bn), _cdiv(K, bk)
    padded = torch.nn.functional.pad(w.float(), (0, Kb * bk - K, 0, Nb * bn - N)).view(Nb, bn, Kb, bk)
    amax = padded.abs().amax(dim=(1, 3))
    return to_fp8(w, expand_block_scale(inverse_scale_of(amax), block, (N, K))), scale_of(amax)


def expand_block_scale(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """A [Nb, Kb] block scale repeated over its blocks' elements: [N, K]."""
    N, K = shape
    return scale.repeat_interleave(block[0], dim=0)[:N].repeat_interleave(block[1], dim=1)[:, :K]


def dequantize(q: torch.Tensor, scale: torch.Tensor, group_n: int = 1, group_k: int | None = None) -> torch.Tensor:
    """float32 values of ``q`` [N, K] under scales of ``group_n`` rows x ``group_k`` columns each
    (``scale`` [ceil(N / group_n), ceil(K / group_k)]; ``group_k`` None: one scale per row group)."""
    N, K = q.shape
    if scale.dim() == 1:
        scale = scale[:, None]
    return q.float() * expand_block_scale(scale.float(), (group_n, group_k or K), (N, K))


def fp8_linear_ref(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group_n: int,
                   group_k: int | None, input_scale: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 linear layer, by definition: activations quantized (per token, per ``group_k``
    columns when the weight is block-scaled, or with the static ``input_scale``), both operands
    dequantized to float32, multiplied, rounded to ``x.dtype``.

    weight [N, K] e4m3; weight_scale [N] (per channel: ``group_n`` 1, ``group_k`` None) or
    [ceil(N / group_n), ceil(K / group_k)] (block-scaled)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if input_scale is not None:
        xq, xs = quantize_static(x2, input_scale)
        xd = dequantize(xq, xs)
    elif group_k is None:
        xq, xs = quantize_rows(x2)
        xd = dequantize(xq, xs)
    else:
        xq, xs = quantize_row_groups(x2, group_k)
        xd = dequantize(xq, xs, 1, group_k)
    y = xd @ dequantize(weight, weight_scale, group_n, group_k).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
