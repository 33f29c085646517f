"""Unit tests of ContextStore: the protocol's per-context history rules (merge, gap, fork, truncate, LRU)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.core.histories import ContextStore, MergeResult
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode, HistoryGap


def run(store: ContextStore, context: int, tokens: list[int], start: int = 0) -> MergeResult:
    return store.merge(context, tokens, list(range(start, start + len(tokens))))


# ---------------------------------------------------------------- merge


def test_append_to_new_context_and_extend() -> None:
    store = ContextStore(max_contexts=8)
    result = run(store, 1, [10, 11, 12])
    assert result.cut_at is None
    assert result.evicted == []
    assert store.get(1) == [10, 11, 12]
    assert store.length(1) == 3
    result = run(store, 1, [13, 14], start=3)
    assert result.cut_at is None
    assert store.get(1) == [10, 11, 12, 13, 14]
    assert 1 in store
    assert len(store) == 1


def test_resending_existing_tokens_is_a_no_op() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13])
    result = run(store, 1, [11, 12], start=1)
    assert result.cut_at is None
    assert store.get(1) == [10, 11, 12, 13]
    result = run(store, 1, [10, 11, 12, 13])
    assert result.cut_at is None
    assert store.get(1) == [10, 11, 12, 13]


def test_resend_that_overlaps_and_extends_appends_the_new_part() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    result = run(store, 1, [11, 12, 13, 14], start=1)
    assert result.cut_at is None
    assert store.get(1) == [10, 11, 12, 13, 14]


def test_rollback_cuts_at_first_different_token_and_appends() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13, 14])
    result = run(store, 1, [11, 99, 98], start=1)
    assert result.cut_at == 2
    assert store.get(1) == [10, 11, 99, 98]


def test_rollback_shorter_than_history_drops_the_tail() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13, 14])
    result = run(store, 1, [77], start=1)
    assert result.cut_at == 1
    assert store.get(1) == [10, 77]


def test_rollback_at_position_zero() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    result = run(store, 1, [5])
    assert result.cut_at == 0
    assert store.get(1) == [5]


def test_history_gap_reports_known_length_and_leaves_history_unchanged() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    with pytest.raises(HistoryGap) as info:
        run(store, 1, [13, 14], start=4)
    assert info.value.code is ErrorCode.HISTORY_GAP
    assert info.value.details["known_length"] == 3
    assert info.value.to_wire()["known_length"] == 3
    assert store.get(1) == [10, 11, 12]


def test_history_gap_in_the_middle_of_a_scattered_request_changes_nothing() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    # positions 1 (rollback), 2 (append), then 5: past the end (3) -> whole request refused
    with pytest.raises(HistoryGap) as info:
        store.merge(1, [50, 51, 52], [1, 2, 5])
    assert info.value.details["known_length"] == 3
    assert store.get(1) == [10, 11, 12]
    # the same holds when the earlier tokens only appended
    with pytest.raises(HistoryGap) as info:
        store.merge(1, [13, 14, 15], [3, 4, 9])
    assert info.value.details["known_length"] == 3
    assert store.get(1) == [10, 11, 12]


def test_scattered_gap_on_unknown_context_creates_nothing() -> None:
    store = ContextStore(max_contexts=8)
    with pytest.raises(HistoryGap) as info:
        store.merge(7, [1, 2], [0, 2])
    assert info.value.details["known_length"] == 0
    assert 7 not in store
    assert len(store) == 0


def test_first_request_of_unknown_context_must_start_at_zero() -> None:
    store = ContextStore(max_contexts=8)
    with pytest.raises(HistoryGap) as info:
        run(store, 3, [10, 11], start=1)
    assert info.value.details["known_length"] == 0
    assert 3 not in store
    assert store.length(3) == 0
    run(store, 3, [10, 11])
    assert store.get(3) == [10, 11]


def test_empty_request_changes_nothing() -> None:
    store = ContextStore(max_contexts=8)
    result = store.merge(4, [], [])
    assert result.cut_at is None
    assert result.evicted == []
    assert 4 not in store


def test_scattered_request_merges_in_order() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13])
    # pos 4 append, pos 1 rollback (cut to [10] then append 21), pos 2 append
    result = store.merge(1, [14, 21, 22], [4, 1, 2])
    assert result.cut_at == 1
    assert store.get(1) == [10, 21, 22]


def test_scattered_snapshots_capture_prefix_right_after_each_token() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    result = store.merge(1, [13, 14, 31, 32], [3, 4, 1, 2], snapshot_at=frozenset({0, 1, 2, 3}))
    assert result.snapshots == {
        0: [10, 11, 12, 13],
        1: [10, 11, 12, 13, 14],
        2: [10, 31],
    }  # 3's prefix is the whole history: the live one stands for it
    assert store.get(1) == [10, 31, 32]
    # snapshots are copies, not views of the live history
    result.snapshots[2].append(999)
    assert store.get(1) == [10, 31, 32]


def test_scattered_snapshot_of_an_unchanged_token_is_its_prefix_only() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    result = store.merge(1, [13, 11], [3, 1], snapshot_at=frozenset({1}))
    assert result.cut_at is None
    assert result.snapshots == {1: [10, 11]}
    assert store.get(1) == [10, 11, 12, 13]


def test_scattered_cut_at_is_the_lowest_cut() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13])
    # cut at 1 (len 2), append at 2 (len 3), cut again at 2
    result = store.merge(1, [21, 22, 23], [1, 2, 2])
    assert result.cut_at == 1
    assert store.get(1) == [10, 21, 23]


def test_unknown_context_get_raises_unknown_context() -> None:
    store = ContextStore(max_contexts=8)
    with pytest.raises(DriverError) as info:
        store.get(42)
    assert info.value.code is ErrorCode.UNKNOWN_CONTEXT


# ---------------------------------------------------------------- fork


def test_fork_copies_prefix_and_lists_are_independent() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13])
    assert store.fork(1, 2, 2) == []
    assert store.get(2) == [10, 11]
    assert store.get(1) == [10, 11, 12, 13]
    run(store, 2, [20], start=2)
    run(store, 1, [14], start=4)
    assert store.get(2) == [10, 11, 20]
    assert store.get(1) == [10, 11, 12, 13, 14]


def test_fork_without_length_copies_everything() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    store.fork(1, 2, None)
    assert store.get(2) == [10, 11, 12]
    assert store.get(2) is not store.get(1)


def test_fork_of_full_length_and_zero_length() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    store.fork(1, 2, 3)
    assert store.get(2) == [10, 11, 12]
    store.fork(1, 3, 0)
    assert store.get(3) == []
    assert 3 in store


def test_fork_replaces_destination() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    run(store, 2, [90, 91, 92, 93, 94])
    store.fork(1, 2, 1)
    assert store.get(2) == [10]
    assert store.get(1) == [10, 11, 12]


def test_fork_length_beyond_source_is_out_of_range() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12])
    with pytest.raises(DriverError) as info:
        store.fork(1, 2, 4)
    assert info.value.code is ErrorCode.OUT_OF_RANGE
    assert 2 not in store
    assert store.get(1) == [10, 11, 12]


def test_fork_unknown_source_is_unknown_context() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 2, [5])
    with pytest.raises(DriverError) as info:
        store.fork(1, 2, None)
    assert info.value.code is ErrorCode.UNKNOWN_CONTEXT
    assert store.get(2) == [5]


# ---------------------------------------------------------------- truncate / release


def test_truncate_cuts_history() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11, 12, 13])
    store.truncate(1, 2)
    assert store.get(1) == [10, 11]
    store.truncate(1, 2)
    assert store.get(1) == [10, 11]
    store.truncate(1, 0)
    assert store.get(1) == []
    assert 1 in store


def test_truncate_beyond_length_is_out_of_range() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10, 11])
    with pytest.raises(DriverError) as info:
        store.truncate(1, 3)
    assert info.value.code is ErrorCode.OUT_OF_RANGE
    assert store.get(1) == [10, 11]


def test_truncate_unknown_context() -> None:
    store = ContextStore(max_contexts=8)
    with pytest.raises(DriverError) as info:
        store.truncate(9, 0)
    assert info.value.code is ErrorCode.UNKNOWN_CONTEXT


def test_release_returns_the_contexts_that_existed() -> None:
    store = ContextStore(max_contexts=8)
    run(store, 1, [10])
    run(store, 2, [20])
    store.fork(1, 3, 0)  # an empty history still exists
    released = store.release([1, 3, 4, 1])
    assert sorted(released) == [1, 3]
    assert len(released) == 2
    assert 1 not in store
    assert 3 not in store
    assert store.get(2) == [20]
    assert store.release((1,)) == []
    # a released context starts over at 0
    with pytest.raises(HistoryGap) as info:
        run(store, 1, [10], start=1)
    assert info.value.details["known_length"] == 0


# ---------------------------------------------------------------- LRU bound


def test_lru_evicts_least_recently_used() -> None:
    store = ContextStore(max_contexts=2)
    assert run(store, 1, [10]).evicted == []
    assert run(store, 2, [20]).evicted == []
    run(store, 1, [11], start=1)  # 1 is now more recent than 2
    result = run(store, 3, [30])
    assert result.evicted == [2]
    assert store.evictions == 1
    assert 2 not in store
    assert store.get(1) == [10, 11]
    assert store.get(3) == [30]
    assert len(store) == 2


def test_lru_counts_evictions_and_no_op_merge_refreshes() -> None:
    store = ContextStore(max_contexts=2)
    run(store, 1, [10])
    run(store, 2, [20])
    run(store, 1, [10])  # a re-send also uses the context
    assert run(store, 3, [30]).evicted == [2]
    assert run(store, 4, [40]).evicted == [1]
    assert store.evictions == 2
    assert sorted(c for c in (1, 2, 3, 4) if c in store) == [3, 4]


def test_truncate_refreshes_lru() -> None:
    store = ContextStore(max_contexts=2)
    run(store, 1, [10, 11])
    run(store, 2, [20])
    store.truncate(1, 1)
    assert run(store, 3, [30]).evicted == [2]


def test_fork_evicts_and_reports() -> None:
    store = ContextStore(max_contexts=2)
    run(store, 1, [10])
    run(store, 2, [20])
    assert store.fork(2, 3, None) == [1]
    assert store.evictions == 1
    assert store.get(3) == [20]
    assert 1 not in store


def test_gap_does_not_evict() -> None:
    store = ContextStore(max_contexts=1)
    run(store, 1, [10])
    with pytest.raises(HistoryGap):
        run(store, 2, [20], start=1)
    assert store.get(1) == [10]
    assert store.evictions == 0


# ---------------------------------------------------------------- property test against a reference model


class ReferenceGap(Exception):
    def __init__(self, known_length: int) -> None:
        self.known_length = known_length


def reference_merge(history: list[int], tokens: list[int], positions: list[int],
                    snapshot_at: frozenset[int]) -> tuple[list[int], int | None, dict[int, list[int]]]:
    """The protocol's rules, applied one (token, position) pair at a time, on a copy."""
    work = list(history)
    cut_at = None
    snapshots = {}
    for index, (token, position) in enumerate(zip(tokens, positions, strict=True)):
        if position > len(work):
            raise ReferenceGap(len(history))
        if position == len(work):
            work.append(token)
        elif work[position] != token:
            cut_at = position if cut_at is None else min(cut_at, position)
            work = [*work[:position], token]
        if index in snapshot_at:
            snapshots[index] = work[: position + 1]
    # A prefix that is the whole final history is not kept: the live history stands for it.
    return work, cut_at, {index: prefix for index, prefix in snapshots.items() if prefix != work}


def draw_request(data: st.DataObject, known: int) -> tuple[list[int], list[int], frozenset[int]]:
    """Tokens, positions and snapshot indexes for a context whose history holds `known` tokens."""
    n = data.draw(st.integers(0, 6), label="n")
    tokens = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n), label="tokens")  # few ids: many equal
    shape = data.draw(st.sampled_from(["run", "run past the end", "scattered", "scattered anywhere"]),
                      label="shape")
    if shape == "run":
        start = data.draw(st.integers(0, known))
        positions = list(range(start, start + n))
    elif shape == "run past the end":
        start = data.draw(st.integers(known + 1, known + 3))
        positions = list(range(start, start + n))
    elif shape == "scattered":  # token i can reach at most known + i, so gaps are rare
        positions = [data.draw(st.integers(0, known + i)) for i in range(n)]
    else:
        positions = data.draw(st.lists(st.integers(0, known + 4), min_size=n, max_size=n))
    snapshot_at = frozenset(data.draw(st.sets(st.integers(0, n - 1)) if n else st.just(set()), label="snapshots"))
    return tokens, positions, snapshot_at


def _is_contiguous(positions: list[int]) -> bool:
    return positions == list(range(positions[0], positions[0] + len(positions))) if positions else True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_merge_matches_reference_model(data: st.DataObject) -> None:
    store = ContextStore(max_contexts=100)
    model: dict[int, list[int]] = {}
    for _ in range(data.draw(st.integers(1, 25), label="requests")):
        context = data.draw(st.integers(0, 3), label="context")
        tokens, positions, snapshot_at = draw_request(data, len(model.get(context, [])))
        before = list(model.get(context, []))
        try:
            expected, expected_cut, expected_snapshots = reference_merge(
                before, tokens, positions, snapshot_at)
        except ReferenceGap as gap:
            with pytest.raises(HistoryGap) as info:
                store.merge(context, tokens, positions, snapshot_at)
            assert info.value.details["known_length"] == gap.known_length
            assert store.length(context) == len(before)
            if context in model:
                assert store.get(context) == before
            continue
        result = store.merge(context, tokens, positions, snapshot_at)
        if tokens:
            model[context] = expected
        assert result.cut_at == expected_cut
        assert result.evicted == []
        if not _is_contiguous(positions):
            assert result.snapshots == expected_snapshots
        else:
            # a contiguous run never revisits an earlier prefix, so the final history serves every sampler
            for index, prefix in result.snapshots.items():
                assert prefix == expected_snapshots[index]
            for index, prefix in expected_snapshots.items():
                assert prefix == expected[: positions[index] + 1]
        for ctx, history in model.items():
            assert store.get(ctx) == history
    assert store.evictions == 0
