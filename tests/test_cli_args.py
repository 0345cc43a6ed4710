"""``hip_attn.cli_args``: the value types, the HiPConfig flags and the device flags shared by the
``hip-attn`` subcommands."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.cli_args import (
    ArgumentParser,
    add_device_arguments,
    add_hip_arguments,
    arg_type,
    comma_list,
    command_error,
    device_and_dtype,
    directory,
    hip_config_from_args,
    non_negative_int,
    positive_float,
    positive_int,
    torch_device,
    wall_time,
)


def _parser(defaults: HiPConfig | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tool")
    add_hip_arguments(parser, defaults=defaults)
    add_device_arguments(parser)
    return parser


def test_every_flag_reaches_the_config() -> None:
    args = _parser().parse_args([
        "--hip-k", "1024", "--block-size-q", "32", "--block-size-k", "16",
        "--query-pool-stride", "4", "--window", "512", "--sinks", "0", "--head-sharing", "head",
        "--beam", "2", "--refresh-interval", "16",
        "--dense-threshold", "0",
    ])  # fmt: skip
    assert hip_config_from_args(args) == HiPConfig(
        k=1024, block_size_q=32, block_size_k=16, query_pool_stride=4, window=512,
        sink_tokens=0, head_sharing="head", beam=2,
        refresh_interval=16, dense_threshold=0,
    )  # fmt: skip


def test_flags_not_given_keep_the_base() -> None:
    args = _parser().parse_args(["--window", "128"])
    assert args.hip_k is None and args.sinks is None and args.dense_threshold is None
    assert hip_config_from_args(args) == HiPConfig(window=128)
    base = HiPConfig(k=64, dense_threshold=0)
    assert hip_config_from_args(args, base) == base.replace(window=128)


def test_help_shows_the_defaults_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser(HiPConfig(k=256)).parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "HiP configuration (defaults from HiPConfig)" in text
    assert "key tokens selected per query block (default 256)" in text
    assert "(default sinks + k + window = 576)" in text
    assert "--dtype {float16,bfloat16,float32}" in text and "--seed" in text


def test_title_and_an_existing_group() -> None:
    parser = argparse.ArgumentParser()
    add_hip_arguments(parser, title="HiP (custom)")
    assert "HiP (custom)" in [g.title for g in parser._action_groups]
    parser = argparse.ArgumentParser()
    group = parser.add_argument_group("mine")
    add_hip_arguments(group)
    assert "--hip-k" in {s for a in group._group_actions for s in a.option_strings}
    add_device_arguments(parser, seed=False)
    assert not hasattr(parser.parse_args([]), "seed")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--hip-k", "0"], "argument --hip-k: must be >= 1, got 0"),
        (["--sinks", "-8"], "argument --sinks: must be >= 0, got -8"),
        (["--window", "lots"], "argument --window: expected a whole number, got 'lots'"),
        (["--head-sharing", "query"], "invalid choice: 'query'"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
    ],
)
def test_bad_values_are_one_line_argparse_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("tool: error:")


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--hip-k", "100"], "HiPConfig.k"),
        (["--block-size-q", "48"], "HiPConfig.block_size_q"),
        (["--window", "32"], "HiPConfig.window"),
        (["--sinks", "4"], "HiPConfig.sink_tokens"),
        (["--refresh-interval", "300"], "HiPConfig.refresh_interval"),
    ],
)
def test_config_rules_raise_value_error_naming_the_field(argv: list[str], field: str) -> None:
    args = _parser().parse_args(argv)
    with pytest.raises(ValueError, match=field):
        hip_config_from_args(args)


def test_value_types() -> None:
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    assert positive_float("2.5") == 2.5
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_float, "inf")):
        with pytest.raises(ValueError):
            parse(text)
    convert = arg_type(positive_float, "rate")
    assert convert.__name__ == "rate"
    with pytest.raises(argparse.ArgumentTypeError, match="expected a number, got 'x'"):
        convert("x")


def test_comma_list_keeps_order_and_refuses_empty_items() -> None:
    parse = comma_list(positive_int, "counts")
    assert parse(" 3, 1 ,2") == [3, 1, 2]
    for text in ("4,,8", "4,", ",4", "", " "):
        with pytest.raises(argparse.ArgumentTypeError, match="empty item in the comma-separated"):
            parse(text)
    with pytest.raises(argparse.ArgumentTypeError, match="must be >= 1, got 0"):
        parse("1,0")


def test_directory_and_device_checks(tmp_path) -> None:
    assert directory(str(tmp_path)) == str(tmp_path)
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "missing", tmp_path / "file"):
        with pytest.raises(ValueError, match="no such folder"):
            directory(str(path))
    assert torch_device("cpu") == "cpu"
    for text in ("tpu", "meta", "cuda:x", ""):
        with pytest.raises(ValueError, match="expected cpu, cuda or cuda:N"):
            torch_device(text)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            torch_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            torch_device(f"cuda:{torch.cuda.device_count()}")


def test_device_and_dtype_defaults() -> None:
    args = _parser().parse_args(["--device", "cpu"])
    assert device_and_dtype(args) == (torch.device("cpu"), torch.float32)
    args = _parser().parse_args(["--device", "cpu", "--dtype", "bfloat16"])
    assert device_and_dtype(args) == (torch.device("cpu"), torch.bfloat16)


def test_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    parser = ArgumentParser(prog="tool cmd")
    parser.add_argument("--n", type=arg_type(positive_int, "n"), required=True)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "tool cmd: error: the following arguments are required: --n (see tool cmd --help)\n"
    )
    assert command_error("tool cmd", ValueError("two\n  lines")) == 2
    captured = capsys.readouterr()
    assert captured.err == "tool cmd: error: two lines\n" and captured.out == ""


def test_wall_time_returns_the_result_and_seconds() -> None:
    out, seconds = wall_time(lambda: torch.ones(3).sum(), torch.device("cpu"))
    assert out.item() == 3.0 and 0 <= seconds < 10


def test_import_stays_torch_free() -> None:
    code = "import sys, hip_attn.cli_args; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
