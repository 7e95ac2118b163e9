"""paged_prefill_attention against its reference: interpreter on CPU, and GPU."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import (
    Case,
    CaseResult,
    compare,
    reference_tests,
    run_cases_main,
    same_signature,
)

from hip_kernels.attention_tiles import StepCache, tile_starts
from hip_kernels.paged_kv import make_paged_kv
from hip_kernels.paged_prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
)

# Each sequence: (cached prefix, new chunk). Covers a fresh prefill, chunked prefill over a
# prefix that is not a multiple of the block size, a decode-like chunk of 1, an empty chunk,
# and a chunk long enough for several q tiles.
MIXED = ((0, 5), (7, 3), (20, 1), (3, 0), (0, 37))
CASES = [
    Case("prefill", dtype, {"seqs": seqs, "heads": heads, "dim": dim, "block_size": bs})
    for dtype in ("fp32", "fp16", "bf16")
    for seqs, heads, dim, bs in ((MIXED, (4, 1), 32, 16),
                                 (((0, 9), (12, 4)), (2, 2), 18, 5),
                                 (((5, 20),), (8, 4), 64, 16))
] + [
    Case("prefill", "fp32", {"seqs": ((0, 11), (6, 6)), "heads": (6, 2), "dim": 16,
                             "block_size": 4}),
    Case("prefill", "bf16", {"seqs": ((1, 1), (0, 1)), "heads": (8, 2), "dim": 32,
                             "block_size": 16}),
    # a second layer of the same step: the tile starts the first built are reused
    Case("prefill", "fp32", {"seqs": MIXED, "heads": (4, 1), "dim": 32, "block_size": 16,
                             "layers": 2}),
]
GPU_CASES = [
    Case("prefill", "bf16", {"seqs": ((0, 2048), (1000, 512), (4095, 1), (77, 300)),
                             "heads": (32, 8), "dim": 128, "block_size": 16}),
    Case("prefill", "fp32", {"seqs": ((0, 700), (300, 129)), "heads": (64, 8), "dim": 128,
                             "block_size": 16}),
]


def run_case(case: Case, device: str = "cpu") -> CaseResult:
    """Packed chunks over a scattered paged cache; kernel vs reference."""
    p = case.params
    num_q, num_kv = p["heads"]
    seq_lens = [prefix + chunk for prefix, chunk in p["seqs"]]
    kv = make_paged_kv(seq_lens, num_kv, p["dim"], p["block_size"], case.torch_dtype, device)
    chunks = [chunk for _, chunk in p["seqs"]]
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + chunk)
    query_start_loc = torch.tensor(starts, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(starts[-1], num_q, p["dim"], generator=gen, device=device)
    q = q.to(case.torch_dtype)
    args = (q, kv.kv_layer, kv.block_tables, query_start_loc, kv.seq_lens,
            1 / math.sqrt(p["dim"]))
    ref = paged_prefill_attention_ref(*args)
    if p.get("layers", 1) == 1:
        return compare(case.id, paged_prefill_attention(*args), ref, case.torch_dtype)
    step_cache: StepCache = {}
    first = paged_prefill_attention(*args, step_cache=step_cache)
    cached = dict(step_cache)
    second = paged_prefill_attention(*args, step_cache=step_cache)
    if len(cached) != 1 or any(step_cache[k] is not v for k, v in cached.items()):
        return CaseResult(case.id, False, 0.0, "the tile starts were built again")
    result = compare(case.id, second, ref, case.torch_dtype)
    return result if torch.equal(first, second) else CaseResult(
        case.id, False, result.max_abs_err, "the second layer's output differs")


interpreted, test_matches_reference_in_interpreter, test_matches_reference_on_gpu = \
    reference_tests(__file__, CASES, GPU_CASES, run_case)


def test_launcher_signature_matches_reference():
    assert same_signature(paged_prefill_attention, paged_prefill_attention_ref)


def test_kv_layer_of_the_wrong_rank_is_a_clear_error():
    q = torch.zeros(3, 4, 16)
    with pytest.raises(ValueError, match="is not"):
        paged_prefill_attention(q, torch.zeros(4, 2, 16, 16), torch.zeros(1, 1, dtype=torch.int32),
                                torch.tensor([0, 3], dtype=torch.int32),
                                torch.tensor([3], dtype=torch.int32), 1.0)


def test_tile_starts_count_each_sequences_q_tiles_and_are_built_once_per_step():
    qsl = torch.tensor([0, 5, 8, 9, 9, 46], dtype=torch.int32)  # 5, 3, 1, 0, 37 rows
    cache: StepCache = {}
    starts = tile_starts(qsl, 4, cache)
    assert starts.tolist() == [0, 2, 3, 4, 4, 14] and starts.dtype == torch.int32
    assert tile_starts(qsl, 4, cache) is starts
    assert tile_starts(qsl, 8, cache).tolist() == [0, 1, 2, 3, 3, 8]  # its own entry
    assert tile_starts(qsl, 4).tolist() == starts.tolist()  # no cache: built every call


if __name__ == "__main__":
    raise SystemExit(run_cases_main(CASES, run_case))
