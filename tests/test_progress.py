"""Progress bars (``hip_attn.progress``): tqdm with rate and ETA on a terminal's stderr, nothing
when stderr is a pipe or a file."""

import io
import sys
from functools import partialmethod

import pytest
from tqdm import tqdm

from hip_attn import HiPConfig
from hip_attn.accuracy.harness import run_accuracy
from hip_attn.demo import _TokenBar
from hip_attn.progress import progress_bar, say


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    """A terminal as stderr, for the rest of the test (set in the test's body: pytest swaps
    its own capture back in after the fixtures)."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    # draw every update, however fast they come
    monkeypatch.setattr(tqdm, "__init__", partialmethod(tqdm.__init__, mininterval=0))
    return screen


def test_a_terminal_gets_count_rate_and_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    assert list(progress_bar(range(3), desc="work", unit="case")) == [0, 1, 2]
    text = terminal.getvalue()
    assert "work" in text and "3/3" in text and "case/s" in text
    assert "<00:00" in text  # elapsed<remaining
    assert text.endswith("\r")  # cleared when done: the results that follow stand alone


@pytest.mark.parametrize("stream", [io.StringIO(), Terminal()], ids=["pipe", "disabled"])
def test_silent_off_a_terminal_or_when_disabled(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stderr", stream)
    enabled = not isinstance(stream, Terminal)  # the terminal case: disabled by the caller
    bar = progress_bar(total=2, desc="work", enabled=enabled)
    bar.update()
    bar.set_postfix_str("step")
    bar.close()
    assert stream.getvalue() == ""


def test_say_prints_whole_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    out = io.StringIO()
    bar = progress_bar(total=2, desc="work")
    say("result 1", out)
    bar.close()
    assert out.getvalue() == "result 1\n"
    say("note", sys.stderr)
    assert terminal.getvalue().endswith("note\n")


def test_demo_counts_generated_tokens_not_the_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    bar = _TokenBar("dense", 3)
    for _ in range(4):  # generate() streams the prompt, then one put per token
        bar.put(None)
    bar.end()
    text = terminal.getvalue()
    assert "dense" in text and "3/3" in text and "4/3" not in text and "token/s" in text


def test_accuracy_counts_every_sampled_block(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    config = HiPConfig(k=128, window=128, sink_tokens=16)
    run_accuracy([512, 1024], config, methods=("dense",), seeds=(0, 1), sample_last=1,
                 sample_spread=1, heads=2, kv_heads=1, progress=True)  # fmt: skip
    text = terminal.getvalue()
    assert "context 1024, seed 1" in text and "4/8" in text and "8/8" in text  # 2 x 2 x 2


def test_accuracy_without_progress_draws_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = on_terminal(monkeypatch)
    config = HiPConfig(k=128, window=128, sink_tokens=16)
    run_accuracy([512], config, methods=("dense",), sample_last=1, sample_spread=0, heads=2,
                 kv_heads=1)  # fmt: skip
    assert terminal.getvalue() == ""
