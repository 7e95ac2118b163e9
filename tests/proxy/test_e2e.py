"""The whole stack on CPU: `disagg-proxy --launch` with real `disagg serve` instances."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil
import pytest
import requests  # type: ignore[import-untyped]
from prom_text import samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTANCE_ARGS = ["--instance-arg=--kv-cache-memory-bytes", "--instance-arg=48MiB"]


def _nixl_ok() -> bool:
    try:
        import nixl  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class Deployment:
    """A running launcher: its proxy URL and process."""

    proc: subprocess.Popen[str]
    url: str

    def instances(self, pool: str | None = None) -> list[str]:
        text = requests.get(self.url + "/metrics", timeout=5).text
        return [labels["url"] for labels, healthy in samples(
            text, "disagg_proxy_instance_healthy") if healthy == 1
            and (pool is None or labels["pool"] == pool)]

    def requests_per_instance(self) -> dict[str, float]:
        text = requests.get(self.url + "/metrics", timeout=5).text
        return {labels["url"]: n for labels, n in samples(
            text, "disagg_proxy_instance_requests_total")}


@contextlib.contextmanager
def launch(*args: str, timeout_s: float = 120) -> Iterator[Deployment]:
    """Start a launcher, wait for its ready line, always tear the whole group down."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DISAGG_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "proxy.launcher", "--launch", "--port", "0",
                             "--health-check-interval-s", "0.5", *INSTANCE_ARGS, *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if line.startswith("disagg-proxy: ready on "):
                break
        assert line.startswith("disagg-proxy: ready on "), f"launcher not ready: {line!r}"
        yield Deployment(proc, line.rsplit(" ", 1)[1].strip())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def wait_clean(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    ranks: list[dict[str, int]] = []
    while time.monotonic() < deadline:
        ranks = requests.get(url + "/v1/kv_ledger", timeout=5).json()["ranks"]
        if all(r["free"] == r["total"] and r["held"] == 0 for r in ranks):
            return
        time.sleep(0.2)
    raise AssertionError(f"{url} ledger not clean: {ranks}")


@pytest.fixture(scope="module")
def default_1p1d() -> Iterator[Deployment]:
    """One 1P1D deployment with the launcher's defaults (READ over tcp), shared by the tests
    that need nothing else; each leaves both instances idle with clean ledgers."""
    with launch("--num-prefill", "1", "--num-decode", "1") as dep:
        yield dep


PROMPTS = ["a", "x" * 15, "y" * 16, "z" * 17, "a longer prompt that spans several blocks " * 6]


def _token_ids(url: str, prompt: str) -> list[int]:
    r = requests.post(url + "/v1/completions", timeout=60, json={
        "model": "builtin:tiny-llama", "prompt": prompt, "max_tokens": 8, "temperature": 0,
        "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    assert "kv_transfer_params" not in r.json()
    return list(r.json()["choices"][0]["token_ids"])


NIXL = pytest.mark.skipif(not _nixl_ok(), reason="nixl is not installed")


@pytest.mark.parametrize(("mode", "transport"), [
    ("read", "tcp"), ("write", "tcp"), pytest.param("write", "nixl", marks=NIXL),
    # READ over nixl is tests/connectors/test_pd_connector.py's (instances without the proxy)
    pytest.param("read", "nixl", marks=[NIXL, pytest.mark.slow])])
def test_proxy_outputs_equal_monolithic(instance_factory, default_1p1d: Deployment,
                                        transport: str, mode: str) -> None:
    mono = instance_factory(["builtin:tiny-llama", "--device", "cpu",
                             "--kv-cache-memory-bytes", "48MiB"])
    expected = [_token_ids(mono.url, p) for p in PROMPTS]
    with contextlib.ExitStack() as stack:
        dep = default_1p1d if (mode, transport) == ("read", "tcp") else stack.enter_context(
            launch("--num-prefill", "1", "--num-decode", "1", "--mode", mode,
                   "--transport", transport))
        assert [_token_ids(dep.url, p) for p in PROMPTS] == expected
        for inst in dep.instances():
            wait_clean(inst)


def _streamed(url: str, path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The text of a stream and its last chunk's disagg_timings (or {})."""
    r = requests.post(url + path, timeout=60, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    text, timings = "", dict[str, Any]()
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            assert "error" not in event, event
            for c in event["choices"]:
                text += c["text"] if "text" in c else c["delta"]["content"]
            timings = event.get("disagg_timings") or timings
    return text, timings


def test_proxy_streams_the_prefill_first_token_and_the_stream_equals_monolithic(
        instance_factory, default_1p1d: Deployment) -> None:
    """READ, streamed: the proxy sends the prefill's token as the first chunk (the decode is
    off the path to the first token: its admission phase is 0) and the decode's stream goes
    on from it; completions and chat equal a monolithic instance's stream. A request with a
    stop string takes the decode's first token instead, with the same output. Prompts whose
    first token is an incomplete character take the decode's path too (the tiny model's
    tokens are bytes): at least one prompt must take the proxy's."""
    mono = instance_factory(["builtin:tiny-llama", "--device", "cpu",
                             "--kv-cache-memory-bytes", "48MiB"])
    by_proxy = 0
    for i, prompt in enumerate(PROMPTS):
        shapes: list[tuple[str, dict[str, Any]]] = [
            ("/v1/completions", {"prompt": prompt}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]})]
        for path, body in shapes:
            body = {**body, "model": "builtin:tiny-llama", "max_tokens": 7, "temperature": 0,
                    "ignore_eos": True, "disagg_timings": True}
            expected, _ = _streamed(mono.url, path, body)
            text, timings = _streamed(default_1p1d.url, path, body)
            assert text == expected, (path, prompt)
            assert timings["mode"] == "read"
            by_proxy += timings["decode_admission_s"] == 0.0
            phases = [timings[f"{name}_s"] for name in ("proxy_queue", "prefill_queue",
                      "prefill_compute", "kv_transfer", "decode_admission", "first_token")]
            assert sum(phases) == pytest.approx(timings["ttft_s"], rel=0.05), timings
            if i == 0:
                stop = {**body, "stop": ["never-in-output"]}
                text, timings = _streamed(default_1p1d.url, path, stop)
                assert text == expected and timings["decode_admission_s"] > 0.0
    assert by_proxy > 0
    # min_tokens with the greedy first token made a stop token: the prefill samples that
    # token (it gets min_tokens capped at its max_tokens of 1) and P/D must still equal
    # monolithic, which does not end before min_tokens
    for prompt in PROMPTS[:3]:
        body = {"model": "builtin:tiny-llama", "prompt": prompt, "max_tokens": 6,
                "temperature": 0, "return_token_ids": True}
        greedy = requests.post(mono.url + "/v1/completions", json=body, timeout=60).json()
        body.update(min_tokens=2, stop_token_ids=[greedy["choices"][0]["token_ids"][0]])
        expected_ids = requests.post(mono.url + "/v1/completions", json=body,
                                     timeout=60).json()["choices"][0]["token_ids"]
        r = requests.post(default_1p1d.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == expected_ids, prompt
    for inst in default_1p1d.instances():
        wait_clean(inst)


def _choices(url: str, path: str, body: dict[str, Any]) -> tuple[dict[int, str], Any]:
    """Each choice's text by index, and the usage (streamed: from the usage chunk)."""
    r = requests.post(url + path, timeout=120, json=body)
    assert r.status_code == 200, r.text
    texts: dict[int, str] = {}
    if not body.get("stream"):
        for c in r.json()["choices"]:
            texts[c["index"]] = c["text"] if "text" in c else c["message"]["content"]
        return texts, r.json()["usage"]
    usage, done = None, 0
    for line in r.text.splitlines():
        done += line == "data: [DONE]"
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            assert "error" not in event, event
            usage = event.get("usage") or usage
            for c in event["choices"]:
                piece = c["text"] if "text" in c else c["delta"].get("content", "")
                texts[c["index"]] = texts.get(c["index"], "") + piece
    assert done == 1 and r.text.rstrip().endswith("data: [DONE]")
    return texts, usage


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_and_batches_through_the_proxy_equal_a_monolithic_instances(
        instance_factory, default_1p1d: Deployment, stream: bool) -> None:
    """n > 1 and a batch of prompts: the proxy runs one P/D flow per prompt and choice (choice
    i seeded seed + i, as an instance does) and merges them: each choice, and the usage (each
    prompt once, the completions summed), equal a monolithic instance's answer."""
    mono = instance_factory(["builtin:tiny-llama", "--device", "cpu",
                             "--kv-cache-memory-bytes", "48MiB"])
    for path, shape in (("/v1/completions", {"prompt": PROMPTS[4]}),
                        ("/v1/chat/completions",
                         {"messages": [{"role": "user", "content": PROMPTS[3]}]})):
        body: dict[str, Any] = {
            **shape, "model": "builtin:tiny-llama", "n": 3, "seed": 1234, "temperature": 0.9,
            "max_tokens": 6, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        expected, expected_usage = _choices(mono.url, path, body)
        got, usage = _choices(default_1p1d.url, path, body)
        assert sorted(got) == [0, 1, 2] and got == expected, (path, got, expected)
        assert len(set(got.values())) > 1  # the choices did sample differently
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert usage[key] == expected_usage[key], (path, usage, expected_usage)
    batch = {"model": "builtin:tiny-llama", "prompt": [PROMPTS[1], PROMPTS[4], [5, 6, 7]],
             "n": 2, "seed": 9, "temperature": 0.9, "max_tokens": 5, "ignore_eos": True,
             "stream": stream, "return_token_ids": not stream}
    if stream:
        batch["stream_options"] = {"include_usage": True}
    expected, expected_usage = _choices(mono.url, "/v1/completions", batch)
    got, usage = _choices(default_1p1d.url, "/v1/completions", batch)
    assert sorted(got) == list(range(6)) and got == expected, (got, expected)
    assert usage == expected_usage
    for inst in default_1p1d.instances():
        wait_clean(inst)


def test_write_requests_expiring_in_a_full_decode_queue_are_computed_there(
        instance_factory: Any) -> None:
    """WRITE with kv_load_failure_policy=recompute: the decode's pool holds one request at a
    time, so the others wait in its queue past defer_timeout and the decode gives their
    transfers up (or the prefill's own wait for the decode's blocks ends first: it tells the
    decode); each prefill fails with a KV transfer error and the proxy waits for the decode,
    which computes those prompts itself: every request answers 200 with the monolithic
    tokens (the proxy used to fail them with 502)."""
    small = ["--num-gpu-blocks-override", "64", "--max-model-len", "1024"]
    mono = instance_factory(["builtin:tiny-llama", "--device", "cpu", *small])
    prompts = [f"prompt number {i} " * 30 for i in range(5)]
    body: dict[str, Any] = {"model": "builtin:tiny-llama", "max_tokens": 300, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    expected = [requests.post(mono.url + "/v1/completions", json={**body, "prompt": p},
                              timeout=60).json()["choices"][0]["token_ids"] for p in prompts]
    cfg = json.dumps({"kv_load_failure_policy": "recompute", "defer_timeout": 0.5})
    with launch("--num-prefill", "1", "--num-decode", "1", "--mode", "write",
                "--kv-connector-extra-config", cfg,
                *(f"--instance-arg={a}" for a in small)) as dep:
        async def run() -> list[tuple[int, Any]]:
            async with aiohttp.ClientSession() as s:
                async def one(prompt: str) -> tuple[int, Any]:
                    async with s.post(dep.url + "/v1/completions",
                                      json={**body, "prompt": prompt}) as r:
                        return r.status, await r.json()
                return list(await asyncio.gather(*map(one, prompts)))

        results = asyncio.run(run())
        assert [status for status, _ in results] == [200] * len(prompts), \
            [b for status, b in results if status != 200]
        assert [b["choices"][0]["token_ids"] for _, b in results] == expected
        (decode,) = dep.instances("decode")
        text = requests.get(decode + "/metrics", timeout=5).text
        assert sum(n for _, n in samples(text, "disagg_kv_connector_transfers_expired_total"))
        for inst in dep.instances():
            wait_clean(inst)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_prompt_with_no_room_for_max_tokens_is_a_400_before_any_prefill(
        default_1p1d: Deployment, path: str, stream: bool) -> None:
    """The decode's length check happens at the prefill (it knows the client's max_tokens):
    a 400 context_length_exceeded at once, stream or not, never a 200 stream carrying the
    decode's refusal after the prefill computed the prompt for nothing."""
    max_len = requests.get(default_1p1d.url + "/v1/models", timeout=5).json()[
        "data"][0]["max_model_len"]
    text = "y" * (max_len - 40)
    shape = {"messages": [{"role": "user", "content": text}]} if "chat" in path \
        else {"prompt": text}
    (p,) = default_1p1d.instances("prefill")
    def computed() -> float:
        text = requests.get(p + "/metrics", timeout=5).text
        return sum(n for _, n in samples(text, "disagg_prompt_tokens_total"))

    def post(max_tokens: int) -> Any:
        return requests.post(default_1p1d.url + path, timeout=60, json={
            **shape, "model": "builtin:tiny-llama", "max_tokens": max_tokens, "stream": stream})

    before = computed()
    assert post(2).status_code == 200  # fits: the prefill computes it (the counter moves)
    assert computed() > before
    before = computed()
    r = post(200)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "200 for the completion" in err["message"]
    assert computed() == before  # nothing was prefilled
    for inst in default_1p1d.instances():
        wait_clean(inst)


def test_openai_client_through_the_proxy(default_1p1d: Deployment) -> None:
    import openai

    dep = default_1p1d
    client = openai.OpenAI(base_url=dep.url + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="builtin:tiny-llama", prompt="hello",
                                    max_tokens=5, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="builtin:tiny-llama", max_tokens=5,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content is not None
    chunks = list(client.chat.completions.create(
        model="builtin:tiny-llama", max_tokens=6, stream=True,
        messages=[{"role": "user", "content": "stream please"}]))
    assert len(chunks) >= 2
    models = client.models.list()
    assert models.data[0].id == "builtin:tiny-llama"


async def _stream(s: aiohttp.ClientSession, url: str, i: int) -> int:
    body = {"model": "builtin:tiny-llama", "prompt": f"stream {i} " * 4, "max_tokens": 6,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    tokens = 0
    async with s.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return tokens


def test_1000_concurrent_streams_through_1p1d(default_1p1d: Deployment) -> None:
    dep = default_1p1d  # --max-num-seqs 256, the default

    async def run() -> list[int]:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(_stream(s, dep.url, i) for i in range(1000)))

    assert asyncio.run(run()) == [6] * 1000
    for inst in dep.instances():
        wait_clean(inst)


def test_client_disconnect_mid_stream_frees_both_instances(default_1p1d: Deployment) -> None:
    dep = default_1p1d

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            body = {"prompt": "disconnect me", "max_tokens": 3000, "stream": True,
                    "ignore_eos": True}
            async with s.post(dep.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                await resp.content.readline()  # tokens are flowing

    asyncio.run(run())
    for inst in dep.instances():
        wait_clean(inst, timeout_s=5)


def _pids_serving(launcher_pid: int, url: str) -> list[int]:
    port = url.rsplit(":", 1)[1]
    return [p.pid for p in psutil.Process(launcher_pid).children(recursive=True)
            if "serve" in p.cmdline() and port in p.cmdline()]


@pytest.mark.slow  # by default: restart policy with fake instances (test_launcher.py), retry
# elsewhere on a failed prefill (test_flows.py), real instances killed (tests/connectors)
def test_2p2d_spreads_load_and_survives_a_prefill_kill() -> None:
    with launch("--num-prefill", "2", "--num-decode", "2", "--on-instance-exit", "restart",
                "--policy", "round_robin", timeout_s=180) as dep:
        assert len(dep.instances()) == 4

        async def burst(n: int) -> list[int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
                return await asyncio.gather(*(_stream(s, dep.url, i) for i in range(n)))

        assert asyncio.run(burst(40)) == [6] * 40
        counts = dep.requests_per_instance()
        assert len(counts) == 4 and all(v > 0 for v in counts.values()), counts
        victim = dep.instances("prefill")[0]
        pids = _pids_serving(dep.proc.pid, victim)
        assert pids, "could not find the prefill instance's process"

        async def kill_during_load() -> list[int]:
            task = asyncio.ensure_future(burst(60))
            await asyncio.sleep(0.3)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            return await task

        # requests that had not reached the dead prefill are retried elsewhere: none is lost
        assert asyncio.run(kill_during_load()) == [6] * 60
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(dep.instances("prefill")) < 2:
            time.sleep(0.5)
        assert len(dep.instances("prefill")) == 2, "the restarted prefill did not rejoin"
        assert asyncio.run(burst(10)) == [6] * 10
