"""``hip-attn aot``: the launches the library makes compile for Hopper without a GPU."""

import json
import os
import re
import subprocess
import sys

import pytest

from hip_attn.attention import BLOCK_N, MAX_PACKED_ROWS, launch_shape
from hip_attn.config import HiPConfig
from hip_attn.triton_kernels.tiles import PREFILL_TILES, Tile


def test_every_quick_variant_compiles_for_sm90_without_spilling():
    # the compiler, not the interpreter: TRITON_INTERPRET must be unset in the child
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    # no stack at all: a spill is a regression (a popcount in level_offset once made three
    # variants spill 8-32 bytes, under the 64-byte limit this test had then)
    cmd = [sys.executable, "-m", "hip_attn.cli", "aot", "--quick", "--max-stack-bytes", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = re.findall(
        r"^\s+(_\w+_kernel)\s+([\dx]+)\s+(\d+x\d+)?\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)",
        done.stdout,
        re.M,
    )
    kernels = [name for name, *_ in rows]
    # the offloaded default searches in two launches (candidates, then their keys);
    # device decode runs with one count and with a count per sequence (stride_tk 0 and 1);
    # the default's prefill compiles each tile its autotuner may choose
    prefill_tiles = launch_shape(1, 32, 8, 4096, HiPConfig(), 132)[0]
    assert kernels.count("_hip_mask_kernel") == 13
    assert kernels.count("_sparse_attention_kernel") == 11 + len(prefill_tiles)
    shapes = {(tile, int(w), int(st)) for name, _, tile, w, st, *_ in rows if tile}
    assert shapes >= {
        (f"{64 * t.heads}x{t.block_n}", t.num_warps, t.num_stages) for t in prefill_tiles
    }
    for _, _, _, warps, _, regs, stack in rows:
        assert int(warps) >= 4 and 0 < int(regs) <= 255 and int(stack) == 0
    # decode at 1M on 132 SMs: 8 KV heads' packed tiles split into 7 key ranges
    assert ("_sparse_attention_kernel", "8x1x7") in [(n, g) for n, g, *_ in rows]


def test_aot_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "hip_attn.cli", "aot", "--quick"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (
        "hip-attn aot: error: unset TRITON_INTERPRET (the compiler, not the interpreter)\n"
    )


_DEFAULT_SEARCH_ON = """
import json, sys, torch
from hip_attn.aot import _record_hip, compile_as_launched, compile_launch
from hip_attn.config import HiPConfig
cfg = HiPConfig()
launches = _record_hip(1, 1, 1 << 20, torch.bfloat16, 128, cfg, 132, False)
search = [x for x in launches if x.kernel.__name__ == "_hip_mask_kernel"][0]
arch = int(sys.argv[1])
print(json.dumps([compile_launch(search, arch), compile_as_launched(search, arch)]))
"""


def test_the_default_search_fits_sm89_by_reloading_its_variances():
    """sm_86, sm_89 and sm_120 give a program 99 KB of shared memory: the defaults' decode
    search at D = 128 asks for more as launched on sm_90 (its means and variances of 256
    children), and fits as the library launches it there, reloading the variances."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _DEFAULT_SEARCH_ON, "89"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    as_on_sm90, launched = json.loads(done.stdout.splitlines()[-1])
    assert as_on_sm90["shared_bytes"] > 99 * 1024
    assert launched["reloads_variances"] and launched["fits"]
    assert launched["shared_bytes"] <= 99 * 1024 and launched["stack_bytes"] <= 16


@pytest.mark.parametrize(
    "batch,hq,h_sel,tq,sms,expected",
    [
        (1, 32, 8, 1, None, (4, 1)),  # decode off the GPU: packed group, no split
        (1, 32, 8, 1, 132, (4, 7)),  # 8 programs, 2 * 132 SMs wanted: split by 33, capped
        (16, 32, 8, 1, 132, (4, 3)),  # 128 programs: about 2 per SM
        (1, 32, 8, 32, 132, (1, 7)),  # 4 heads x 32 rows > MAX_PACKED_ROWS: one head each
    ],
)
def test_decode_launch_shape(batch, hq, h_sel, tq, sms, expected):
    config = HiPConfig()
    assert MAX_PACKED_ROWS < 4 * 32  # the last case's premise
    heads, splits = expected
    assert launch_shape(batch, hq, h_sel, tq, config, sms) == ((Tile(heads, BLOCK_N),), splits)


@pytest.mark.parametrize(
    "h_sel,bq,heads",
    [
        (32, 64, {1}),  # one selection per query head: nothing to pack
        (8, 64, {1, 2}),  # a GQA group of 4 shares a selection: 2 heads x 64 rows fit
        (8, 128, {1}),  # 2 x 128 rows do not
        (16, 32, {1, 2}),
    ],
)
def test_prefill_offers_the_autotuner_tiles_of_shared_selections(h_sel, bq, heads):
    config = HiPConfig(block_size_q=bq)
    tiles, splits = launch_shape(1, 32, h_sel, 4096, config, 132)
    assert splits == 1 and {t.heads for t in tiles} == heads
    assert set(tiles) <= set(PREFILL_TILES) and {t for t in PREFILL_TILES if t.heads == 1} <= set(
        tiles
    )


@pytest.mark.parametrize("fitting,status", [((True, False), 0), ((False, False), 1)])
def test_a_prefill_tile_over_the_shared_memory_is_not_offered_unless_none_fits(
    monkeypatch, capsys, fitting, status
):
    """A tile of the autotuner's the target refuses is marked, not fatal, nor is its stack
    counted: the autotuner scores it as failed; a prefill none of whose tiles fits is refused
    (exit status 1)."""
    import argparse

    from hip_attn import aot

    launches = [aot.Launch(None, (1,), (), {}, candidate=True) for _ in fitting]
    results = iter(fitting)

    def compiled(launch, arch):
        fits = next(results)
        return {"kernel": "_sparse_attention_kernel", "grid": [1], "tile": "64x64",
                "num_warps": 8, "num_stages": 2, "registers": 255, "stack_bytes": 64 * (not fits),
                "local_bytes": 0, "shared_bytes": 120 << 10, "reloads_variances": False,
                "fits": fits, "candidate": launch.candidate}  # fmt: skip

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(aot, "variants", lambda quick, sms: [aot.Variant("prefill", launches)])
    monkeypatch.setattr(aot, "compile_as_launched", compiled)
    args = argparse.Namespace(quick=True, sms=132, arch=89, only=None, max_stack_bytes=0, json=None)
    assert aot.run(args) == status
    out = capsys.readouterr().out
    assert out.count("over 99 KB: not offered") == 2 - sum(fitting)
    assert ("no tile the autotuner may choose fits: refused" in out) == (status == 1)
