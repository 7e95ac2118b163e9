"""``disagg-proxy``: argument handling, proxy-only mode, and --launch with fake instances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prom_text import samples

from disagg.common import platform as plat
from proxy.config import PolicyName, TransferMode
from proxy.launcher import launch_config, main, parse_args, proxy_config, with_kv_registration
from proxy.local_instances import plan_instances

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_INSTANCE = Path(__file__).with_name("fake_instance.py")
FAKE_COMMAND = f"{sys.executable} {FAKE_INSTANCE}"


def test_usage_errors_exit_2_with_one_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "give --prefill/--decode URLs, --registration-address, or --launch" in \
        capsys.readouterr().err
    assert main(["--launch", "--num-prefill", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    assert main(["--decode", "http://h:1", "--", "--x"]) == 2
    assert "for --launch instances" in capsys.readouterr().err
    assert main(["--decode", "http://h:1", "--policy", "random"]) == 2


def test_arguments_become_a_proxy_config() -> None:
    args = parse_args(["--prefill", "http://a:1", "http://b:2", "--decode", "c:3",
                       "--mode", "write", "--policy", "power_of_two", "--port", "9000",
                       "--local-prefill-threshold", "64", "--admin-key", "k",
                       "--registration-address", "tcp://127.0.0.1:7000",
                       "--first-byte-timeout-s", "12"])
    cfg = proxy_config(args)
    assert cfg.prefill_urls == ("http://a:1", "http://b:2") and cfg.decode_urls == ("http://c:3",)
    assert cfg.mode is TransferMode.WRITE and cfg.policy is PolicyName.POWER_OF_TWO
    assert (cfg.port, cfg.local_prefill_threshold_tokens, cfg.admin_key) == (9000, 64, "k")
    assert cfg.registration_address == "tcp://127.0.0.1:7000"
    assert cfg.first_byte_timeout_s == 12.0 and cfg.model is None


def test_kv_aware_launch_registers_its_instances() -> None:
    args = parse_args(["--launch", "--policy", "kv_aware", "--kv-index-max-hashes", "99"])
    cfg, launch = with_kv_registration(proxy_config(args), launch_config(args))
    assert cfg.kv_index_max_hashes == 99
    assert cfg.registration_address is not None
    assert launch.instance_args[-2:] == ("--proxy-address", cfg.registration_address)
    args = parse_args(["--launch", "--policy", "kv_aware",
                       "--registration-address", "tcp://*:7000"])
    cfg, launch = with_kv_registration(proxy_config(args), launch_config(args))
    assert cfg.registration_address == "tcp://*:7000"
    assert launch.instance_args[-2:] == ("--proxy-address", "tcp://127.0.0.1:7000")
    args = parse_args(["--launch"])  # other policies: instances stay static only
    assert with_kv_registration(proxy_config(args), launch_config(args))[1].instance_args == ()


def test_instance_arguments_come_from_both_spellings() -> None:
    args = parse_args(["--launch", "--instance-arg=--max-num-seqs=4", "--", "--foo", "bar"])
    assert args.instance_args == ["--max-num-seqs=4", "--foo", "bar"]
    assert proxy_config(args).model == "builtin:tiny-llama"


def test_a_busy_port_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["--decode", "http://127.0.0.1:9", "--port", str(port)]) == 1
    assert f"disagg-proxy: error: cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


class Launcher:
    """``python -m proxy.launcher ARGS`` as a child, its stderr collected in the background."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr: list[str] = []
        self._drain = asyncio.ensure_future(self._read_stderr())

    @classmethod
    async def start(cls, *args: str) -> Launcher:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.launcher", *args, cwd=REPO_ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(process)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode().rstrip())

    async def ready_url(self, timeout_s: float = 30.0) -> str:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        text = line.decode().strip()
        assert text.startswith("disagg-proxy: ready on http://"), (text, self.stderr[-20:])
        return text.rsplit(" ", 1)[1]

    async def wait(self, timeout_s: float = 30.0) -> int:
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        await asyncio.wait_for(self._drain, 5.0)
        return code


@pytest.fixture
async def launchers() -> Any:
    started: list[Launcher] = []

    async def make(*args: str) -> Launcher:
        launcher = await Launcher.start(*args)
        started.append(launcher)
        return launcher

    yield make
    for launcher in started:
        if launcher.process.returncode is None:
            launcher.process.send_signal(signal.SIGTERM)
            await launcher.wait(timeout_s=20)


def _launch_args(*extra: str) -> list[str]:
    return ["--launch", "--port", "0", "--instance-command", FAKE_COMMAND,
            "--health-check-interval-s", "0.2", "--ready-timeout-s", "30", *extra]


async def _instance_urls(http: aiohttp.ClientSession, proxy_url: str) -> list[str]:
    async with http.get(proxy_url + "/metrics") as resp:
        text = await resp.text()
    return [labels["url"] for labels, healthy in samples(text, "disagg_proxy_instance_healthy")
            if healthy == 1]


async def test_launch_serves_through_local_instances_and_stops_on_sigterm(
        launchers: Any, http: aiohttp.ClientSession) -> None:
    launcher = await launchers(*_launch_args("--num-prefill", "2", "--num-decode", "2"))
    url = await launcher.ready_url()
    for _ in range(4):
        async with http.post(url + "/v1/completions",
                             json={"model": "m", "prompt": "hi", "max_tokens": 3}) as resp:
            assert resp.status == 200
            assert "tok2" in (await resp.json())["choices"][0]["text"]
    instances = await _instance_urls(http, url)
    assert len(instances) == 4
    async with http.get(url + "/metrics") as resp:
        per_instance = [n for _, n in samples(await resp.text(),
                                              "disagg_proxy_instance_requests_total")]
    assert per_instance == [2, 2, 2, 2]
    launcher.process.send_signal(signal.SIGTERM)
    assert await launcher.wait() == 0
    for instance in instances:  # every child is gone with the launcher
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(instance + "/health"):
                pass


async def test_a_dying_instance_stops_everything_with_one_line(launchers: Any) -> None:
    launcher = await launchers(*_launch_args("--", "--fake-exit-after-s", "1.0",
                                             "--fake-exit-role", "kv_consumer"))
    await launcher.ready_url()
    assert await launcher.wait() == 1
    (line,) = [s for s in launcher.stderr if s.startswith("disagg-proxy: decode-0 (pid ")]
    assert "exited with code 3" in line and line.endswith("; shutting down")


async def test_restart_policy_restarts_then_gives_up(launchers: Any) -> None:
    launcher = await launchers(*_launch_args("--on-instance-exit", "restart",
                                             "--max-restarts", "1", "--",
                                             "--fake-exit-after-s", "0.5",
                                             "--fake-exit-role", "kv_producer"))
    await launcher.ready_url()
    assert await launcher.wait() == 1
    assert any(s.endswith("; restarting it") for s in launcher.stderr)
    assert any(s.endswith("; shutting down") for s in launcher.stderr)


async def test_an_instance_that_cannot_start_fails_the_launch(launchers: Any) -> None:
    launcher = await launchers("--launch", "--port", "0", "--instance-command",
                               f"{sys.executable} -c 'import sys; sys.exit(5)'")
    assert await launcher.wait() == 1
    pattern = re.compile(r"disagg-proxy: error: (prefill|decode)-0 \(pid \d+\) exited with "
                         r"code 5 before it was ready$")
    assert any(pattern.match(s) for s in launcher.stderr), launcher.stderr


async def test_proxy_only_mode_serves_static_instances(launchers: Any, fakes: Any,
                                                       http: aiohttp.ClientSession) -> None:
    p, d = await fakes(role="kv_producer"), await fakes(role="kv_consumer")
    launcher = await launchers("--prefill", p.url, "--decode", d.url, "--port", "0")
    url = await launcher.ready_url()
    async with http.post(url + "/v1/completions", json={"model": "m", "prompt": "x"}) as resp:
        assert resp.status == 200
    assert len(p.requests) == 1 and len(d.requests) == 1
    launcher.process.send_signal(signal.SIGINT)
    assert await launcher.wait() == 0


async def _real_completions(http: aiohttp.ClientSession, url: str) -> list[str]:
    texts = []
    for prompt in ("Hello there", "The quick brown fox jumps over the lazy dog"):
        body = {"model": "builtin:tiny-llama", "prompt": prompt, "max_tokens": 12,
                "temperature": 0}
        async with http.post(url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            texts.append((await resp.json())["choices"][0]["text"])
    return texts


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "tp"), [
    ("read", ()), ("write", ()),
    ("read", ("--tp-prefill", "2")), ("write", ("--tp-decode", "2"))])
async def test_real_launch_matches_a_monolithic_instance(launchers: Any, mode: str,
                                                         tp: tuple[str, ...],
                                                         http: aiohttp.ClientSession) -> None:
    """``disagg serve`` for real: 1P1D through the proxy answers like one instance, mixed
    tensor-parallel sizes (gloo on CPU) included."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        mono_port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    mono = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "disagg.cli", "serve", "builtin:tiny-llama", "--device", "cpu",
        "--port", str(mono_port), cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        launcher = await launchers("--launch", "--port", "0", "--mode", mode, *tp)
        url = await launcher.ready_url(timeout_s=120)
        assert mono.stdout is not None
        line = await asyncio.wait_for(mono.stdout.readline(), 120)
        assert b"disagg: ready on" in line
        expected = await _real_completions(http, f"http://127.0.0.1:{mono_port}")
        assert await _real_completions(http, url) == expected
    finally:
        mono.terminate()
        await asyncio.wait_for(mono.wait(), 20)


def test_kv_params_key_comes_from_the_flag_the_environment_or_is_made_for_launch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISAGG_KV_PARAMS_KEY", raising=False)
    assert proxy_config(parse_args(["--decode", "h:1"])).kv_params_key is None
    assert proxy_config(parse_args(["--decode", "h:1", "--kv-params-key", "k"])).kv_params_key \
        == "k"
    made = {proxy_config(parse_args(["--launch"])).kv_params_key for _ in range(2)}
    assert len(made) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", k or "") for k in made)
    monkeypatch.setenv("DISAGG_KV_PARAMS_KEY", "env-key")
    assert proxy_config(parse_args(["--launch"])).kv_params_key == "env-key"
    assert proxy_config(parse_args(["--decode", "h:1", "--kv-params-key", "k"])).kv_params_key \
        == "k"


def test_registration_key_comes_from_the_flag_the_environment_or_is_made_for_launch(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("DISAGG_REGISTRATION_KEY", raising=False)
    assert proxy_config(parse_args(["--decode", "h:1"])).registration_key is None
    args = parse_args(["--launch", "--device", "cpu", "--policy", "kv_aware"])
    cfg, launch = with_kv_registration(proxy_config(args),
                                       launch_config(args, None, args.registration_key))
    assert re.fullmatch(r"[0-9a-f]{32}", cfg.registration_key or "")
    for spec in plan_instances(launch):  # in the environment: not visible in ps
        assert spec.env["DISAGG_REGISTRATION_KEY"] == cfg.registration_key
        assert cfg.registration_key not in " ".join(spec.argv)
    monkeypatch.setenv("DISAGG_REGISTRATION_KEY", "env-key-123")
    assert proxy_config(parse_args(["--registration-address", "tcp://127.0.0.1:*"])) \
        .registration_key == "env-key-123"
    for argv, env in ((["--decode", "h:1", "--registration-key", "short"], "env-key-123"),
                      (["--decode", "h:1"], "short")):
        monkeypatch.setenv("DISAGG_REGISTRATION_KEY", env)
        with pytest.raises(SystemExit) as exc:
            parse_args(argv)
        assert exc.value.code == 2 and "8+ characters" in capsys.readouterr().err


def test_launched_instances_get_the_proxys_key() -> None:
    args = parse_args(["--launch", "--device", "cpu"])
    cfg = proxy_config(args)
    assert launch_config(args, cfg.kv_params_key).kv_params_key == cfg.kv_params_key


async def test_launch_shares_a_generated_key_with_its_instances(
        launchers: Any, http: aiohttp.ClientSession) -> None:
    launcher = await launchers(*_launch_args())
    url = await launcher.ready_url()
    async with http.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}) as resp:
        assert resp.status == 200  # the fakes refuse kv_transfer_params without the key
    for instance in await _instance_urls(http, url):
        async with http.post(instance + "/v1/kv_transfer/abort",
                             json={"transfer_id": "t"}) as resp:
            assert resp.status == 401  # a key was made, and nobody else has it


def test_tp_sizes_are_checked_and_given_only_through_our_flags(
        capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in (("--tp-prefill", "0"), ("--tp-decode", "65")):
        assert main(["--launch", flag, value]) == 2
        assert f"{flag} must be between 1 and 64, got {value}" in capsys.readouterr().err
    assert main(["--launch", "--", "-tp", "2"]) == 2
    assert "as --tp-prefill/--tp-decode, not as an instance argument" in \
        capsys.readouterr().err
    assert main(["--launch", "--instance-arg=--data-parallel-size=x"]) == 2
    assert "instance argument --data-parallel-size" in capsys.readouterr().err


def test_tp_flags_pass_through_to_each_role() -> None:
    args = parse_args(["--launch", "--device", "cpu", "--tp-prefill", "2", "--tp-decode", "4",
                       "--num-decode", "2"])
    launch = launch_config(args)
    assert (launch.tp_prefill, launch.tp_decode, launch.gpus_per_instance) == (2, 4, None)
    specs = plan_instances(launch)
    sizes = [s.argv[list(s.argv).index("--tensor-parallel-size") + 1] for s in specs]
    assert sizes == ["2", "4", "4"]
    assert launch_config(parse_args(["--launch"])).tp_prefill == 1


def test_too_few_gpus_fail_the_launch_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    info = plat.PlatformInfo(plat.PlatformKind.CUDA, 4, "sm_90", 32, "H100", "2.6", None,
                             "12.8")
    monkeypatch.setattr(plat, "current_platform", lambda: info)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    marker = tmp_path / "started"
    command = f"{sys.executable} -c 'open({str(marker)!r}, \"w\")'"
    assert main(["--launch", "--port", "0", "--model", "m", "--tp-prefill", "4",
                 "--tp-decode", "2", "--instance-command", command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["disagg-proxy: error: 1 prefill x 4 GPU(s) (tp 4) + 1 decode x 2 GPU(s) "
                   "(tp 2) need 6 GPUs; 4 visible (CUDA_VISIBLE_DEVICES=unset); lower "
                   "--tp-prefill/--tp-decode or the instance counts, or make more GPUs "
                   "visible"]
    assert not marker.exists()


def test_connector_options_merge_into_what_the_launcher_writes(
        capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--launch", "--device", "cpu", "--transport", "tcp", "--mode", "write",
                       "--kv-connector-extra-config",
                       '{"transfer_timeout": 7, "verify_kv": true}'])
    for spec in plan_instances(launch_config(args)):
        cfg = json.loads(spec.argv[list(spec.argv).index("--kv-transfer-config") + 1])
        extra = cfg["kv_connector_extra_config"]
        assert (extra["transfer_timeout"], extra["verify_kv"]) == (7, True)
        assert (extra["transport"], extra["mode"]) == ("tcp", "write")
        assert cfg["kv_role"] in ("kv_producer", "kv_consumer")
    for argv, words in (
            (["--launch", "--", "--kv-transfer-config", '{"kv_role": "kv_both"}'],
             "pass connector options with --kv-connector-extra-config"),
            (["--launch", "--instance-arg=--kv-transfer-config={}"],
             "writes each instance's --kv-transfer-config"),
            (["--launch", "--kv-connector-extra-config", '{"transport": "nixl"}'],
             "give 'transport' as --transport"),
            (["--launch", "--kv-connector-extra-config", "[1]"], "must be a JSON object"),
            (["--launch", "--kv-connector-extra-config", "{"], "not valid JSON"),
            (["--decode", "http://h:1", "--kv-connector-extra-config", "{}"],
             "is for --launch instances")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err


def test_a_registration_address_in_use_is_one_line_and_leaks_nothing() -> None:
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-c", "import sys; from proxy.launcher import main; "
             "sys.exit(main(sys.argv[1:]))", "--port", "0", "--decode", "http://127.0.0.1:9",
             "--registration-address", f"tcp://127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert run.returncode != 0
    # the sessions opened before the registration socket failed are closed, not leaked
    assert f"disagg-proxy: error: cannot bind registration address tcp://127.0.0.1:{port}" \
        in run.stderr and "Unclosed" not in run.stderr and "Traceback" not in run.stderr, \
        run.stderr


async def test_real_instances_shut_down_when_the_launcher_is_sigkilled(
        launchers: Any, http: aiohttp.ClientSession) -> None:
    """A SIGKILLed launcher runs no cleanup; its `disagg serve` instances notice that their
    parent is gone (DISAGG_PARENT_PID) and shut down as on SIGTERM, their engine cores with
    them, instead of living on holding their ports and memory."""
    import psutil

    launcher = await launchers("--launch", "--port", "0", "--health-check-interval-s", "0.2",
                               "--ready-timeout-s", "120", "--", "--kv-cache-memory-bytes",
                               "16MiB")
    url = await launcher.ready_url(timeout_s=120)
    assert len(await _instance_urls(http, url)) == 2
    family = psutil.Process(launcher.process.pid).children(recursive=True)
    assert len(family) >= 4  # two instances, each with an engine core
    try:
        launcher.process.kill()
        await launcher.wait()
        _, alive = await asyncio.to_thread(psutil.wait_procs, family, 30)
        assert not alive, f"still running after their launcher died: {alive}"
    finally:
        for proc in family:
            with contextlib.suppress(psutil.Error):
                proc.kill()
