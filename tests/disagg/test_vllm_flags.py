"""A vLLM-only flag given to `disagg serve` gets one line saying what to do instead; other
unknown arguments keep argparse's message. --served-model-name takes several names."""

from __future__ import annotations

import argparse

import pytest

from disagg.cli import build_parser, engine_config_from_args
from disagg.vllm_flags import VLLM_ONLY_FLAGS, unknown_args_message


@pytest.mark.parametrize("argv", [
    ["--enable-chunked-prefill"], ["--swap-space", "4"], ["--swap-space=4"],
    ["--pipeline-parallel-size", "2"], ["-pp", "2"], ["--tokenizer-mode", "slow"], ["-O3"]])
def test_vllm_flags_get_a_hint(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = argv[0].partition("=")[0][:2 if argv[0].startswith("-O") else None]
    assert f"{flag} is a vLLM flag disagg serve does not have: " in err
    assert "unrecognized arguments" not in err


def test_other_unknown_arguments_keep_argparse_message(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_no_hinted_flag_is_one_disagg_has() -> None:
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    own = {s for a in sub.choices["serve"]._actions for s in a.option_strings}
    assert not own & set(VLLM_ONLY_FLAGS)
    assert unknown_args_message(["--swap-space", "4", "--x"]).count("vLLM flag") == 1


def test_several_served_model_names() -> None:
    args = build_parser().parse_args(["serve", "builtin:tiny-llama", "--served-model-name",
                                      "first", "second"])
    assert args.served_model_name == ["first", "second"]
    assert engine_config_from_args(args).model.served_model_name == "first"
    plain = build_parser().parse_args(["serve", "builtin:tiny-llama"])
    assert engine_config_from_args(plain).model.served_model_name == "builtin:tiny-llama"


async def test_every_served_name_is_accepted_and_the_first_reported(instance_client: object
                                                                    ) -> None:
    client = await instance_client(served_model_name="first",  # type: ignore[operator]
                                   model_aliases=("second",))
    for name in ("first", "second", "builtin:tiny-llama"):
        resp = await client.post("/v1/completions", json={"model": name, "prompt": "hi"})
        assert resp.status == 200 and (await resp.json())["model"] == "first"
    resp = await client.post("/v1/completions", json={"model": "third", "prompt": "hi"})
    assert resp.status == 404
    models = await (await client.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["first", "second"]
