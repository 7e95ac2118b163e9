"""deploy/systemd: the units parse (``systemd-analyze verify`` when present, a structural check
of sections and keys always), run as a non-root user with a restart policy and a stop
timeout, and their ExecStart lines, with the example environment files substituted the way
systemd does it, are accepted by the real ``disagg serve`` / ``disagg-proxy`` parsers."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_plan import REPO_ROOT

from connectors.protocol import kv_ports
from disagg.cli import build_parser, engine_config_from_args
from proxy.launcher import parse_args as parse_proxy_args
from proxy.launcher import proxy_config

SYSTEMD = REPO_ROOT / "deploy" / "systemd"
UNITS = ("disagg-prefill@.service", "disagg-decode@.service", "disagg-proxy.service")
ROLES = {"prefill": "kv_producer", "decode": "kv_consumer"}
INSTANCE = "0"
STATE_DIR = "/var/lib"
"""What ``%S`` is for a system unit."""
_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_BARE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """section -> key -> every value given (systemd's syntax: ``#``/``;`` comments, a trailing
    backslash continues the line)."""
    unit: Unit = {}
    section = None
    logical = re.sub(r"\\\n\s*", " ", text)
    for line in logical.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            section = line[1:-1]
            assert section not in unit, f"[{section}] twice"
            unit[section] = {}
            continue
        assert section is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key.strip()), line
        unit[section].setdefault(key.strip(), []).append(value.strip())
    return unit


def parse_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile: KEY=VALUE lines, comments, optional quotes around the value."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}: {line!r}"
        env[key] = value[1:-1] if value[:1] == value[-1:] and value[:1] in "'\"" and \
            len(value) > 1 else value
    return env


def load(name: str) -> Unit:
    """One unit of deploy/systemd."""
    return parse_unit((SYSTEMD / name).read_text())


def environment(unit: Unit) -> dict[str, str]:
    """The unit's environment: its EnvironmentFiles (the examples beside it, for instance 0)
    in order, then its Environment= lines."""
    env: dict[str, str] = {}
    for path in unit["Service"]["EnvironmentFile"]:
        name = Path(path.replace("%i", INSTANCE)).name
        env.update(parse_env_file(SYSTEMD / name))
    for line in unit["Service"].get("Environment", []):
        key, _, value = line.partition("=")
        env[key] = value
    return env


def exec_start(unit: Unit, **overrides: str) -> list[str]:
    """ExecStart as the argv systemd would run: words split (quotes removed), specifiers
    replaced, then ``${VAR}`` inside words and ``$VAR`` as whole words (split at spaces)."""
    env = {**environment(unit), **overrides}
    command, = unit["Service"]["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(command.replace("%i", INSTANCE).replace("%S", STATE_DIR)):
        bare = _BARE.fullmatch(word)
        if bare:
            argv += env.get(bare.group(1), "").split()
        else:
            argv.append(_BRACED.sub(lambda m: env.get(m.group(1), ""), word))
    return argv


def used_variables(unit: Unit) -> set[str]:
    """The variables ExecStart reads."""
    command, = unit["Service"]["ExecStart"]
    return set(_BRACED.findall(command)) | set(_BARE.findall(command))


@pytest.mark.parametrize("name", UNITS)
def test_units_have_the_sections_and_keys_systemd_needs(name: str) -> None:
    unit = load(name)
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    assert unit["Unit"]["Description"] and unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert service["Type"] == ["exec"]
    assert service["Restart"] == ["on-failure"]
    assert int(service["TimeoutStopSec"][0]) > 0
    assert service["User"] == ["disagg"] and service["Group"] == ["disagg"]
    assert service["NoNewPrivileges"] == ["yes"]
    command, = service["ExecStart"]
    assert command.startswith("/opt/disagg/venv/bin/disagg")
    assert all(p.startswith("/etc/disagg/") for p in service["EnvironmentFile"])


@pytest.mark.parametrize("name", UNITS)
def test_every_variable_execstart_reads_is_in_the_example_files(name: str) -> None:
    unit = load(name)
    missing = used_variables(unit) - environment(unit).keys()
    assert missing == set(), f"{name} reads {sorted(missing)} that no EnvironmentFile sets"


@pytest.mark.parametrize("role", list(ROLES))
def test_instance_execstart_is_a_valid_disagg_serve(role: str) -> None:
    unit = load(f"disagg-{role}@.service")
    env = environment(unit)
    argv = exec_start(unit)
    assert Path(argv[0]).name == "disagg" and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])
    assert (args.host, args.port) == (env["SERVE_HOST"], int(env["SERVE_PORT"]))
    # the model directory exists only on the node: the rest is checked on the built-in one
    cfg = engine_config_from_args(build_parser().parse_args(
        exec_start(unit, MODEL="builtin:tiny-llama")[1:]))
    assert cfg.kv_transfer is not None and cfg.kv_transfer.kv_role == ROLES[role]
    extra = cfg.kv_transfer.kv_connector_extra_config
    assert (extra["transport"], extra["mode"], extra["host"]) == (
        env["KV_TRANSPORT"], env["KV_MODE"], env["SERVE_HOST"])
    assert cfg.parallel.data_parallel_size == int(env["DP_SIZE"])
    assert args.proxy_address == env["PROXY_ADDRESS"]
    # own GPUs first: as many as the instance has engine cores x TP ranks
    visible = env["HIP_VISIBLE_DEVICES"].split(",")
    assert len(visible) >= int(env["DP_SIZE"]) * int(env["TP_SIZE"])


def test_instance_args_split_into_words() -> None:
    unit = load("disagg-decode@.service")
    argv = exec_start(unit, INSTANCE_ARGS="--max-num-seqs 64  --block-size 32")
    assert argv[-4:] == ["--max-num-seqs", "64", "--block-size", "32"]
    args = build_parser().parse_args(argv[1:])
    assert (args.max_num_seqs, args.block_size) == (64, 32)


def test_example_instances_use_disjoint_ports_and_own_gpus() -> None:
    envs = [environment(load(f"disagg-{role}@.service")) for role in ROLES]
    used: set[int] = set()
    for env in envs:
        ports = {int(env["SERVE_PORT"])} | {
            p for rank in range(int(env["DP_SIZE"]))
            for p in kv_ports(int(env["KV_BASE_PORT"]), rank)}
        assert not ports & used
        used |= ports
    own = [set(env["HIP_VISIBLE_DEVICES"].split(",")[:int(env["DP_SIZE"])]) for env in envs]
    assert not own[0] & own[1]


def test_proxy_execstart_is_a_valid_disagg_proxy_the_instances_register_with() -> None:
    unit = load("disagg-proxy.service")
    env = environment(unit)
    argv = exec_start(unit)
    assert Path(argv[0]).name == "disagg-proxy"
    args = parse_proxy_args(argv[1:])
    cfg = proxy_config(args)
    assert (cfg.host, cfg.port, cfg.mode.value) == (env["PROXY_HOST"], int(env["PROXY_PORT"]),
                                                    env["KV_MODE"])
    assert args.registration_address == env["PROXY_REGISTRATION_BIND"]
    assert env["PROXY_ADDRESS"].rsplit(":", 1)[1] == \
        env["PROXY_REGISTRATION_BIND"].rsplit(":", 1)[1]
    assert "PrivateDevices" in unit["Service"]  # no GPU, no device
    assert "SupplementaryGroups" not in unit["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    """The units as systemd reads them (templates as instance 0; ExecStart pointed at fake
    executables, since verify also checks that the binary exists)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("disagg", "disagg-proxy"):
        (bin_dir / program).write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / program).chmod(0o755)
    paths = []
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/disagg/venv/bin/", f"{bin_dir}/")
        path = tmp_path / name.replace("@.", f"@{INSTANCE}.")
        path.write_text(text)
        paths.append(str(path))
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
