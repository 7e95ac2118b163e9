"""``disagg bench``: dispatch to serve, throughput, transfer, or compare two results."""

from __future__ import annotations

import importlib
import sys

from bench.argparsing import USAGE_EXIT_CODE

PROG = "disagg bench"
USAGE = (f"usage: {PROG} serve|throughput|transfer [options]  |  "
         f"{PROG} --compare A.json B.json")
# Subcommand -> module whose main(argv) -> int runs it (and whose build_parser() is its
# parser); imported only when chosen.
_COMMANDS = {"serve": "bench.serve", "throughput": "bench.throughput",
             "transfer": "bench.transfer"}
_SUMMARIES = {
    "serve": "benchmark an OpenAI-compatible streaming endpoint (vllm bench serve's flags)",
    "throughput": "offline generation throughput of the engine in one process",
    "transfer": "KV transport throughput between two processes",
    "--compare": "print B/A for the key metrics of two saved results",
}
HELP = USAGE + "\n\n" + "\n".join(f"  {name:<12}{text}" for name, text in _SUMMARIES.items()) \
    + f"\n\n'{PROG} COMMAND --help' lists a command's options."


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return USAGE_EXIT_CODE


def compare(argv: list[str]) -> int:
    """``--compare A.json B.json``: print B/A for the key metrics."""
    from bench.results import ResultFileError, format_compare, load_result

    if len(argv) != 2:
        return _usage_error("--compare takes exactly two result files: A.json B.json")
    try:
        a, b = load_result(argv[0]), load_result(argv[1])
    except ResultFileError as exc:
        return _usage_error(str(exc))
    print(format_compare(a, b, argv[0], argv[1]))
    return 0


def _run_command(name: str, argv: list[str]) -> int:
    """Import the subcommand's module lazily and run its ``main``."""
    try:
        module = importlib.import_module(_COMMANDS[name])
    except ModuleNotFoundError as exc:
        if exc.name != _COMMANDS[name]:
            raise
        return _usage_error(f"'{name}' is not available in this build ({exc.name} is missing)")
    return int(module.main(argv))


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``disagg bench``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else USAGE_EXIT_CODE
    if argv[0] == "--compare":
        return compare(argv[1:])
    if argv[0] not in _COMMANDS:
        return _usage_error(f"unknown command {argv[0]!r}; {USAGE}")
    return _run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
