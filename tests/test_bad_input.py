"""Bad input: one line on stderr naming the argument, exit status 2, never a traceback or a
silent default; ``hip_attn.patch`` checks its offload options when called."""

import os
import subprocess
import sys

import pytest
import torch

import hip_attn
from hip_attn import HiPConfig
from hip_attn.cli import main
from hip_attn.patches.model import is_patched
from hip_attn.tiny_model import random_llama


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``hip-attn ARGV`` in this process: exit status, stdout and stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors exit
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["check", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
        (["check", "--tokens", "-5"], "argument --tokens: token count must be a positive whole"),
        (["check", "--tokens", "0"], "argument --tokens: token count must be"),  # not 2048
        (["check", "--head-dim", "x"], "argument --head-dim: expected a whole number"),
        (["check", "--device", "tpu"], "argument --device: expected cpu, cuda or cuda:N"),
        pytest.param(
            ["check", "--device", "cuda"], "argument --device: 'cuda', but CUDA", marks=NO_CUDA
        ),
        (["check", "--hip-k", "100"], "HiPConfig.k"),  # found by the command, not argparse
        (["check", "--foo"], "unrecognized arguments: --foo"),
        (["demo", "--model", "/nonexistent"], "argument --model: no such folder"),
        (["demo", "--new-tokens", "0"], "argument --new-tokens: must be >= 1"),
        (["demo", "--tokens", "0"], "argument --tokens: token count must be"),
        (["demo", "--offload", "--cache-blocks", "0"], "argument --cache-blocks: must be >= 1"),
        (
            ["demo", "--offload", "--cache-blocks", "4"],
            "--cache-blocks: cache_blocks must be >= 2 x beam x k // block_size_k (the leaf ",
        ),
        (["demo", "--cache-blocks", "64"], "--cache-blocks sizes the block cache of --offload"),
        (["accuracy", "--depth", "0.9"], "--depth: for a real model's prompt; add --model"),
        (["accuracy", "--filler", "bogus"], "argument --filler: unknown 'bogus'; choose from"),
        (["aot", "--arch", "12"], "argument --arch: invalid choice: 12 (choose from 75, 80"),
        (["roofline", "--context", "4k,,8k"], "argument --context: empty item"),
        (["accuracy", "--context", "4k,"], "argument --context: empty item"),
        (["eval", "--depths", "0.5,,1"], "argument --depths: empty item"),
        (["bench", "prefill", "--context", ",1k"], "argument --context: empty item"),
        (["bench", "decode", "--device", "tpu"], "argument --device: expected cpu, cuda"),
        # found by review: an infinity, a seed beyond 64 bits, empty or folder paths, a size
        # that rounds to zero, a truncated token count, a range that cannot hold
        (["roofline", "--context", "1e400"], "argument --context: token count must be"),
        (["roofline", "--hbm", "0.5b"], "argument --hbm: memory size must be at least one"),
        (["roofline", "--plot", ""], "argument --plot: expected a file path"),
        (["roofline", "--gpu-file", "/"], "argument --gpu-file: '/' is a folder"),
        (["roofline", "--calibrate", ""], "argument --calibrate: expected a file path"),
        (["accuracy", "--context", "inf"], "argument --context: not a token count"),
        (["accuracy", "--context", "1000.9"], "argument --context: token count must be"),
        (["accuracy", "--seeds", "1" + "0" * 22], "argument --seeds: must be < 2**63"),
        (["accuracy", "--depth", "2"], "argument --depth: depths are fractions in [0, 1]"),
        (["accuracy", "--sample-last", "0", "--sample-spread", "0"], "leave no query block"),
        (["accuracy", "--json", "/nonexistent/x.json"], "--json '/nonexistent/x.json': not a"),
        (["eval", "--random-model", "--json", ""], "--json '': not a file in an existing"),
        (["eval", "--model", ""], "argument --model: no such folder: ''"),
        (["check", "--seed", "1" + "0" * 22], "argument --seed: must be < 2**63"),
        (["check", "--window", "1" + "0" * 26], "HiPConfig.window must be <= 2**31 - 1"),
        (["bench", "mask", "--device", "cpu", "--out", "/"], "argument --out: '/' is a folder"),
        (["bench", "decode", "--flex-kv-block", "24"], "must be a power of two >= 16, got 24"),
        pytest.param(
            ["bench", "offload", "--device", "cpu", "--gather", "cuda"],
            "--gather cuda copies into GPU memory",
            marks=NO_CUDA,
        ),  # fmt: skip
        (
            ["roofline", "--hip-k", "32768", "--mode", "hip+offload"],
            "(16384 tokens, --block-cache) must hold",
        ),
        (
            ["bench", "mask", "--device", "cpu", "--min-runs", "5", "--max-runs", "2"],
            "--min-runs 5 exceeds --max-runs 2",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    (line,) = err.splitlines()  # exactly one line
    prog = f"hip-attn bench {argv[1]}" if argv[0] == "bench" else f"hip-attn {argv[0]}"
    assert line.startswith(f"{prog}: error: "), line
    assert needle in line
    assert out == ""


def test_no_command_or_mode_is_one_line_exit_2(capsys):
    code, out, err = run([], capsys)
    assert (code, out) == (2, "")
    assert err == (
        "hip-attn: error: name a command: check, aot, demo, roofline, bench, accuracy, eval "
        "(see hip-attn --help)\n"
    )
    code, out, err = run(["bench"], capsys)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        "hip-attn bench: error: name a mode: prefill, decode, mask, offload "
        "(see hip-attn bench --help)"
    ]


def test_argparse_errors_name_the_subcommand_and_its_help(capsys):
    code, _, err = run(["demo", "--new-tokens", "0"], capsys)
    assert code == 2
    assert err == (
        "hip-attn demo: error: argument --new-tokens: must be >= 1, got 0 "
        "(see hip-attn demo --help)\n"
    )
    code, _, err = run(["frobnicate"], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("hip-attn: error: argument COMMAND: invalid choice: 'frobnicate'")


def test_demo_model_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    code, _, err = run(["demo", "--model", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = err.splitlines()
    assert line.startswith(f"hip-attn demo: error: --model {tmp_path}: ")


def test_a_reader_leaving_early_is_no_traceback():
    """``hip-attn roofline --json - | head -1``: the pipe closes before the output is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "hip_attn.cli", "roofline", "--json", "-"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.stderr == ""  # no BrokenPipeError, no "Exception ignored"
    assert done.returncode == 141  # as if SIGPIPE had ended it


# -- hip_attn.patch(offload=True): the options are checked at patch time ----------------------


@pytest.fixture(scope="module")
def model():
    return random_llama(0, layers=2, hidden=64, heads=4, kv_heads=2, vocab=128)


CFG = HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64)


@pytest.mark.parametrize(
    ("options", "error", "needle"),
    [
        ({"foo": 1}, TypeError,
         "unknown offload option 'foo'; accepted: cache_blocks, max_chunk, host_chunk_tokens, "
         "gather, prefetch"),
        ({"prefetch": 1}, TypeError, "offload option prefetch must be bool, got int"),
        ({"cache_blocks": "64"}, TypeError, "offload option cache_blocks must be int, got str"),
        ({"max_chunk": True}, TypeError, "offload option max_chunk must be int, got bool"),
        ({"cache_blocks": 4}, ValueError,
         "cache_blocks must be >= 2 x beam x k // block_size_k (the leaf candidates) = 32"),
        ({"max_chunk": 48}, ValueError, "max_chunk must be a positive multiple of block_size_q"),
        ({"host_chunk_tokens": 0}, ValueError, "host_chunk_tokens must be a positive multiple"),
        ({"gather": "gpu"}, ValueError, "gather must be one of"),
        ([("cache_blocks", 64)], TypeError, "offload_options must be a dict or None, got list"),
    ],
)  # fmt: skip
def test_patch_checks_offload_options(model, options, error, needle):
    with pytest.raises(error) as exc:
        hip_attn.patch(model, CFG, offload=True, offload_options=options)
    assert needle in str(exc.value)
    assert not is_patched(model)  # refused before anything changed


def test_patch_accepts_good_offload_options(model):
    options = {"cache_blocks": 32, "max_chunk": 64, "host_chunk_tokens": 64, "gather": "torch",
               "prefetch": True}  # fmt: skip
    try:
        hip_attn.patch(model, CFG, offload=True, offload_options=options)
        assert is_patched(model) and "generate" in model.__dict__
    finally:
        hip_attn.unpatch(model)
