"""Runs through real driver subprocesses: the fast decode path, the client's `generate`, replicas."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

SAMPLERS = [{"type": "greedy"}, {"type": "top_p", "top_p": 0.9, "temperature": 0.8, "seed": 2**64 - 3}]


def generations(client, max_tokens):
    return [client.generate(context, [5 + context, 9, 40 + context], sampler, 40, max_tokens=max_tokens)
            for context, sampler in enumerate(SAMPLERS * 2)]


@pytest.mark.parametrize("engine_variant", ["reference", "trtllm-double-generate"])
def test_runs_over_the_socket_equal_the_one_token_loop(start_driver, engine_variant) -> None:
    driver = start_driver()
    client = driver.client()
    assert driver.handshake_line["caps"]["max_sampler_tokens"] == 64
    runs = generations(client, 16)
    assert [g.round_trips for g in runs] == [3] * 4 and all(g.stop == "max_tokens" for g in runs)
    loop = generations(client, 1)
    assert [g.tokens for g in runs] == [g.tokens for g in loop]


def test_a_replica_pair_routes_runs_unchanged(start_driver) -> None:
    pair = start_driver(driver={"device": ["cpu", "cpu"]})
    assert pair.handshake_line["caps"]["max_sampler_tokens"] == 64
    single = start_driver()
    assert [g.tokens for g in generations(pair.client(), 16)] == [g.tokens for g in generations(single.client(), 16)]
