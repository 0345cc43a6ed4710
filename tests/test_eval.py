"""``hip-attn eval``: passkey retrieval and perplexity of a Hugging Face model, dense vs HiP, on
a tiny random Llama (and a local checkpoint folder built from it)."""

import json
import math

import pytest
import torch

from hip_attn import HiPConfig
from hip_attn.accuracy.checkpoints import _publish, _staging
from hip_attn.accuracy.model_eval import (
    EvalError,
    OffloadOptions,
    load_model,
    passkey_prompt,
    perplexity,
    random_model,
    run_eval,
    text_tokens,
)
from hip_attn.cli import main
from hip_attn.tiny_model import random_llama

CPU = torch.device("cpu")
# k covers every candidate of a 256-token prompt; dense_threshold=0 keeps the HiP kernels on
COVERING = HiPConfig(k=256, window=64, sink_tokens=16, dense_threshold=0)
SMALL_HIP = ["--hip-k", "64", "--window", "64", "--sinks", "16", "--dense-threshold", "0"]
TEXT = (
    "The river bends twice before it reaches the old mill . Morning fog lifts slowly from "
    "the fields . A cart rolls along the road and the driver hums a tune . "
) * 40


@pytest.fixture(scope="module")
def lm():
    return random_model(0, CPU, torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A local checkpoint folder: a tiny random Llama and a word-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.Fuse()
    words = TEXT + " pass key is What ? : 0 1 2 3 4 5 6 7 8 9"
    tok.train_from_iterator([words], trainers.WordLevelTrainer(special_tokens=["[UNK]", "<s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")
    fast.save_pretrained(folder)
    model = random_llama(0, layers=1, hidden=64, heads=4, kv_heads=2, vocab=len(fast),
                         max_positions=4096)  # fmt: skip
    model.save_pretrained(folder)
    text = folder / "text.txt"
    text.write_text(TEXT)
    return folder, text


def test_passkey_prompt_has_the_exact_length_and_the_key_at_its_depth(lm):
    filler = text_tokens(lm, None, 400, seed=0)
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(lm, filler, 256, depth, "12345")
        ids = prompt.ids[0].tolist()
        assert len(ids) == 256
        needle = [4, 5, 17, 18, 19, 20, 21, 6]
        at = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
        n_fill = 256 - 3 - len(needle) - 3
        assert at == 3 + round(depth * n_fill)
    with pytest.raises(EvalError, match="too short"):
        passkey_prompt(lm, filler, 12, 0.5, "12345")


def test_perplexity_scores_every_token_once(lm):
    ids = torch.tensor(text_tokens(lm, None, 300, seed=1))
    with torch.no_grad():
        logits = lm.model(ids[None]).logits[0, :-1]
    full = float(torch.nn.functional.cross_entropy(logits, ids[1:]))
    one = perplexity(lm, ids, window=512, stride=256)
    assert one["scored"] == 299 and one["windows"] == 1
    assert one["nll"] == pytest.approx(full, rel=1e-5)
    overlapping = perplexity(lm, ids, window=128, stride=64)
    assert overlapping["scored"] == 299 and math.isfinite(overlapping["ppl"])
    disjoint = perplexity(lm, ids, window=128, stride=128)  # a window's first token has no context
    assert disjoint["windows"] == 3 and disjoint["scored"] == 299 - 2
    with pytest.raises(EvalError, match="stride"):
        perplexity(lm, ids, window=128, stride=256)


def test_hip_and_hip_offload_with_a_covering_budget_match_dense(lm, monkeypatch):
    from hip_attn.offload import OffloadedKV

    attend, calls = OffloadedKV.attend, []

    def counted(self, q, **kw):
        calls.append(q.shape[2])
        return attend(self, q, **kw)

    monkeypatch.setattr(OffloadedKV, "attend", counted)
    result = run_eval(
        lm,
        COVERING,
        modes=("dense", "hip", "hip+offload"),
        contexts=(256,),
        depths=(0.5,),
        digits=3,
        ppl_tokens=384,  # two windows: the second scores only its last 128 tokens
        ppl_window=256,
        ppl_stride=128,
        offload=OffloadOptions(cache_blocks=128, max_chunk=128),  # 2 x beam x G leaf candidates
    )
    ppl = result["perplexity"]["results"]
    assert set(ppl) == {"dense", "hip", "hip+offload"}
    assert ppl["hip"]["nll"] == pytest.approx(ppl["dense"]["nll"], rel=1e-4)
    assert ppl["hip+offload"]["nll"] == pytest.approx(ppl["hip"]["nll"], rel=1e-4, abs=1e-4)
    assert ppl["hip+offload"]["nll"] == pytest.approx(ppl["dense"]["nll"], rel=1e-4)
    assert ppl["hip"]["scored"] == ppl["dense"]["scored"] == ppl["hip+offload"]["scored"] == 383
    assert ppl["hip+offload"]["windows"] == 2
    passkey = result["passkey"]
    assert passkey["same_answer_as_dense"] == {"hip": 1.0, "hip+offload": 1.0}
    hip, off = passkey["results"]["hip"], passkey["results"]["hip+offload"]
    assert [r["tokens"] for r in off] == [r["tokens"] for r in hip]
    # offload ran, in calls of at most max_chunk queries, each on both layers: passkey prefill
    # 2 x 128 and 2 decode steps (the last token is never fed back), perplexity 2 windows x 2
    assert calls == [128] * 2 * 2 + [1] * 2 * 2 + [128] * 4 * 2
    assert result["offload"] == {"cache_blocks": 128, "max_chunk": 128}
    json.dumps(result)


def test_eval_cli_on_a_local_checkpoint(checkpoint, tmp_path, capsys):
    folder, text = checkpoint
    out = tmp_path / "eval.json"
    argv = [
        "eval",
        "--model",
        str(folder),
        "--text",
        str(text),
        "--context",
        "200",
        "--depths",
        "0.5",
        "--digits",
        "3",
        "--ppl-tokens",
        "300",
        "--ppl-window",
        "256",
        "--modes",
        "dense,hip,hip+offload",
        "--offload-chunk",
        "128",
        *SMALL_HIP,
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "passkey retrieval" in captured.out and "perplexity over 300 tokens" in captured.out
    assert "hip+offload: K/V in host memory, 2,048 block-cache slots" in captured.out
    assert "passkey" not in captured.err  # no progress bar: stderr is not a terminal
    data = json.loads(out.read_text())
    assert data["model"] == str(folder) and data["hip_config"]["k"] == 64
    assert data["offload"] == {"cache_blocks": 2048, "max_chunk": 128}
    # offload keeps HiP's selection (here sparse: k=64 of up to 300 tokens)
    ppl, passkey = data["perplexity"]["results"], data["passkey"]["results"]
    assert ppl["hip+offload"]["nll"] == pytest.approx(ppl["hip"]["nll"], rel=1e-4, abs=1e-4)
    assert passkey["hip+offload"][0]["tokens"] == passkey["hip"][0]["tokens"]
    for mode in ("dense", "hip", "hip+offload"):
        (run,) = data["passkey"]["results"][mode]
        assert run["context"] == 200 and len(run["passkey"]) == 3
        assert isinstance(run["answer"], str) and isinstance(run["correct"], bool)
        r = data["perplexity"]["results"][mode]
        assert r["scored"] == 299 and math.isfinite(r["ppl"])
    assert 0.0 <= data["passkey"]["accuracy"]["hip"] <= 1.0


def test_eval_cli_random_model_json_records_the_offload_options(capsys):
    argv = [
        "eval",
        "--random-model",
        "--tasks",
        "perplexity",
        "--ppl-tokens",
        "200",
        "--ppl-window",
        "200",
        "--modes",
        "dense,hip+offload",
        *SMALL_HIP,
        "--cache-blocks",
        "64",
        "--offload-chunk",
        "128",
        "--json",
        "-",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "passkey" not in data and list(data["perplexity"]["results"]) == ["dense", "hip+offload"]
    assert data["offload"] == {"cache_blocks": 64, "max_chunk": 128}
    assert math.isfinite(data["perplexity"]["results"]["hip+offload"]["ppl"])
    assert "perplexity" not in captured.err


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--offload-chunk", "100"], "--offload-chunk must be a multiple of --block-size-q (64)"),
        (["--offload-chunk", "64"], "larger than it"),
        # the defaults' search ranks 2 x beam x k // block_size_k leaf candidates at once
        (["--cache-blocks", "8"], "--cache-blocks 8 cannot hold the 256 blocks"),
        (["--cache-blocks", "16", "--head-sharing", "head"], "cannot hold the 512 blocks"),
    ],
)
def test_eval_refuses_offload_options_it_cannot_run_with(flags, needle, capsys):
    assert main(["eval", "--random-model", "--modes", "dense,hip+offload", *flags]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hip-attn eval: error:")
    assert needle in lines[0] and captured.out == ""


def test_eval_errors(checkpoint, tmp_path, capsys):
    folder, text = checkpoint
    assert main(["eval", "--model", str(folder), "--text", str(tmp_path / "none.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    assert main(["eval", "--model", str(bare), "--text", str(text)]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err
    for argv, needle in [
        (["--depths", "1.5"], "depths are fractions"),
        (["--cache-blocks", "0"], "--cache-blocks: must be >= 1"),
        (["--offload-chunk", "lots"], "--offload-chunk: not a token count"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["eval", "--random-model", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err.splitlines()[-1] and "Traceback" not in err
    with pytest.raises(EvalError, match="no such folder"):
        load_model(str(tmp_path / "missing"), CPU, torch.float32)


def test_a_converted_checkpoint_is_published_once_when_workers_race(tmp_path):
    """Parallel test workers may both convert SmolLM2: each stages in its own folder, the
    first rename wins, the second conversion is dropped, and a half-written folder is never
    taken for a finished one. Staging folders have the cache's permissions and never outlive
    their conversion, finished or failed."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    folder = cache / "smollm2"

    def convert(marker):
        with _staging(folder) as staged:
            assert list(staged.iterdir()) == []
            assert staged.stat().st_mode & 0o777 == cache.stat().st_mode & 0o777
            (staged / "model.safetensors").write_text(marker)
            _publish(staged, folder)

    with _staging(folder) as one, _staging(folder) as two:
        assert one != two and one.parent == two.parent == cache
    convert("first")
    convert("second")
    assert (folder / "model.safetensors").read_text() == "first"
    assert [p.name for p in cache.iterdir()] == ["smollm2"]

    with pytest.raises(RuntimeError), _staging(folder):
        raise RuntimeError("the conversion failed")
    assert [p.name for p in cache.iterdir()] == ["smollm2"]

    broken = cache / "broken"
    (broken / "leftover").mkdir(parents=True)
    with pytest.raises(OSError), _staging(broken) as staged:
        (staged / "model.safetensors").write_text("third")
        _publish(staged, broken)
    assert sorted(p.name for p in cache.iterdir()) == ["broken", "smollm2"]
