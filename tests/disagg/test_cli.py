"""The flags of ``disagg serve`` and ``disagg-proxy`` as ``--help`` shows them, and the logging
flags vLLM operators bring along."""

from __future__ import annotations

import argparse

import pytest

from disagg import cli
from disagg.common.help_formatter import shown_help
from proxy.launcher import build_parser as proxy_parser


def _serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


@pytest.mark.parametrize("parser", [_serve_parser(), proxy_parser()],
                         ids=["disagg serve", "disagg-proxy"])
def test_every_flag_has_help_and_shows_its_default(parser: argparse.ArgumentParser) -> None:
    hidden = {"--instance-command"}  # the launcher's test hook, deliberately not shown
    missing = []
    for action in parser._actions:
        name = (action.option_strings or [action.dest])[-1]
        if isinstance(action, argparse._HelpAction) or name in hidden:
            continue
        text = shown_help(action)
        if not text or text == argparse.SUPPRESS or "default" not in text.lower():
            missing.append(name)
    assert not missing, f"flags without help or a shown default: {missing}"
    assert "(default: " in parser.format_help()  # the formatter is the one checked above


def test_log_request_flags_and_their_vllm_inverse() -> None:
    parse = cli.build_parser().parse_args
    assert parse(["serve"]).enable_log_requests is False
    assert parse(["serve", "--enable-log-requests"]).enable_log_requests is True
    assert parse(["serve", "--enable-log-requests", "--disable-log-requests"]
                 ).enable_log_requests is False
    args = parse(["serve", "--log-level", "DEBUG", "--log-format", "json",
                  "--disable-log-stats"])
    assert (args.log_level, args.log_format, args.disable_log_stats) == ("debug", "json", True)


def test_a_bad_log_level_in_the_environment_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DISAGG_LOG_LEVEL", "chatty")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disagg: error: log level 'chatty'") and err.count("\n") == 1, err


@pytest.mark.parametrize(("args", "says"), [
    (["--port", "70000"], "a port is 0 to 65535"),
    (["--port", "-1"], "a port is 0 to 65535"),
    (["--kv-transfer-config", '{"kv_connector": 5}'], "must be strings"),
])
def test_bad_flag_values_are_one_line(args: list[str], says: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from disagg.cli import main

    try:
        code = main(["serve", "builtin:tiny-llama", *args])
    except SystemExit as exc:  # argparse's own refusal
        code = int(exc.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_device_cuda_without_a_gpu_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from disagg.common.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        cli.check_device("cuda")
    cli.check_device("cpu")


@pytest.mark.parametrize("args", [
    ["--health-check-interval-s", "0"], ["--health-check-interval-s", "nan"],
    ["--max-prefill-attempts", "0"], ["--max-decode-attempts", "-1"],
    ["--connect-timeout-s", "-1"], ["--request-timeout-s", "0"],
    ["--max-missed-heartbeats", "0"], ["--port", "70000"], ["--instance-base-port", "70000"],
    ["--kv-index-max-hashes", "-1"], ["--max-restarts", "-1"], ["--ready-timeout-s", "0"],
    ["--stop-timeout-s", "nan"]])
def test_proxy_flags_out_of_range_are_refused(args: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """They were accepted: a 0 s health interval spun a core, 0 attempts answered every
    request 502."""
    with pytest.raises(SystemExit) as info:
        proxy_parser().parse_args(args)
    assert info.value.code == 2 and args[0] in capsys.readouterr().err


@pytest.mark.parametrize(("parse", "args"), [
    ("proxy", ["--prefill", "ftp://x:1"]), ("proxy", ["--registration-address", "bogus"]),
    ("proxy", ["--registration-address", "tcp://h:70000"]),
    ("serve", ["--proxy-address", "tcp://127.0.0.1:notaport"]),
    ("serve", ["--proxy-address", "tcp://127.0.0.1:*"]),  # a port only a bind may leave open
    ("serve", ["--proxy-address", "http://x"])])
def test_addresses_are_checked_when_parsed(parse: str, args: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A bad --proxy-address used to kill the registration thread after "ready"."""
    with pytest.raises(SystemExit) as info:
        if parse == "proxy":
            proxy_parser().parse_args(args)
        else:
            cli.build_parser().parse_args(["serve", "builtin:tiny-llama", *args])
    assert info.value.code == 2 and args[0] in capsys.readouterr().err


def test_good_addresses_pass() -> None:
    args = proxy_parser().parse_args(["--prefill", "h:8100", "--registration-address",
                                      "tcp://0.0.0.0:*", "--decode", "https://d:1/"])
    assert args.prefill == ["http://h:8100"] and args.decode == ["https://d:1"]
    serve = cli.build_parser().parse_args(["serve", "m", "--proxy-address", "tcp://[::1]:5"])
    assert serve.proxy_address == "tcp://[::1]:5"


@pytest.mark.parametrize(("args", "says"), [
    (["--tp-timeout", "nan"], "--tp-timeout"), (["--dp-collective-timeout", "inf"],
                                                "--dp-collective-timeout"),
    (["--served-model-name", ""], "must not be empty"),
    (["--kv-transfer-config", "{}"], "needs kv_connector"),
    (["--registration-key", "short"], "8+ characters"),
    (["--tokenizer", "/nonexistent"], "no tokenizer files there"),
    (["--tokenizer", "/"], "no tokenizer files there"),
    (["--chat-template", "/"], "is not a regular file"),
    (["--chat-template", "{{ messages }}"], "needs a Hugging Face tokenizer")])
def test_more_bad_values_are_one_line(args: list[str], says: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main(["serve", "builtin:tiny-llama", *args])
    except SystemExit as exc:
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err, err


def test_a_short_registration_key_in_the_environment_is_one_line(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DISAGG_REGISTRATION_KEY", "short")
    assert cli.main(["serve", "builtin:tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("disagg: error: DISAGG_REGISTRATION_KEY: a registration key needs") \
        and err.count("\n") == 1, err


def test_a_kv_port_in_use_is_a_configuration_error() -> None:
    import socket

    from connectors.control_plane import ControlPlane
    from disagg.common.config import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            ControlPlane("127.0.0.1", port, 0, lambda peer: None)


@pytest.mark.parametrize(("parse", "argv", "prog"), [
    ("disagg", ["serve", "--port", "x"], "disagg serve"), ("disagg", [], "disagg"),
    ("proxy", ["--port", "x"], "disagg-proxy"), ("proxy", ["--num-prefill"], "disagg-proxy")])
def test_argparse_errors_are_one_line_without_the_usage_page(
        parse: str, argv: list[str], prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.launcher import parse_args

    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(argv) if parse == "disagg" else parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"{prog}: error: ") and f"({prog} --help lists the flags)" in err
