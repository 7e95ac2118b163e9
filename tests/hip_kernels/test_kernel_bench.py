"""bench/kernel_bench.py on a CPU-only machine: one clear line and exit code 2."""

from __future__ import annotations

import pytest

from bench import kernel_bench
from disagg.common.platform import is_gpu


@pytest.mark.skipif(is_gpu(), reason="the refusal is the CPU path")
def test_refuses_without_a_gpu(tmp_path, capsys):
    output = tmp_path / "kernels.jsonl"
    assert kernel_bench.main(["--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a GPU" in err[0]
    assert not output.exists()


def test_unknown_kernel_group_is_a_clear_error(capsys):
    assert kernel_bench.main(["--kernels", "flash_mla"]) == 2
    assert "unknown --kernels" in capsys.readouterr().err


def test_every_kernel_is_benchmarked():
    groups = set(kernel_bench.CASE_GROUPS)
    assert groups == {"paged_decode_attention", "paged_mla_decode", "paged_prefill_attention",
                      "mla_prefill_attention", "elementwise", "kv_blocks", "fused_moe",
                      "fp8_gemm", "skinny_gemm"}


def test_moe_work_counts_active_experts_once():
    # Qwen3-30B-A3B decode of one token: 8 experts' w13 + w2 in bf16, x in and out back.
    weight_bytes = 8 * 3 * 2048 * 768 * 2
    assert kernel_bench.moe_work(1, 8, 8, 2048, 768, 2) == (weight_bytes + 2 * 2048 * 2,
                                                           6 * 8 * 2048 * 768)
    bytes_moved, flops = kernel_bench.moe_work(4096, 128, 8, 2048, 768, 2)
    assert bytes_moved == 128 * 3 * 2048 * 768 * 2 + 2 * 4096 * 2048 * 2
    assert flops == 2 * 4096 * 8 * (2048 * 2 * 768 + 768 * 2048)


def test_mla_decode_work_reads_each_latent_once():
    # DeepSeek-V3, 128 heads, batch 2 x 4k context in bf16: the latents dominate the bytes.
    bytes_moved, flops = kernel_bench.mla_decode_work(2, 4096, 128, 576, 512, 2)
    assert bytes_moved == 2 * 4096 * 576 * 2 + 2 * 128 * (576 + 512) * 2
    assert flops == 2 * 2 * 128 * 4096 * (576 + 512)
