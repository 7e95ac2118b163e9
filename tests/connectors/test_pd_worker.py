"""The P/D worker's copy rows: which bytes of which blocks a post moves."""

from __future__ import annotations

import numpy as np

from connectors.pd_worker import block_rows


def test_whole_blocks_merge_runs_contiguous_on_both_sides() -> None:
    rows = block_rows([3, 4, 5, 9], [10, 11, 20, 21], block_bytes=100, offset=0, length=100)
    # 3,4 -> 10,11 merge; 5 -> 20 and 9 -> 21 do not (9 is not after 5 locally)
    assert rows.tolist() == [[300, 1000, 200], [500, 2000, 100], [900, 2100, 100]]


def test_one_layer_of_each_block_never_merges_across_blocks() -> None:
    rows = block_rows([0, 1], [5, 6], block_bytes=100, offset=40, length=20)
    assert rows.tolist() == [[40, 540, 20], [140, 640, 20]]
    assert rows.dtype == np.int64


def test_unequal_block_lists_pair_up_to_the_shorter_and_empty_is_empty() -> None:
    assert block_rows([1, 2, 3], [7], 10, 0, 10).tolist() == [[10, 70, 10]]
    assert block_rows([], [], 10, 0, 10).shape == (0, 3)
