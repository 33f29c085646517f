"""The demo end to end: a real driver subprocess on the tiny model, with a fork and a rollback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pie_driver_trtllm.tools.demo import run_demo

pytestmark = pytest.mark.slow

SUMMARY = re.compile(r"summary: (\d+) contexts, (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\), "
                     r"(\d+) forwards, (\d+) engine calls, (\d+) lookahead hits")


def test_demo_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # keep every table row on one line so notes can be matched
    assert run_demo(contexts=8, steps=6, size="tiny", workdir=tmp_path) == 0
    out = capsys.readouterr().out

    summaries = [line for line in out.splitlines() if line.startswith("summary:")]
    assert len(summaries) == 1, out
    match = SUMMARY.fullmatch(summaries[0].strip())
    assert match, summaries[0]
    contexts, tokens, seconds, rate, forwards, engine_calls, hits = (
        float(g) if "." in g else int(g) for g in match.groups())
    assert contexts == 9  # 8 plus the fork
    # 8 contexts for every step, and the fork from step 3 on (6 // 2).
    assert tokens == 8 * 6 + 3
    assert forwards == 6
    # Seconds are printed to the millisecond, so a short run's rate may differ from tokens / seconds by
    # up to half a millisecond's share of it, on top of the rate's own rounding.
    assert seconds > 0 and rate == pytest.approx(tokens / seconds, rel=0.01 + 0.0005 / seconds, abs=0.1)
    # Every forward carries sampled rows, so each calls the engine once; the greedy rows are mostly
    # served from the lookahead buffer after their first step.
    assert 0 < engine_calls <= forwards
    assert 0 < hits <= 4 * 5

    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"\s+\d+\s", line)}
    assert sorted(rows, key=int) == [str(i) for i in range(9)]
    assert "forked → #8" in rows["0"]
    assert "fork of #0" in rows["8"]
    assert "rolled back at pos" in rows["2"]
    assert "greedy" in rows["0"] and "top-k/p seed 101" in rows["1"]
    runs = [line for line in out.splitlines() if line.startswith("runs:")]
    assert [line.split(",")[0] for line in runs] == ["runs: greedy", "runs: top_k"]
    for line in runs:  # the driver's max_model_len leaves room for 8 tokens after the 5-token prompt
        assert line.endswith("8 tokens in 1 forwards (max_tokens 16) against 8 one token at a time: equal"), line


def test_demo_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo(contexts=4, steps=6, size="tiny", workdir=tmp_path) == 1
    assert run_demo(size="huge", workdir=tmp_path) == 1
    err = capsys.readouterr().err
    assert "--contexts 8 or more" in err and "'huge' is not one of" in err
