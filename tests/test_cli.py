"""The hip-attn command: version, check and demo end to end on tiny inputs."""

import subprocess
import sys

import pytest

from hip_attn import __version__
from hip_attn.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "hip_attn.cli", "--version"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == f"hip-attn {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])


def test_check_reports_error_and_keys(capsys):
    code = main(["check", "--tokens", "300", "--heads", "2", "--kv-heads", "1", "--hip-k", "64",
                 "--window", "64", "--sinks", "16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "reads" in out and "of 300 keys" in out
    err = float(out.split("dense attention: ")[1].split()[0])
    assert 0 < err < 1


def test_check_rejects_bad_config(capsys):
    assert main(["check", "--tokens", "300", "--hip-k", "100"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hip-attn check: error: HiPConfig.k") and captured.out == ""


def test_demo_runs_dense_and_hip(capsys):
    code = main(["demo", "--tokens", "160", "--new-tokens", "3", "--hip-k", "64", "--window", "64",
                 "--sinks", "16"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "prefill top-1 tokens" in out and "KV read" in out
    dense_mb = float(out.split("dense ")[-1].split(" MB")[0])
    hip_mb = float(out.split("HiP ")[-1].split(" MB")[0])
    assert hip_mb < dense_mb


def test_demo_with_offload_prints_cache_statistics(capsys):
    code = main(["demo", "--tokens", "160", "--new-tokens", "2", "--hip-k", "64", "--window",
                 "64", "--sinks", "16", "--offload", "--cache-blocks", "32"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("offload"))
    assert "4 layers" in line
    moved = float(line.split("hit rate ")[1].split(", ")[1].split(" MB")[0])
    assert moved > 0
