"""Launch configs: every arch file loads, holds only known keys, and resolves per arch."""

from __future__ import annotations

import json

import pytest

from hip_kernels import launch_config
from hip_kernels.launch_config import (
    CONFIG_DIR,
    KNOWN_ARCHS,
    arch_for_target,
    bucket,
    get_int,
    load_config,
)

KERNELS = sorted(path.stem for path in (CONFIG_DIR / "default").glob("*.json"))


def test_every_kernel_module_has_a_default_config():
    assert KERNELS == ["fp8_gemm", "fused_moe", "greedy_argmax", "kv_blocks",
                       "mla_prefill_attention", "paged_decode_attention", "paged_mla_decode",
                       "paged_prefill_attention", "reshape_and_cache", "rms_norm",
                       "rope_and_cache", "rotary_embedding", "silu_and_mul", "skinny_gemm",
                       "vendor_blas"]


@pytest.mark.parametrize("arch", ("default", *KNOWN_ARCHS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_config_loads_with_only_default_keys(kernel, arch):
    merged = load_config(kernel, arch)
    default = load_config(kernel, "default")
    assert set(merged) == set(default)
    assert all(not key.startswith("_") for key in merged)


def test_arch_overrides_win_over_defaults():
    assert get_int(load_config("paged_decode_attention", "gfx942"), "num_compute_units") == 304
    assert get_int(load_config("paged_decode_attention", "sm_90"), "num_compute_units") == 132
    assert get_int(load_config("paged_decode_attention", "gfx90a"), "num_compute_units") == \
        get_int(load_config("paged_decode_attention", "default"), "num_compute_units")


def test_arch_files_are_valid_json_objects():
    for path in CONFIG_DIR.glob("*/*.json"):
        assert isinstance(json.loads(path.read_text()), dict), path


def test_unknown_key_in_an_arch_file_is_rejected(tmp_path, monkeypatch):
    (tmp_path / "default").mkdir()
    (tmp_path / "gfx942").mkdir()
    (tmp_path / "default" / "k.json").write_text('{"num_warps": 4}')
    (tmp_path / "gfx942" / "k.json").write_text('{"num_wraps": 8}')
    monkeypatch.setattr(launch_config, "CONFIG_DIR", tmp_path)
    launch_config._read.cache_clear()
    try:
        with pytest.raises(ValueError, match="unknown keys"):
            load_config("k", "gfx942")
    finally:
        launch_config._read.cache_clear()


def test_bucket_picks_the_first_bound_that_fits():
    cfg = {"warps": [[512, 1], [4096, 4], [65536, 16]]}
    assert [bucket(cfg, "warps", n) for n in (1, 512, 513, 4096, 70000)] == [1, 1, 4, 4, 16]


def test_an_override_holds_inside_its_block_only(monkeypatch):
    monkeypatch.setenv(launch_config.OVERRIDE_ENV, json.dumps({"silu_and_mul": {"block": 64}}))
    with launch_config.overridden({"silu_and_mul": {"block": 32}}):
        assert get_int(load_config("silu_and_mul", "default"), "block") == 32
    assert get_int(load_config("silu_and_mul", "default"), "block") == 64
    monkeypatch.delenv(launch_config.OVERRIDE_ENV)
    with pytest.raises(RuntimeError, match="boom"), \
            launch_config.overridden({"silu_and_mul": {"block": 32}}):
        raise RuntimeError("boom")
    assert load_config("silu_and_mul", "default") == launch_config._read("default",
                                                                          "silu_and_mul")


def test_cpu_runs_take_the_default_config():
    assert load_config("silu_and_mul") == load_config("silu_and_mul", "default")


def test_targets_map_to_config_archs():
    assert arch_for_target("hip:gfx942") == "gfx942"
    assert arch_for_target("cuda:90") == "sm_90"
    with pytest.raises(ValueError, match="unknown target"):
        arch_for_target("metal:m3")


def test_environment_overrides_apply_over_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    from hip_kernels.launch_config import OVERRIDE_ENV, load_config

    monkeypatch.setenv(OVERRIDE_ENV, '{"kv_blocks": {"copy_block": 8192}}')
    assert load_config("kv_blocks", "gfx942")["copy_block"] == 8192
    monkeypatch.setenv(OVERRIDE_ENV, '{"kv_blocks": {"copy_blok": 1}}')
    with pytest.raises(ValueError, match="unknown keys"):
        load_config("kv_blocks", "gfx942")
    monkeypatch.setenv(OVERRIDE_ENV, "not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_config("kv_blocks")
