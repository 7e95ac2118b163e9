"""disagg bench: serving benchmark client, offline throughput, result rows and plots."""

from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Where result rows (JSON lines) accumulate; the README table is generated from them."""
