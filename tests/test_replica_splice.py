"""The router's one-pass forward, without replica processes: what it takes, how it groups requests by
replica and back, and that it answers exactly as the general path does."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from pie_driver_trtllm.benchmarks import router_cost
from pie_driver_trtllm.replicas.splice import Spliced, Split, decode_spliced, encode_share, token_bound
from pie_driver_trtllm.wire.codec import Limits, decode_frame

LIMITS = Limits(vocab_size=1000, max_model_len=512, max_forward_requests=8, max_forward_tokens=64,
                max_logprob_labels=4, max_frame_bytes=1 << 20)


def frame(requests: list[dict], **header) -> bytes:
    return msgspec.msgpack.encode({"v": 1, "id": 9, "op": "forward", "requests": requests, **header})


def request(context: int, tokens: list[int], **fields) -> dict:
    return {"context": context, "tokens": tokens, "positions": list(range(len(tokens))), **fields}


def test_a_well_formed_forward_is_taken_and_re_packed_as_the_host_wrote_it():
    sampler = [{"at": 1, "type": "dist", "k": 3, "temperature": 0.5}]
    requests = [request(7, [1, 2], samplers=sampler), request(2**40, [999]), request(3, [5])]
    taken = decode_spliced(frame(requests), LIMITS)
    assert taken is not None and taken.id == 9 and isinstance(taken.body, Spliced)
    light = taken.body.requests
    assert [r.context for r in light] == [7, 2**40, 3] and taken.body.tokens >= 4
    share = msgspec.msgpack.decode(encode_share(5, [light[0], light[2]]))
    assert share == {"v": 1, "id": 5, "op": "forward", "requests": [requests[0], requests[2]]}
    assert len(encode_share(5, light)) <= len(frame(requests))
    # What the replica decodes from its share equals what the general path makes of the host's requests.
    whole = decode_frame(frame(requests), LIMITS).body.items
    assert decode_frame(encode_share(5, light), LIMITS).body.items == whole == taken.body.items


def test_anything_else_is_left_to_the_general_path():
    good = [request(1, [1, 2])]
    for rejected in (frame(good, v=2), frame(good, id=-1), frame(good, op="fork"), frame(good, extra=1),
                     frame([{**good[0], "extra": 1}]), frame([{"tokens": [1], "positions": [0]}]),
                     frame([request(c, [1]) for c in range(9)]),            # over max_forward_requests
                     frame([request(1, list(range(65)))]),                  # over max_forward_tokens
                     msgspec.msgpack.encode({"v": 1, "id": 1, "op": "health"}), b"\xc1", b""):
        assert decode_spliced(rejected, LIMITS) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2**32 - 1), max_size=20), max_size=12))
def test_the_token_bound_is_never_below_the_tokens(token_lists):
    requests = [request(i, tokens) for i, tokens in enumerate(token_lists)]
    taken = decode_spliced(frame(requests), Limits(2**32, 2**32, 16, 1000, 4, 1 << 20))
    assert taken is not None
    assert token_bound(taken.body.requests) == taken.body.tokens >= sum(map(len, token_lists))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n - 1), max_size=40))))
def test_grouping_by_replica_keeps_request_order_and_puts_results_back(case):
    replicas, places = case
    split = Split.of(places, replicas)
    requests = [f"r{i}" for i in range(len(places))]
    shares = split.shares(requests)
    assert len(shares) == replicas
    for replica, share in enumerate(shares):
        assert share == [r for r, p in zip(requests, places, strict=True) if p == replica]
        assert split.slots(replica) == [i for i, p in enumerate(places) if p == replica]
    answers = [f"answer to {r}" for share in shares for r in share]
    assert split.in_request_order(answers) == [f"answer to {r}" for r in requests]


def test_both_paths_give_the_same_reply():
    """The benchmark's router over stand-in replicas: the one-pass and the general path answer each
    frame with the same bytes."""
    for contexts in (1, 5, 64):
        replies = []
        for spliced in (True, False):
            router = router_cost._Router(2)
            router_cost.fill_replies(router, contexts, 4)
            decode = router.decode_frame if spliced else decode_frame
            replies.append([router_cost.forward(router, decode, router_cost.frame(contexts, i + 1, 3 + i))
                            for i in range(4)])
        assert replies[0] == replies[1]


def test_the_router_cost_benchmark_runs():
    result = router_cost.measure(contexts=8, forwards=5, spliced=True)
    assert result["median_us"] > 0 and result["forwards"] == 5
