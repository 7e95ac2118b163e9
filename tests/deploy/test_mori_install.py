"""How MoRI gets installed, said the same way in pyproject.toml (the ``mori`` extra),
``disagg doctor`` (its hint when mori does not import) and deploy/README.md."""

from __future__ import annotations

import importlib.util
import sys
from importlib.machinery import ModuleSpec

import pytest
from deploy_plan import REPO_ROOT
from packaging.requirements import Requirement

from disagg import doctor

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - CI runs 3.11
    tomllib = pytest.importorskip("tomli")

ROCM7_REASON = ("mori.io is not importable (libamdhip64.so.7: cannot open shared object "
                "file: No such file or directory): the mori transport needs AMD MoRI")


def _mori_extra() -> list[Requirement]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["optional-dependencies"]["mori"]]


def test_the_mori_extra_installs_amd_mori_only_where_wheels_exist() -> None:
    requirement, = _mori_extra()
    assert requirement.name == "amd-mori"
    assert requirement.marker is not None
    assert requirement.marker.evaluate({"sys_platform": "linux", "platform_machine": "x86_64"})
    assert not requirement.marker.evaluate({"sys_platform": "darwin",
                                            "platform_machine": "arm64"})


def _find_spec(mori_installed: bool) -> object:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        if name == "mori":
            return ModuleSpec("mori", None) if mori_installed else None
        return real(name, package)
    return find_spec


def test_doctor_says_how_to_install_mori_when_it_is_missing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec(False))
    hint = doctor.mori_install_hint("mori.io is not importable (No module named 'mori')")
    assert hint is not None and "pip install 'disagg[mori]'" in hint
    assert "build ROCm/mori from source" in hint


def test_doctor_names_rocm_7_when_the_wheel_cannot_load_its_libraries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec(True))
    hint = doctor.mori_install_hint(ROCM7_REASON)
    assert hint is not None and "links ROCm 7" in hint
    assert doctor.mori_install_hint("mori.io is not importable (some other error)") is None


def test_the_hint_rides_on_the_mori_transport_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import connectors.transports as transports

    monkeypatch.setattr(transports, "available_transports",
                        lambda: {"tcp": None, "mori": ROCM7_REASON})
    monkeypatch.setattr(importlib.util, "find_spec", _find_spec(True))
    facts = doctor.transport_facts()
    assert facts["tcp"] == {"usable": True, "reason": None}
    assert not facts["mori"]["usable"]
    assert facts["mori"]["reason"].startswith(ROCM7_REASON + "; installed, but")
    # the JSON schema keeps its keys
    assert all(set(t) == {"usable", "reason"} for t in facts.values())


def test_deploy_readme_gives_both_ways_to_install_mori() -> None:
    text = (REPO_ROOT / "deploy" / "README.md").read_text()
    assert "pip install 'disagg[mori]'" in text
    assert "github.com/ROCm/mori" in text and "--no-build-isolation" in text
