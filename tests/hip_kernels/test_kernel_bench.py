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
    assert groups == {"paged_decode_attention", "paged_prefill_attention", "elementwise",
                      "kv_blocks"}
