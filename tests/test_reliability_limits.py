"""Output and inbound bounds at the edge: row and output-value caps refused with CAPACITY before any
planning, decoding that stops at a cap instead of building what a frame describes, and error messages that
never grow with the input nor show heap addresses.

The memory checks measure Python allocations with tracemalloc; each threshold is stated next to it.
"""

from __future__ import annotations

import json
import tracemalloc

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.core.histories import ContextStore
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.replicas.splice import decode_spliced
from pie_driver_trtllm.serving.backlog import Backlog
from pie_driver_trtllm.wire.codec import FrameRejected, Limits, Request, decode_frame
from pie_driver_trtllm.wire.errors import MAX_MESSAGE_CHARS, DriverError, ErrorCode

LIMITS = Limits(vocab_size=1000, max_model_len=4096, max_forward_requests=64, max_forward_tokens=512,
                max_logprob_labels=16, max_frame_bytes=64 << 20, max_sampler_rows=32, max_prob_rows=8,
                max_logit_rows=8, max_output_elements=1000)


def frame(requests: list[dict], **extra: object) -> bytes:
    return msgpack.packb({"v": 1, "id": 9, "op": "forward", "requests": requests, **extra})


def request(context: int, samplers: list[dict], n: int = 2) -> dict:
    return {"context": context, "tokens": list(range(1, n + 1)), "positions": list(range(n)), "samplers": samplers}


def refused(data: bytes) -> DriverError:
    with pytest.raises(FrameRejected) as caught:
        decode_frame(data, LIMITS)
    return caught.value.error


def refused_with_peak(data: bytes) -> tuple[DriverError, int]:
    """The error a frame is refused with, and the peak of Python allocations while refusing it."""
    tracemalloc.start()
    try:
        return refused(data), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_samplers_over_max_sampler_rows_are_refused_before_planning():
    samplers = [{"at": 0, "type": "greedy"}] * 11
    assert isinstance(decode_frame(frame([request(c, samplers) for c in range(2)]), LIMITS).body.items[0].samplers,
                      tuple)  # 22 rows: within the cap of 32
    error = refused(frame([request(c, samplers) for c in range(3)]))  # 33 rows, spread over requests
    assert error.code == ErrorCode.CAPACITY and "max_sampler_rows" in error.message
    error = refused(frame([request(1, [{"at": 0, "type": "greedy"}] * 100)]))  # one request alone
    assert error.code == ErrorCode.CAPACITY


@pytest.mark.parametrize(("samplers", "cap"), [
    ([{"at": 0, "type": "dist", "k": 1}] * 9, "max_prob_rows"),
    ([{"at": 1, "type": "logprobs", "token_ids": [1]}] * 9, "max_logit_rows"),
    ([{"at": 0, "type": "dist", "k": 600}, {"at": 1, "type": "dist", "k": 401}], "max_output_elements"),
    ([{"at": 0, "type": "dist", "k": 990}, {"at": 1, "type": "logprobs", "token_ids": list(range(11))}],
     "max_output_elements"),
])
def test_output_caps_are_enforced_over_the_whole_forward(samplers, cap):
    half = len(samplers) // 2
    error = refused(frame([request(1, samplers[:half]), request(2, samplers[half:])]))
    assert error.code == ErrorCode.CAPACITY and cap in error.message


def test_outputs_at_the_caps_are_accepted():
    samplers = [{"at": 0, "type": "dist", "k": 125}] * 8
    forward = decode_frame(frame([request(1, samplers[:4]), request(2, samplers[4:])]), LIMITS).body
    assert all(not isinstance(item, DriverError) for item in forward.items)


def test_a_request_count_over_the_cap_is_refused_from_the_array_header():
    # 2 million empty maps in 2 MB: decoding them would allocate well over 100 MB.
    body = b"\xdd" + (2_000_000).to_bytes(4, "big") + b"\x80" * 2_000_000
    data = b"\x84\xa1v\x01\xa2id\x09\xa2op\xa7forward\xa8requests" + body
    error, peak = refused_with_peak(data)
    assert error.code == ErrorCode.CAPACITY and "max_forward_requests" in error.message
    assert peak < 1 << 20  # threshold: 1 MiB of Python allocations


def test_tokens_over_the_cap_are_refused_while_decoding():
    # One request of 4 million tokens (5 bytes each on the wire): decoded whole, about 150 MB of ints.
    tokens = b"\xdd" + (4_000_000).to_bytes(4, "big") + b"\xce\x00\x00\x01\x00" * 4_000_000
    data = (b"\x84\xa1v\x01\xa2id\x09\xa2op\xa7forward\xa8requests\x91\x83\xa7context\x01\xa6tokens" + tokens
            + b"\xa9positions\x90")
    error, peak = refused_with_peak(data)
    assert error.code == ErrorCode.CAPACITY
    assert peak < 1 << 20  # threshold: 1 MiB of Python allocations


def test_error_messages_do_not_echo_unbounded_input():
    error = refused(msgpack.packb({"v": 1, "id": 3, "op": "x" * 1_000_000}))
    assert error.code == ErrorCode.UNKNOWN_OP and len(error.message) <= MAX_MESSAGE_CHARS


def test_error_messages_show_no_heap_address():
    ext = msgpack.ExtType(5, b"abc")
    for data in (msgpack.packb({"v": ext, "id": 3, "op": "health"}), msgpack.packb({"v": 1, "id": ext, "op": "x"})):
        error = refused(data)
        assert "0x" not in error.message and "object at" not in error.message


def test_a_per_request_error_message_is_bounded():
    forward = decode_frame(frame([request(1, [{"at": 0, "type": "z" * 100_000}])]), LIMITS).body
    error = forward.items[0]
    assert isinstance(error, DriverError) and error.code == ErrorCode.BAD_REQUEST
    assert len(error.to_wire()["message"]) <= MAX_MESSAGE_CHARS


OPS = st.lists(st.tuples(st.sampled_from(["merge", "append", "fork", "truncate", "release"]), st.integers(0, 7),
                         st.integers(0, 40)), max_size=60)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ops=OPS)
@example(ops=[("merge", 0, 40), ("merge", 1, 40), ("merge", 2, 40), ("fork", 0, 40)])
def test_history_tokens_stay_within_the_total_bound(ops):
    store = ContextStore(max_contexts=6, max_tokens=100)
    for op, context, value in ops:
        known = store.length(context)
        try:
            if op == "merge":
                start = min(value, known)
                store.merge(context, list(range(value % 7 + 1)) * 5, list(range(start, start + (value % 7 + 1) * 5)))
            elif op == "append":
                if not store.append(context, value, known):
                    store.merge(context, [value], [known])
            elif op == "fork":
                store.fork(context, (context + 1) % 8, min(value, known))
            elif op == "truncate":
                store.truncate(context, min(value, known))
            else:
                store.release([context])
        except DriverError:
            pass
        held = sum(store.length(c) for c in range(8))
        assert store.tokens == held
        assert held <= 100 or len(store) == 1  # one history alone may be longer: it is kept


def test_a_checkpoint_length_past_u32_positions_is_clamped(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "max_position_embeddings": 2**40}))
    config = parse_config({"model": {"snapshot_dir": str(tmp_path)}, "driver": {"options": {"engine": "reference"}}})
    assert read_model_info(config).max_model_len == 2**32


def test_the_backlog_takes_connections_in_turns_within_its_bounds():
    backlog = Backlog(max_ops=5, max_bytes=100)
    ops = [(b"a", Request(i, "forward"), 10) for i in range(4)] + [(b"b", Request(9, "fork"), 10)]
    assert all(backlog.push(*op) for op in ops)
    assert not backlog.push(b"c", Request(10, "forward"), 1)  # 5 ops wait: full
    assert [backlog.pop()[1].id for _ in range(2)] == [0, 9]  # b's op right after a's first
    assert backlog.push(b"c", Request(11, "forward"), 70) and not backlog.push(b"c", Request(12, "forward"), 1)
    assert backlog.forwards() == 4 and len(backlog) == 4 and backlog.bytes == 100
    assert [backlog.pop()[0] for _ in range(4)] == [b"a", b"c", b"a", b"a"]
    assert not backlog and backlog.bytes == 0


def test_the_routers_one_pass_leaves_row_and_output_caps_to_the_general_path():
    greedy = [request(c, [{"at": 0, "type": "greedy"}]) for c in range(3)]
    assert decode_spliced(frame(greedy), LIMITS) is not None  # few plain samplers: one pass
    assert decode_spliced(frame([request(1, [{"at": 0, "type": "dist", "k": 1}])]), LIMITS) is not None
    for requests in ([request(c, [{"at": 0, "type": "greedy"}] * 11) for c in range(3)],  # 33 rows > 32
                     [request(1, [{"at": 0, "type": "dist", "k": 1}] * 2)],  # could ask for 2 x 1000 values
                     [request(1, [{"at": 0, "type": "logprobs", "token_ids": [1]}] * 9)]):  # 9 rows > 8
        assert decode_spliced(frame(requests), LIMITS) is None
    assert refused(frame([request(c, [{"at": 0, "type": "greedy"}] * 11) for c in range(3)])).code == \
        ErrorCode.CAPACITY


@pytest.mark.parametrize("kind", ["dist", "logprobs"])
def test_caps_hold_whatever_string_encoding_names_the_sampler_type(kind):
    # msgpack may write a short string with a longer header (str8: 0xd9, length); the frame's bound must
    # still see every such sampler, on the general and the fast path alike.
    sampler = {"at": 0, "type": "dist", "k": 1} if kind == "dist" else {"at": 0, "type": "logprobs", "token_ids": [1]}
    plain = msgpack.packb(kind)
    str8 = b"\xd9" + bytes((len(kind),)) + kind.encode()
    data = frame([request(c, [sampler]) for c in range(9)]).replace(plain, str8)
    assert data.count(plain) == 0 and msgpack.unpackb(data)["requests"][0]["samplers"][0]["type"] == kind
    error = refused(data)
    cap = "max_prob_rows" if kind == "dist" else "max_logit_rows"
    assert error.code == ErrorCode.CAPACITY and cap in error.message


def test_dist_rows_count_only_the_entries_that_passed_validation():
    dist = [{"at": 0, "type": "dist", "k": 2}] * 6
    bad = {**request(1, dist), "tokens": [1, 5000]}  # a token past vocab_size: OUT_OF_RANGE, its rows not counted
    items = decode_frame(frame([bad, request(2, dist)]), LIMITS).body.items  # 6 counted of max_prob_rows 8
    assert isinstance(items[0], DriverError) and items[0].code == ErrorCode.OUT_OF_RANGE
    assert not isinstance(items[1], DriverError)
    error = refused(frame([request(1, dist), request(2, dist)]))  # 12 counted
    assert error.code == ErrorCode.CAPACITY and "max_prob_rows" in error.message
