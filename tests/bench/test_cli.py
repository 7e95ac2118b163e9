"""``disagg bench`` dispatch, ``--compare``, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import sys

from bench import cli


def _write(path, **figures):
    base = {"completed": 10, "request_throughput": 2.0, "output_throughput": 100.0,
            "total_token_throughput": 300.0, "request_goodput": None, "mean_ttft_ms": 50.0,
            "median_ttft_ms": 40.0, "std_ttft_ms": 5.0, "p99_ttft_ms": 90.0,
            "mean_itl_ms": 10.0, "p99_itl_ms": 20.0, "ttfts": [0.1]}
    base.update(figures)
    path.write_text(json.dumps(base))
    return str(path)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_compare_prints_b_over_a(tmp_path, capsys):
    a = _write(tmp_path / "a.json")
    b = _write(tmp_path / "b.json", output_throughput=150.0, median_ttft_ms=20.0)
    assert cli.main(["--compare", a, b]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert lines["output_throughput"][-1] == "1.500"
    assert lines["median_ttft_ms"][-1] == "0.500"
    assert lines["p99_ttft_ms"][-1] == "1.000"
    assert "std_ttft_ms" not in lines and "request_goodput" not in lines  # std, None skipped


def test_compare_errors(tmp_path, capsys):
    a = _write(tmp_path / "a.json")
    assert cli.main(["--compare", a]) == 2
    assert "exactly two result files" in _one_error_line(capsys)
    assert cli.main(["--compare", a, str(tmp_path / "missing.json")]) == 2
    assert "no such result file" in _one_error_line(capsys)
    (tmp_path / "bad.json").write_text("{not json")
    assert cli.main(["--compare", a, str(tmp_path / "bad.json")]) == 2
    assert "is not a JSON result file" in _one_error_line(capsys)
    (tmp_path / "other.json").write_text("{}")
    assert cli.main(["--compare", a, str(tmp_path / "other.json")]) == 2
    assert "not a benchmark result" in _one_error_line(capsys)


def test_no_or_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "usage:" in capsys.readouterr().out
    assert cli.main(["serv"]) == 2
    assert "unknown command 'serv'" in _one_error_line(capsys)
    assert cli.main(["--help"]) == 0


def test_missing_subcommand_module_gives_one_line(monkeypatch, capsys):
    monkeypatch.setitem(cli._COMMANDS, "transfer", "bench._no_such_module")
    assert cli.main(["transfer", "--help"]) == 2
    assert "'transfer' is not available" in _one_error_line(capsys)


def test_throughput_without_engine_gives_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "disagg.llm", None)  # import raises ImportError
    assert cli.main(["throughput", "--model", "builtin:tiny"]) == 2
    err = _one_error_line(capsys)
    assert err.startswith("disagg bench throughput: error: the offline engine")


def test_serve_dispatch_and_help(capsys):
    assert cli.main(["serve", "--help"]) == 0  # argparse's SystemExit becomes a return code
    assert "--sweep-concurrency" in capsys.readouterr().out
    assert cli.main(["serve", "--model", "m", "--request-rate", "-1"]) == 2
    assert "--request-rate" in _one_error_line(capsys)


def _subcommand_parsers():
    """``(name, parser)`` of every ``disagg bench`` subcommand, built as the command does."""
    import argparse
    import importlib

    for name, module_name in sorted(cli._COMMANDS.items()):
        parser = importlib.import_module(module_name).build_parser()
        assert isinstance(parser, argparse.ArgumentParser)
        yield name, parser


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default():
    import argparse

    names = []
    for name, parser in _subcommand_parsers():
        names.append(name)
        formatter = parser._get_formatter()
        for action in parser._actions:
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help.strip(), f"{flag} has no help"
            shown = formatter._expand_help(action) if action.help else ""
            default = action.default
            if default is argparse.SUPPRESS or action.required:
                continue  # --help; a required flag has no default
            # shown by the formatter, or (None: no value to show) said by the help itself
            assert "default" in shown, f"{flag} does not say its default {default!r}"
            if default is False and action.nargs == 0:
                assert shown.endswith("(default: off)"), flag
        parser.format_help()  # every help string formats (a bare % would raise)
    assert names == ["serve", "throughput", "transfer"]


def test_bench_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in ("serve", "throughput", "transfer", "--compare"))
