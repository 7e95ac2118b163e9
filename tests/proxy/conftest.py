"""Fixtures for proxy tests: fake instances and proxies on 127.0.0.1 random ports."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import bound_url, make_app, start_site
from proxy.config import ProxyConfig
from proxy.state import STATE_KEY, ProxyState

FAKE_INSTANCE_PATH = Path(__file__).with_name("fake_instance.py")


def _load_fake_module() -> Any:
    # By path: tests/ is not a package, and a plain import could clash with other test folders.
    name = "disagg_proxy_tests_fake_instance"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FAKE_INSTANCE_PATH)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fake_module = _load_fake_module()


@dataclass
class ProxyHandle:
    """A running proxy under test."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> ProxyState:
        """The app's shared state (registry, metrics, ...)."""
        return self.app[STATE_KEY]


def _proxy_config(**overrides: Any) -> ProxyConfig:
    """A proxy config with short timeouts and fast health checks."""
    defaults: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "health_check_interval_s": 0.1,
                                "probe_timeout_s": 1.0, "connect_timeout_s": 1.0,
                                "prefill_timeout_s": 5.0, "first_byte_timeout_s": 5.0,
                                "stream_idle_timeout_s": 5.0, "request_timeout_s": 10.0}
    defaults.update(overrides)
    return ProxyConfig(**defaults)



@pytest.fixture
def fake_instance_module() -> Any:
    """The fake instance module (``FakeInstance``, ``Behavior``, ``generated_tokens``)."""
    return fake_module


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Factory: ``await fakes(role=..., mode=...)`` -> a started FakeInstance."""
    started: list[Any] = []

    async def make(**kwargs: Any) -> Any:
        fake = fake_module.FakeInstance(**kwargs)
        await fake.start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Awaitable[ProxyHandle]]]:
    """Factory: ``await proxies(prefill_urls=(...), ...)`` -> a started proxy."""
    runners: list[web.AppRunner] = []

    async def make(**overrides: Any) -> ProxyHandle:
        app = make_app(_proxy_config(**overrides))
        runner = await start_site(app, "127.0.0.1", 0)
        runners.append(runner)
        return ProxyHandle(bound_url(runner), app, runner)

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for talking to proxies and fakes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session
