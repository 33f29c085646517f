"""The protocol page's worked example is what a driver on the tiny checkpoint actually answers."""

from __future__ import annotations

from docs_example import documented, same_but_rounding, worked_example


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
