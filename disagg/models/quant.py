"""FP8 (e4m3) weights: quantize, convert for MI300X, and turn a model's linears into fp8 ones.

Which layers hold fp8 weights: every ``LinearBase`` (disagg/models/parallel.py: the column- and
row-parallel projections of attention and MLPs, shared experts, MLA's q/kv_a/o projections).
The LM head, embeddings, norms, MoE routers and MLA's ``kv_b_proj`` (its weight is split per
head for the absorbed decode) stay in the model dtype, as do the routed experts: fused_moe
takes no fp8, so an fp8 checkpoint's experts are dequantized to the model dtype at load.

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


def prepare_fp8_(model: nn.Module, quant: QuantArch) -> None:
    """Give every fp8 layer empty fp8 ``weight`` [N, K] and per-row ``weight_scale`` [N, Sk]
    for a checkpoint's tensors to load into (after the model is in its dtype)."""
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
    and route the layers through ``gemm``."""
    for layer in fp8_linears(model):
        weight, scale = layer.weight.data, _compact_scale(layer.weight_scale.data)
        if dtype == torch.float8_e4m3fnuz and weight.dtype == torch.float8_e4m3fn:
            weight, scale = e4m3fn_to_fnuz(weight, scale)
        _set_fp8(layer, weight, scale, gemm)


def quantize_model_fp8_(model: nn.Module, block: tuple[int, int] | None,
                        gemm: Callable[..., torch.Tensor], dtype: torch.dtype) -> None:
    """Quantize the loaded high-precision weights of every fp8 layer in place: ``block``
    (bn, bk) scales, or one per tensor when None."""
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
    (``keep_fp8(hf weight name)`` False: routed experts, kv_b_proj): each is held until its
    scale arrives (the two are usually adjacent) and yielded dequantized to fp32, its scale
    dropped."""
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
