"""Unit tests of LookaheadBuffer: a buffered greedy token is served only for its predicted prefix."""

from __future__ import annotations

from pie_driver_trtllm.core.lookahead import LookaheadBuffer

PROMPT = [1, 2, 3]
PREDICTED = [40, 41, 42, 43]  # PREDICTED[i] follows PROMPT + PREDICTED[:i]


def filled() -> LookaheadBuffer:
    buffer = LookaheadBuffer(size=4)
    buffer.fill(7, anchor=len(PROMPT), tokens=PREDICTED)
    return buffer


def test_take_serves_tokens_in_order_then_exhausts() -> None:
    buffer = filled()
    assert len(buffer) == 1
    history = list(PROMPT)
    served = []
    for token in PREDICTED[:-1]:
        history.append(token)  # the host sends back what it was given
        served.append(buffer.take(7, history, len(history)))
    assert served == [41, 42, 43]
    assert buffer.hits == 3
    assert len(buffer) == 0  # the last token was served: the buffer is gone
    history.append(43)
    assert buffer.take(7, history, len(history)) is None
    assert buffer.hits == 3


def test_offset_zero_is_never_served() -> None:
    buffer = filled()
    # the token after the anchor itself (40) was returned at fill time, not by take
    assert buffer.take(7, PROMPT, len(PROMPT)) is None
    assert buffer.hits == 0
    assert len(buffer) == 0


def test_take_on_empty_buffer_or_other_context() -> None:
    buffer = filled()
    history = [*PROMPT, 40]
    assert buffer.take(8, history, len(history)) is None
    assert len(buffer) == 1  # another context does not touch this one
    assert buffer.take(7, history, len(history)) == 41
    assert buffer.hits == 1


def test_take_with_prefix_shorter_than_history() -> None:
    buffer = filled()
    history = [*PROMPT, 40, 41, 99]  # a sampler at an earlier token of a longer request
    assert buffer.take(7, history, 5) == 42
    assert buffer.hits == 1


def test_divergence_drops_the_buffer() -> None:
    buffer = filled()
    history = [*PROMPT, 40, 99]  # the host appended something other than the predicted 41
    assert buffer.take(7, history, len(history)) is None
    assert len(buffer) == 0
    assert buffer.hits == 0
    # even the originally right history now finds nothing
    assert buffer.take(7, [*PROMPT, 40], 4) is None


def test_prefix_past_the_prediction_drops() -> None:
    buffer = filled()
    history = [*PROMPT, 40, 41, 42, 43, 44]
    assert buffer.take(7, history, len(history)) is None  # offset 5 >= len(PREDICTED)
    assert len(buffer) == 0


def test_prefix_before_the_anchor_drops() -> None:
    buffer = filled()
    assert buffer.take(7, PROMPT, 2) is None
    assert len(buffer) == 0


def test_cut_below_anchor_drops() -> None:
    buffer = filled()
    buffer.cut(7, 2)
    assert len(buffer) == 0
    # even though the history now matches the prediction again, nothing is served
    history = [*PROMPT, 40]
    assert buffer.take(7, history, len(history)) is None
    assert buffer.hits == 0


def test_cut_at_or_after_anchor_keeps_when_tokens_still_match() -> None:
    buffer = filled()
    buffer.cut(7, len(PROMPT))  # e.g. the host re-sent 40 at the anchor as a different token, then 40 again
    assert len(buffer) == 1
    buffer.cut(7, len(PROMPT) + 1)
    assert len(buffer) == 1
    history = [*PROMPT, 40, 41]
    assert buffer.take(7, history, len(history)) == 42
    assert buffer.hits == 1


def test_cut_after_anchor_with_changed_tokens_drops_at_take() -> None:
    buffer = filled()
    buffer.cut(7, len(PROMPT) + 1)
    assert len(buffer) == 1
    history = [*PROMPT, 40, 77]  # what the cut put there differs from the prediction
    assert buffer.take(7, history, len(history)) is None
    assert len(buffer) == 0


def test_cut_of_other_context_keeps() -> None:
    buffer = filled()
    buffer.cut(8, 0)
    assert len(buffer) == 1


def test_fill_with_one_token_clears() -> None:
    buffer = filled()
    buffer.fill(7, anchor=len(PROMPT), tokens=[40])
    assert len(buffer) == 0
    history = [*PROMPT, 40]
    assert buffer.take(7, history, len(history)) is None


def test_fill_replaces_the_previous_prediction() -> None:
    buffer = filled()
    buffer.fill(7, anchor=5, tokens=[60, 61, 62])
    history = [*PROMPT, 40, 41, 60]
    assert buffer.take(7, history, len(history)) == 61
    assert len(buffer) == 1


def test_fill_copies_the_token_list() -> None:
    buffer = LookaheadBuffer(size=4)
    tokens = [40, 41, 42]
    buffer.fill(7, anchor=3, tokens=tokens)
    tokens[1] = 99
    history = [*PROMPT, 40]
    assert buffer.take(7, history, len(history)) == 41


def test_drop() -> None:
    buffer = filled()
    buffer.fill(8, anchor=0, tokens=[1, 2])
    assert len(buffer) == 2
    buffer.drop([7, 9])
    assert len(buffer) == 1
    assert buffer.take(7, [*PROMPT, 40], 4) is None
    assert buffer.take(8, [1], 1) == 2
    buffer.drop(())
    assert buffer.hits == 1


def test_hits_count_across_contexts() -> None:
    buffer = LookaheadBuffer(size=3)
    buffer.fill(1, anchor=0, tokens=[5, 6, 7])
    buffer.fill(2, anchor=1, tokens=[8, 9])
    assert buffer.take(1, [5], 1) == 6
    assert buffer.take(2, [0, 8], 2) == 9
    assert buffer.take(1, [5, 6], 2) == 7
    assert buffer.hits == 3
    assert len(buffer) == 0
