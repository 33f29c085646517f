"""Runs of several tokens per sampler, continued one decode pass at a time over an engine's own step.

An engine whose step makes one token per row (or a greedy chain only) hands its multi-token rows here:
every unfinished run advances by one token per pass, all of them in the same pass, each fed the token it
made last. Step i of a seeded run uses `step_seed(seed, i)`, so a run equals one-token steps fed back one
by one with those seeds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from pie_driver_trtllm.engines.base import Row, RowResult

SEED_MODULUS = 1 << 64


def step_seed(seed: int | None, step: int) -> int | None:
    """The seed of a run's step `step` (0 is the first token): the sampler's seed plus the step, mod 2**64."""
    return None if seed is None else (seed + step) % SEED_MODULUS


def chained_in_engine(row: Row) -> bool:
    """A greedy row without log-probabilities: engines may continue it with their own greedy chain."""
    sampler = row.sampler
    return sampler.is_greedy and not (sampler.return_logprobs or sampler.return_logprob)


def finished(row: Row, result: RowResult | None) -> bool:
    """The row made all its tokens, stopped at a stop id, or failed."""
    if result is None or result.tokens is None or result.error is not None:
        return True
    return len(result.tokens) >= row.steps or result.tokens[-1] in row.sampler.stop_token_ids


def step_with_runs(step_once: Callable[[list[Row]], list[RowResult]], rows: list[Row],
                   chained: Callable[[Row], bool]) -> list[RowResult]:
    """One engine step whose rows may be runs: `step_once` makes each row's first token (and the whole run
    where `chained(row)`), then `continue_runs` makes the rest.

    A run whose context has rows over another token list in this step (the context was rewritten later in
    the forward, so the run reads a private copy of its prefix) takes a call of its own: both would
    otherwise extend one cache. So does a chained run when another row of its context reads past its prefix
    (the context was appended to later in the forward) or another chained run starts where it does: an
    engine may chain on the cache its call left, which then ends at that other row or chain, not at the run.
    """
    alone = _alone(rows, chained)
    if alone:
        results: list[RowResult | None] = [None] * len(rows)
        rest = [i for i in range(len(rows)) if i not in alone]
        for i, result in zip(rest, step_once([rows[i] for i in rest]) if rest else [], strict=True):
            results[i] = result
        for i in sorted(alone):
            results[i] = step_once([rows[i]])[0]
    else:
        results = step_once(rows)  # type: ignore[assignment]
    if any(row.steps > 1 and not chained(row) for row in rows):
        continue_runs(step_once, rows, results)
    return results  # type: ignore[return-value]


def _alone(rows: list[Row], chained: Callable[[Row], bool]) -> set[int]:
    """The indexes of the runs that take a call of their own (see `step_with_runs`)."""
    if len({row.context for row in rows}) == len(rows):  # the decode step's case, every context once
        return set()
    lists: dict[int, set[int]] = {}
    longest: dict[int, int] = {}
    for row in rows:
        lists.setdefault(row.context, set()).add(id(row.tokens))
        longest[row.context] = max(longest.get(row.context, 0), row.length)
    runs = [(i, row) for i, row in enumerate(rows) if row.steps > 1]
    chains = Counter((row.context, row.length) for _, row in runs if chained(row))
    private = {i for i, row in runs if len(lists[row.context]) > 1}
    overtaken = {i for i, row in runs if chained(row)
                 and (row.length < longest[row.context] or chains[row.context, row.length] > 1)}
    return private | overtaken


def continue_runs(step_once: Callable[[list[Row]], list[RowResult]], rows: list[Row],
                  results: list[RowResult | None]) -> None:
    """Extend the results of rows with `steps` > 1 in place, one pass of `step_once` per token.

    Runs of one context advance in separate passes (each pass names a context once), so an engine never
    sees two different continuations of one context in one step.
    """
    histories: dict[int, list[int]] = {}
    while True:
        waves: list[list[int]] = []
        seen: dict[int, int] = {}
        for index, row in enumerate(rows):
            if row.steps > 1 and not finished(row, results[index]):
                wave = seen[row.context] = seen.get(row.context, -1) + 1
                if wave == len(waves):
                    waves.append([])
                waves[wave].append(index)
        if not waves:
            return
        for wave in waves:
            passes = []
            for index in wave:
                row, made = rows[index], results[index].tokens  # type: ignore[union-attr]
                history = histories.get(index)
                if history is None:
                    history = histories[index] = row.tokens[:row.length]
                history.append(made[-1])  # type: ignore[index]
                passes.append(Row(row.context, history, len(history), row.sampler,
                                  step_seed(row.seed, len(made)), 1))  # type: ignore[arg-type]
            for index, out in zip(wave, step_once(passes), strict=True):
                _extend(results, index, out)


def _extend(results: list[RowResult | None], index: int, out: RowResult) -> None:
    result = results[index]
    assert result is not None and result.tokens is not None
    if out.error is not None or not out.tokens:
        results[index] = RowResult(error=out.error or "the engine made no token", code=out.code)
        return
    result.tokens.append(out.tokens[0])
    if result.token_logprobs is not None and out.token_logprobs:
        result.token_logprobs.append(out.token_logprobs[0])
