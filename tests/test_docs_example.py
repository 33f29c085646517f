"""The protocol page's worked example is what a driver on the tiny checkpoint actually answers."""

from __future__ import annotations

from docs_example import PROTOCOL, documented, same_but_rounding, worked_example


def test_the_worked_example_is_a_real_run(driver):
    client = driver.client()
    generated = worked_example(client)
    assert same_but_rounding(documented(), generated), (
        "docs/protocol.md's worked example differs from a run; if the change is meant, rewrite it with "
        "`PYTHONPATH=$PWD python tests/docs_example.py`:\n" + generated)


def test_floats_may_differ_only_in_their_last_digits():
    assert same_but_rounding('{"p": [0.014196818694472313]}', '{"p": [0.014196818694472319]}')
    assert not same_but_rounding('{"p": [0.0141968]}', '{"p": [0.0151968]}')
    assert not same_but_rounding('{"token": 352}', '{"token": 353}')


def test_the_runs_worked_example_is_a_real_run(driver):
    """Protocol §11's example: each request it shows, sent to a fresh driver, gets the reply it shows,
    and the one-token loop and the counters it states hold."""
    import json
    import math
    import re

    import msgpack

    text = PROTOCOL.read_text(encoding="utf-8").split("## 11. Protocol 1.1", 1)[1].split("**Worked example**", 1)[1]
    shown: list[tuple[str, dict]] = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        for kind, body in re.findall(r"^(request|reply)\s+(.*?)(?=^request|^reply|\Z)", block, re.S | re.M):
            shown.append((kind, json.loads(body)))
    assert [kind for kind, _ in shown] == ["request", "reply"] * 3

    def close(a, b):
        if isinstance(a, float) or isinstance(b, float):
            return math.isclose(a, b, rel_tol=1e-5)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(close(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
        return a == b

    client = driver.client()
    for (_, request), (_, reply) in zip(shown[::2], shown[1::2], strict=True):
        client.send_raw(msgpack.packb(request))
        assert client.socket.poll(60_000)
        got = msgpack.unpackb(client.socket.recv())
        assert close(got, reply), (request["id"], got)
        if request["id"] == 21:
            stats = client.call("stats").result
            assert (stats["requests"], stats["engine_calls"], stats["tokens_out"]) == (2, 2, 8)
    loop = driver.client()  # on another context: the run's tokens, one forward each, seeds 5 to 8
    history, made = [1, 15, 99, 475, 352], []
    for seed in (5, 6, 7, 8):
        fed = history + made
        (result,) = loop.forward([{"context": 2, "tokens": fed, "positions": list(range(len(fed))),
                                   "samplers": [{"at": len(fed) - 1, "type": "top_k", "top_k": 40, "seed": seed}]}])
        made.append(result["outputs"][0]["token"])
    assert made == [138, 352, 162, 335]
