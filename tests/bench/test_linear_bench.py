"""bench/linear_bench.py's flags and refusals (the GPU rows are in bench/results/linears.jsonl)."""

from __future__ import annotations

import pytest

from bench import linear_bench


def test_without_a_gpu_it_refuses_with_exit_2(capsys) -> None:
    assert linear_bench.main(["--rows", "1,64"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize("rows", ("0", "1,x", "-4", ""))
def test_bad_row_counts_are_one_line_errors(capsys, rows) -> None:
    assert linear_bench.main(["--rows", rows]) == 2
    err = capsys.readouterr().err
    assert "--rows" in err and len(err.strip().splitlines()) == 1


def test_every_token_count_up_to_eight_also_times_the_skinny_kernel() -> None:
    assert set(linear_bench._variants(8)) == {"cublas", "lt", "skinny"}
    assert set(linear_bench._variants(9)) == {"cublas", "lt"}
