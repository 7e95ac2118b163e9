"""bench.fault_matrix: how the matrix test's per-case records become one row."""

from __future__ import annotations

from bench.fault_matrix import summarize


def test_summary_counts_per_deployment_and_in_total() -> None:
    cases = [
        {"transport": "tcp", "mode": "read", "fault": "a", "equal": 1, "error": 2, "wrong": 0,
         "bad_error": 0},
        {"transport": "tcp", "mode": "read", "fault": "b", "equal": 3, "error": 0, "wrong": 0,
         "bad_error": 0},
        {"transport": "nixl", "mode": "write", "fault": "a", "equal": 0, "error": 2, "wrong": 1,
         "bad_error": 0},
    ]
    row = summarize(cases)
    assert row["faults"] == 2 and row["cases"] == 3 and row["requests"] == 9
    assert (row["equal"], row["error"], row["wrong"]) == (4, 4, 1)
    assert row["by_deployment"]["tcp-read"] == {"equal": 4, "error": 2, "wrong": 0,
                                                "bad_error": 0}
    assert row["by_deployment"]["nixl-write"]["wrong"] == 1
