"""FP8 (e4m3) weights: quantize, convert for MI300X, and turn a model's linears and routed
experts into fp8 ones.

Which layers hold fp8 weights: every ``LinearBase`` (disagg/models/parallel.py: the column- and
row-parallel projections of attention and MLPs, shared experts, MLA's q/kv_a/o projections)
and every routed-expert stack (``FusedExperts``, disagg/models/moe.py: most of a DeepSeek-V3's
bytes). The LM head, embeddings, norms, MoE routers and MLA's ``kv_b_proj`` (its weight is
split per head for the absorbed decode) stay in the model dtype.

An fp8 layer holds ``weight`` [N, K] fp8 and ``weight_scale`` fp32 (the multiplier:
dequant(W) = W * S, what DeepSeek calls ``weight_scale_inv``) in one of the layouts of
hip_kernels/fp8_gemm.py, and computes through ``ops.fp8_gemm`` (x upcast in-kernel; activations
are never quantized, so ``activation_scheme`` and ``input_scale`` are ignored):

    from a checkpoint:  loaded as [N, Sk] (one scale row per weight row: a fused qkv / gate_up
                        and a TP shard may start at any row, e.g. a 64-row k head group), then
                        stored as [ceil(N/128), Sk] when that is lossless (every 128-row group
                        shares its scales, the usual case) or [1, Sk] when all rows agree
                        Sk = ceil(K/128) for 128 x 128 block scales, 1 for per-tensor scales
    --quantization fp8: quantized after loading, 128 x 128 blocks of this rank's shard

Row-parallel layers split K: with block scales a shard must start on a 128-column boundary,
else ConfigError. On gfx942 (e4m3fnuz) weights are converted at load: the same bits mean half
the value there and 0x80 (-0) is NaN, so bits are kept (0x80 -> 0) and the scales doubled.

An fp8 expert stack holds w13 [E, 2I, H] and w2 [E, H, I] fp8 (I: this rank's slice) with
``w13_scale`` / ``w2_scale`` [E, Sn, Sk] as hip_kernels/fused_moe.py reads them, and computes
through ops.fused_moe:

    from a checkpoint, 128 x 128 blocks: w13_scale [E, 2I/128, ceil(H/128)] (gate's block
                        rows, then up's), w2_scale [E, ceil(H/128), I/128]: the rank's slice I
                        must be a multiple of 128 (TP slices on block boundaries), else
                        ConfigError
    from a checkpoint, per tensor: w2_scale [E, 1, 1]; w13_scale [E, 1, 1] where gate and
                        up share their scale, else [E, 2I/128, 1] where I % 128 == 0, else
                        [E, 1, 1] with the half of the smaller scale requantized to the larger
                        (one more fp8 rounding of those values; as vLLM does)
    --quantization fp8: 128 x 128 blocks of each expert (w13 in [2I, 128] blocks, one row of
                        scales, where I % 128 != 0), or one scale per expert and weight
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from disagg.common import platform
from disagg.common.config import ConfigError
from disagg.models.arch import QuantArch
from disagg.models.moe import FusedExperts
from disagg.models.parallel import LinearBase, RowParallelLinear
from hip_kernels.fp8_gemm import SCALE_BLOCK, dequantize_fp8

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
_SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")


def fp8_dtype_for(device: torch.device) -> torch.dtype:
    """The fp8 dtype weights take on ``device``: the platform's on a GPU, e4m3fn on CPU."""
    return platform.fp8_dtype() if device.type == "cuda" else torch.float8_e4m3fn


def quantize_fp8(weight: torch.Tensor, block_n: int, block_k: int,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (fp8 W [N, K], fp32 scale [ceil(N/bn), ceil(K/bk)]): each block_n x block_k
    block scaled so its largest magnitude is the format's max (448 fn, 240 fnuz), rounded to
    nearest. (N, K) blocks = per-tensor, (1, K) = per-row. An all-zero block gets scale 1."""
    n, k = weight.shape
    fmax = torch.finfo(dtype).max
    nb, kb = -(-n // block_n), -(-k // block_k)
    padded = F.pad(weight.float(), (0, kb * block_k - k, 0, nb * block_n - n))
    blocks = padded.view(nb, block_n, kb, block_k)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp_(-fmax, fmax)
    return q.view(nb * block_n, kb * block_k)[:n, :k].to(dtype).contiguous(), scale


def e4m3fn_to_fnuz(weight: torch.Tensor, scale: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values as (e4m3fnuz weight, scale): bits kept (an fnuz byte is half the fn
    value), -0 (0x80, NaN in fnuz) made 0, scale doubled. Exact for every finite value."""
    bits = weight.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    return bits.view(torch.float8_e4m3fnuz), scale * 2.0


@dataclass(frozen=True, slots=True)
class Fp8LinearMethod:
    """How an fp8 ``LinearBase`` computes x W^T: ``gemm`` is ops.fp8_gemm."""

    gemm: Callable[..., torch.Tensor]

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype (no bias)."""
        return self.gemm(x, layer.weight, layer.weight_scale)


def fp8_linears(model: nn.Module) -> list[LinearBase]:
    """The layers whose weights go fp8 (see the module docstring)."""
    return [m for m in model.modules() if isinstance(m, LinearBase)]


def is_fp8(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds e4m3 values."""
    return tensor.dtype in FP8_DTYPES


def fp8_expert_stacks(model: nn.Module) -> list[FusedExperts]:
    """The routed-expert stacks, whose weights go fp8 too."""
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def prepare_fp8_(model: nn.Module, quant: QuantArch) -> None:
    """Give every fp8 layer empty fp8 ``weight`` [N, K] and per-row ``weight_scale`` [N, Sk],
    and every expert stack empty fp8 weights and scales in their loading layout, for a
    checkpoint's tensors to load into (after the model is in its dtype)."""
    for experts in fp8_expert_stacks(model):
        _prepare_experts(experts, quant)
    blocked = quant.weight_block_size is not None
    for layer in fp8_linears(model):
        n, k = layer.weight.shape
        if blocked and isinstance(layer, RowParallelLinear) and layer.tp.size > 1 \
                and k % SCALE_BLOCK:
            raise ConfigError(
                f"tensor_parallel_size {layer.tp.size} splits a {k * layer.tp.size}-column "
                f"fp8 weight into {k}-column shards, which do not fall on its 128-column "
                "scale blocks: use a tensor_parallel_size that does")
        device = layer.weight.device
        sk = -(-k // SCALE_BLOCK) if blocked else 1
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=torch.float8_e4m3fn,
                                                device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(n, sk, device=device),
                                          requires_grad=False)


def finalize_fp8_(model: nn.Module, gemm: Callable[..., torch.Tensor],
                  dtype: torch.dtype) -> None:
    """After a checkpoint loaded: compact the scales, convert to ``dtype`` (fnuz on gfx942),
    and route the layers through ``gemm`` (expert stacks: their scales in a fused_moe
    layout)."""
    for experts in fp8_expert_stacks(model):
        assert experts.w13_scale is not None and experts.w2_scale is not None  # prepare_fp8_
        w13, w13_scale = _kernel_w13_scale(experts.w13.data, experts.w13_scale.data)
        _set_fp8_experts(experts, (w13, w13_scale), (experts.w2.data, experts.w2_scale.data),
                         dtype)
    for layer in fp8_linears(model):
        weight, scale = layer.weight.data, _compact_scale(layer.weight_scale.data)
        if dtype == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
            weight, scale = e4m3fn_to_fnuz(weight, scale)
        _set_fp8(layer, weight, scale, gemm)


def quantize_model_fp8_(model: nn.Module, block: tuple[int, int] | None,
                        gemm: Callable[..., torch.Tensor], dtype: torch.dtype) -> None:
    """Quantize the loaded high-precision weights of every fp8 layer and expert stack in
    place: ``block`` (bn, bk) scales, or one per tensor (per expert) when None."""
    for experts in fp8_expert_stacks(model):
        _quantize_experts(experts, block, dtype)
    for layer in fp8_linears(model):
        n, k = layer.weight.shape
        bn, bk = block if block is not None else (n, k)
        weight, scale = quantize_fp8(layer.weight.data, bn, bk, dtype)
        _set_fp8(layer, weight, scale, gemm)


def _set_fp8(layer: LinearBase, weight: torch.Tensor, scale: torch.Tensor,
             gemm: Callable[..., torch.Tensor]) -> None:
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.weight_scale = nn.Parameter(scale.float().contiguous(), requires_grad=False)
    layer.quant = Fp8LinearMethod(gemm)


def _prepare_experts(experts: FusedExperts, quant: QuantArch) -> None:
    """Empty fp8 w13 / w2 and their scales in the loading layout (FusedExperts): R scale rows
    each for gate and up, R = I / 128 with block scales, 1 with per-tensor ones."""
    num, two_inter, hidden = experts.w13.shape
    inter, tp_size = two_inter // 2, experts.tp.size
    blocked = quant.weight_block_size is not None
    if blocked and inter % SCALE_BLOCK:
        raise ConfigError(
            f"moe_intermediate_size {inter} is not a multiple of 128: fp8 block-scaled routed "
            "experts need whole 128-row scale blocks for gate and up" if tp_size == 1 else
            f"tensor_parallel_size {tp_size} splits moe_intermediate_size {inter * tp_size} "
            f"into {inter}-row expert slices, which do not fall on the 128-row fp8 scale "
            "blocks: use a tensor_parallel_size that does")
    rows, k_blocks = (inter // SCALE_BLOCK, -(-hidden // SCALE_BLOCK)) if blocked else (1, 1)
    device, fp8 = experts.w13.device, torch.float8_e4m3fn
    experts.w13 = _empty_param((num, two_inter, hidden), fp8, device)
    experts.w2 = _empty_param((num, hidden, inter), fp8, device)
    experts.w13_scale = _empty_param((num, 2 * rows, k_blocks), torch.float32, device)
    experts.w2_scale = _empty_param((num, k_blocks, rows), torch.float32, device)


def _empty_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                 ) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _kernel_w13_scale(w13: torch.Tensor, scale: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 with its scale in a fused_moe layout, from the loading layout [E, 2R, Sk]."""
    inter, rows = w13.shape[1] // 2, scale.shape[1] // 2
    if rows == 1 and torch.equal(scale[:, :1], scale[:, 1:]):
        return w13, scale[:, :1]  # gate and up share their scales: one row for both
    if inter % SCALE_BLOCK == 0:
        return w13, scale.repeat_interleave(inter // SCALE_BLOCK // rows, dim=1)
    return _share_expert_scale(w13, scale)


def _share_expert_scale(w13: torch.Tensor, scale: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor gate and up scales [E, 2, 1] -> one per expert [E, 1, 1] (the larger), the
    other half's fp8 values requantized (times smaller / larger <= 1: rounded, never beyond
    the format's range); for an I no 128-row block layout can split."""
    shared = scale.amax(dim=1, keepdim=True)
    factor = (scale / shared).repeat_interleave(w13.shape[1] // 2, dim=1)  # [E, 2I, 1]
    out = torch.empty_like(w13)
    for e in range(w13.shape[0]):  # one expert at a time: a small fp32 copy
        out[e] = (w13[e].float() * factor[e]).to(w13.dtype)
    return out, shared


def _quantize_experts(experts: FusedExperts, block: tuple[int, int] | None,
                      dtype: torch.dtype) -> None:
    """``--quantization fp8`` for one stack: each expert in 128 x 128 blocks (w13 in
    [2I, 128] blocks when I % 128 != 0, as fused_moe requires), or per expert."""
    _, two_inter, hidden = experts.w13.shape
    inter = two_inter // 2
    if block is None:
        w13_block, w2_block = (two_inter, hidden), (hidden, inter)
    else:
        w13_block = (SCALE_BLOCK if inter % SCALE_BLOCK == 0 else two_inter, SCALE_BLOCK)
        w2_block = (SCALE_BLOCK, SCALE_BLOCK)
    _set_fp8_experts(experts, _quantize_stack(experts.w13.data, w13_block, dtype),
                     _quantize_stack(experts.w2.data, w2_block, dtype), dtype)


def _quantize_stack(weights: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 [E, N, K], scales [E, ceil(N/bn), ceil(K/bk)]), expert by expert
    (the fp32 temporaries stay one expert's size)."""
    out = torch.empty(weights.shape, dtype=dtype, device=weights.device)
    scales = []
    for e, weight in enumerate(weights):
        out[e], scale = quantize_fp8(weight, *block, dtype)
        scales.append(scale)
    return out, torch.stack(scales)


def _set_fp8_experts(experts: FusedExperts, w13: tuple[torch.Tensor, torch.Tensor],
                     w2: tuple[torch.Tensor, torch.Tensor], dtype: torch.dtype) -> None:
    """Install (weight, scale) pairs, converted to ``dtype`` (e4m3fnuz on gfx942)."""
    for name, (weight, scale) in (("w13", w13), ("w2", w2)):
        if dtype == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
            weight, scale = e4m3fn_to_fnuz(weight, scale)
        setattr(experts, name, nn.Parameter(weight.contiguous(), requires_grad=False))
        setattr(experts, f"{name}_scale",
                nn.Parameter(scale.float().contiguous(), requires_grad=False))


def _compact_scale(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales [N, Sk] -> [1, Sk] if all rows agree, [ceil(N/128), Sk] if every
    128-row group agrees, else unchanged (all three mean the same dequantization)."""
    if bool((scale == scale[:1]).all()):
        return scale[:1].clone()
    blocks = scale[::SCALE_BLOCK]
    if torch.equal(blocks.repeat_interleave(SCALE_BLOCK, dim=0)[:scale.shape[0]], scale):
        return blocks.contiguous()
    return scale


def scale_weight_name(hf_name: str) -> str | None:
    """``x.weight_scale_inv`` / ``x.weight_scale`` -> ``x.weight``; None for other names."""
    for suffix in _SCALE_SUFFIXES:
        if hf_name.endswith(suffix):
            return hf_name.removesuffix(suffix) + ".weight"
    return None


def expand_scale_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A checkpoint scale as one row per weight row: [Nb, Kb] block scales -> [rows, Kb];
    a per-tensor scalar -> [rows, 1]; per-row ones ([rows] or [rows, Sk]) as they are."""
    if scale.numel() == 1:
        return scale.float().reshape(1, 1).expand(rows, 1)
    scale = scale.float().reshape(scale.shape[0], -1)
    if scale.shape[0] == rows:
        return scale
    return scale.repeat_interleave(SCALE_BLOCK, dim=0)[:rows]


def quantize_rows(weight: torch.Tensor, scale_cols: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A high-precision shard for an fp8 layer (a checkpoint layer left unquantized): scales
    per row and per 128 columns (``scale_cols`` > 1) or per row, matching [N, Sk] loading."""
    return quantize_fp8(weight, 1, SCALE_BLOCK if scale_cols > 1 else weight.shape[1], dtype)


def dequantize_unkept(weights: Iterable[tuple[str, torch.Tensor]],
                      keep_fp8: Callable[[str], bool]
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass a checkpoint's tensors through, except fp8 weights the model does not keep in fp8
    (``keep_fp8(hf weight name)`` False: kv_b_proj, or every layer of a model built without
    fp8 layers): each is held until its scale arrives (the two are usually adjacent) and
    yielded dequantized to fp32, its scale dropped."""
    weights_held: dict[str, torch.Tensor] = {}
    scales_held: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        weight_name = scale_weight_name(name)
        if weight_name is None:
            if not is_fp8(tensor) or keep_fp8(name):
                yield name, tensor
            elif name in scales_held:
                yield name, dequantize_fp8(tensor, scales_held.pop(name))
            else:
                weights_held[name] = tensor
        elif keep_fp8(weight_name):
            yield name, tensor
        elif weight_name in weights_held:
            yield weight_name, dequantize_fp8(weights_held.pop(weight_name), tensor)
        else:
            scales_held[weight_name] = tensor
    if weights_held:
        missing = sorted(weights_held)
        raise ConfigError(f"{len(missing)} fp8 weights have no weight_scale_inv / weight_scale "
                          f"in the checkpoint, e.g. {missing[0]!r}")
