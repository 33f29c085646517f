"""End-to-end: a real driver subprocess on the tiny model, driven through the ZeroMQ socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
import torch
from conftest import ENGINE_VARIANTS, write_config
from transformers import AutoModelForCausalLM

import pie_driver_trtllm
from pie_driver_trtllm.client import DriverClient, DriverFailed, spawn

pytestmark = pytest.mark.slow


@pytest.fixture(params=list(ENGINE_VARIANTS))
def engine_variant(request: pytest.FixtureRequest) -> str:
    """Every test here runs once per engine variant (the TensorRT-LLM ones on the test double)."""
    return request.param

PROMPTS = [[3 + 7 * c + i for i in range(4 + c)] for c in range(8)]


def greedy(sampler_at: int) -> dict:
    return {"at": sampler_at, "type": "greedy"}


def decode(client: DriverClient, prompts: list[list[int]], steps: int, first_context: int = 1) -> list[list[int]]:
    """Run a greedy decode of every prompt in lock-step batches, as a host would."""
    histories = [list(p) for p in prompts]
    requests = [{"context": first_context + i, "tokens": list(p), "positions": list(range(len(p))),
                 "samplers": [greedy(len(p) - 1)]} for i, p in enumerate(prompts)]
    generated: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        results = client.forward(requests)
        requests = []
        for i, result in enumerate(results):
            assert result["ok"], result
            token = result["outputs"][0]["token"]
            generated[i].append(token)
            requests.append({"context": first_context + i, "tokens": [token],
                             "positions": [len(histories[i])], "samplers": [greedy(0)]})
            histories[i].append(token)
    return generated


def transformers_greedy(model_dir: Path, prompt: list[int], steps: int) -> list[int]:
    """Ground truth: full recompute with transformers, no cache, argmax of the last position."""
    model = _hf_model(model_dir)
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(prompt):]


_MODELS: dict[Path, object] = {}


def _hf_model(model_dir: Path):
    if model_dir not in _MODELS:
        _MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _MODELS[model_dir]


def test_greedy_tokens_equal_transformers(start_driver, tiny_model):
    client = start_driver().client()
    got = decode(client, PROMPTS, steps=32)
    expected = [transformers_greedy(tiny_model, p, 32) for p in PROMPTS]
    assert got == expected


def test_lookahead_same_tokens_and_fewer_engine_calls(start_driver):
    on = start_driver(lookahead_tokens=16).client()
    off = start_driver(lookahead_tokens=1).client()
    prompt = [PROMPTS[0]]
    tokens_on = decode(on, prompt, steps=64)
    tokens_off = decode(off, prompt, steps=64)
    assert tokens_on == tokens_off
    calls_on = on.call("stats")["engine_calls"]
    calls_off = off.call("stats")["engine_calls"]
    assert calls_off == 64
    assert calls_on * 4 <= calls_off, (calls_on, calls_off)
    assert on.call("stats")["lookahead_hits"] == 64 - calls_on


def test_rollback_inside_lookahead_window(driver, tiny_model):
    client = driver.client()
    prompt = PROMPTS[1]
    first = decode(client, [prompt], steps=6)[0]  # buffer filled at step 1, served since
    history = prompt + first[:5]
    # Replace the token at an earlier position with a different one: the history is cut there.
    position = len(prompt) + 2
    other = (history[position] + 1) % 512
    reply = client.forward([{"context": 1, "tokens": [other], "positions": [position], "samplers": [greedy(0)]}])
    expected = transformers_greedy(tiny_model, history[:position] + [other], 1)[0]
    assert reply[0]["outputs"][0]["token"] == expected
    # Keep decoding from the rolled-back history: still equal to ground truth.
    rolled = history[:position] + [other, expected]
    for _ in range(4):
        reply = client.forward([{"context": 1, "tokens": [rolled[-1]], "positions": [len(rolled) - 1],
                                 "samplers": [greedy(0)]}])
        rolled.append(reply[0]["outputs"][0]["token"])
    base = history[:position] + [other]
    assert rolled[len(base):] == transformers_greedy(tiny_model, base, 5)


def test_gap_leaves_history_unchanged(driver):
    client = driver.client()
    client.forward([{"context": 7, "tokens": [5, 6, 7], "positions": [0, 1, 2]}])
    result = client.forward([{"context": 7, "tokens": [9], "positions": [5], "samplers": [greedy(0)]}])[0]
    assert not result["ok"]
    assert result["error"]["code"] == "HISTORY_GAP"
    assert result["error"]["known_length"] == 3
    # Resending from known_length works and proves the history still has exactly 3 tokens.
    assert client.call("fork", src=7, dst=8)["length"] == 3
    fresh = client.forward([{"context": 99, "tokens": [1], "positions": [2]}])[0]
    assert fresh["error"]["code"] == "HISTORY_GAP" and fresh["error"]["known_length"] == 0


def test_fork_and_release(driver, tiny_model):
    client = driver.client()
    prompt = PROMPTS[2]
    client.forward([{"context": 1, "tokens": prompt, "positions": list(range(len(prompt)))}])
    assert client.call("fork", src=1, dst=2, length=3)["length"] == 3
    assert client.call("fork", src=1, dst=3)["length"] == len(prompt)
    child = client.forward([{"context": 2, "tokens": [prompt[3]], "positions": [3], "samplers": [greedy(0)]}])
    assert child[0]["outputs"][0]["token"] == transformers_greedy(tiny_model, prompt[:4], 1)[0]
    parent = client.forward([{"context": 1, "tokens": [prompt[-1]], "positions": [len(prompt) - 1],
                              "samplers": [greedy(0)]}])
    assert parent[0]["outputs"][0]["token"] == transformers_greedy(tiny_model, prompt, 1)[0]
    bad = client.call("fork", check=False, src=1, dst=4, length=len(prompt) + 1)
    assert bad.error.code == "OUT_OF_RANGE"
    assert client.call("fork", check=False, src=42, dst=4).error.code == "UNKNOWN_CONTEXT"
    assert client.call("fork", check=False, src=1, dst=1).error.code == "BAD_REQUEST"
    assert client.call("release", contexts=[1, 2, 3, 77])["released"] == 3
    stats = client.call("stats")
    assert stats["contexts"] == 0
    engine = client.call("handshake")["engine"]
    batched = engine["execution_mode"] == "batched"  # the reference engine's batched path
    # The reference engine's counters come through the guard and the socket; it runs ahead on CUDA only.
    # Context 2 computed its 4 tokens, then context 1 copied them and computed the rest: the prompt once.
    # TensorRT-LLM reuses whole 32-token blocks only, so there both contexts compute this short prompt.
    computed = len(prompt) if engine["kind"] == "reference" else 4 + len(prompt)
    assert stats["engine"] == ({"overlap_launches": 0, "overlap_hits": 0} if batched else {}) | (
        {"prompt_tokens_computed": computed})
    after = client.forward([{"context": 1, "tokens": [1], "positions": [4]}])[0]
    assert after["error"]["code"] == "HISTORY_GAP" and after["error"]["known_length"] == 0


def test_truncate(driver):
    client = driver.client()
    client.forward([{"context": 1, "tokens": [4, 5, 6, 7], "positions": [0, 1, 2, 3]}])
    assert client.call("truncate", context=1, length=2)["length"] == 2
    assert client.call("truncate", check=False, context=1, length=3).error.code == "OUT_OF_RANGE"
    assert client.call("truncate", check=False, context=5, length=0).error.code == "UNKNOWN_CONTEXT"
    gap = client.forward([{"context": 1, "tokens": [1], "positions": [3]}])[0]
    assert gap["error"]["known_length"] == 2


def sampled(at: int, seed: int | None) -> dict:
    sampler = {"at": at, "type": "top_k_top_p", "temperature": 1.5, "top_k": 200, "top_p": 0.99}
    if seed is not None:
        sampler["seed"] = seed
    return sampler


def test_seeded_sampling_reproducible_and_unseeded_fresh(driver):
    client = driver.client()
    prompt = PROMPTS[3]

    def draw(context: int, seed: int | None) -> int:
        return client.forward([{"context": context, "tokens": prompt, "positions": list(range(len(prompt))),
                                "samplers": [sampled(len(prompt) - 1, seed)]}])[0]["outputs"][0]["token"]

    seeded = {draw(c, 1234) for c in range(1, 6)}
    assert len(seeded) == 1
    different_seeds = {draw(10 + s, s) for s in range(12)}
    assert len(different_seeds) > 1
    unseeded = {draw(30 + i, None) for i in range(12)}
    assert len(unseeded) > 1  # fresh randomness every step, not one fixed seed


def test_dist_matches_transformers(driver, tiny_model):
    client = driver.client()
    prompt = PROMPTS[4]
    result = client.forward([{"context": 1, "tokens": prompt, "positions": list(range(len(prompt))),
                              "samplers": [{"at": len(prompt) - 1, "type": "dist", "k": 5},
                                           greedy(len(prompt) - 1)]}])[0]
    if "dist" not in driver.handshake_line["caps"]["samplers"]:
        assert result["error"]["code"] == "UNSUPPORTED" and "dist" in result["error"]["message"]
        return
    assert result["ok"], result
    dist, token = result["outputs"]
    with torch.inference_mode():
        logits = _hf_model(tiny_model)(torch.tensor([prompt])).logits[0]
    top = torch.topk(torch.softmax(logits[-1], -1), 5)
    assert dist["dist"][0] == top.indices.tolist()
    assert dist["dist"][1] == pytest.approx(top.values.tolist(), rel=1e-4)
    assert token["token"] == top.indices[0].item()


def test_logprobs_match_transformers_or_are_refused(driver, tiny_model, engine_variant):
    client = driver.client()
    prompt = PROMPTS[4]
    sampler = {"at": 1, "type": "logprobs", "token_ids": [7, 9], "temperature": 2.0}
    result = client.forward([{"context": 1, "tokens": prompt, "positions": list(range(len(prompt))),
                              "samplers": [sampler]}])[0]
    if "logprobs" not in driver.handshake_line["caps"]["samplers"]:
        assert result["error"]["code"] == "UNSUPPORTED" and "logprobs" in result["error"]["message"]
        return
    with torch.inference_mode():
        logits = _hf_model(tiny_model)(torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits[1] / 2.0, -1)[[7, 9]].tolist()
    assert result["outputs"][0]["logprobs"] == pytest.approx(expected, abs=1e-4)


def test_bad_request_fails_alone(driver):
    client = driver.client()
    results = client.forward([
        {"context": 1, "tokens": [5, 6], "positions": [0, 1], "samplers": [greedy(1)]},
        {"context": 2, "tokens": [100000], "positions": [0], "samplers": [greedy(0)]},
        {"context": 3, "tokens": [5], "positions": [0], "samplers": [{"at": 0, "type": "top_k"}]},
        {"context": True, "tokens": [5], "positions": [0]},
        {"context": 4, "tokens": [5, 6], "positions": [0, 1], "samplers": [greedy(1)]},
    ])
    assert [r["ok"] for r in results] == [True, False, False, False, True]
    assert [r["error"]["code"] for r in results if not r["ok"]] == ["OUT_OF_RANGE", "BAD_REQUEST", "BAD_REQUEST"]
    assert results[0]["outputs"] == results[4]["outputs"]


MALFORMED = [
    (b"\xc1\x00\xffrandom", "BAD_FRAME", None),
    (os.urandom(64), "BAD_FRAME", None),
    (msgpack.packb([1, 2, 3]), "BAD_FRAME", None),
    (msgpack.packb("text"), "BAD_FRAME", None),
    (msgpack.packb({"v": 1, "op": "health"}), "BAD_REQUEST", None),
    (msgpack.packb({"v": 1, "id": True, "op": "health"}), "BAD_REQUEST", None),
    (msgpack.packb({"v": 1, "id": -3, "op": "health"}), "BAD_REQUEST", None),
    (msgpack.packb({"v": 2, "id": 5, "op": "health"}), "VERSION", 5),
    (msgpack.packb({"id": 6, "op": "health"}), "VERSION", 6),
    (msgpack.packb({"v": 1, "id": 7, "op": "jump"}), "UNKNOWN_OP", 7),
    (msgpack.packb({"v": 1, "id": 8, "op": "forward"}), "BAD_REQUEST", 8),
    (msgpack.packb({"v": 1, "id": 9, "op": "forward", "requests": {"a": 1}}), "BAD_REQUEST", 9),
]


def test_malformed_frames_get_errors_and_driver_keeps_serving(driver):
    client = driver.client()
    counts: dict[str, int] = {}
    for frame, code, request_id in MALFORMED:
        client.send_raw(frame)
        reply = client.recv(5)
        assert not reply.ok and reply.error.code == code, (frame, reply)
        assert reply.id == request_id
        counts[code] = counts.get(code, 0) + 1
        assert client.call("health")["status"] == "ok"
    assert client.call("stats")["errors"] == counts
    assert decode(client, [PROMPTS[0]], steps=2)[0]  # and it still generates


def _forward_frame(n_tokens: int) -> bytes:
    return msgpack.packb({"v": 1, "id": 1, "op": "forward",
                          "requests": [{"context": 1, "tokens": [1] * n_tokens, "positions": list(range(n_tokens))}]})


def test_oversize_frame_is_refused(start_driver):
    driver = start_driver(max_frame_bytes=4096)
    client = driver.client()
    over_limit = _forward_frame(2000)
    assert 4096 < len(over_limit) < 4 * 4096
    client.send_raw(over_limit)
    reply = client.recv(5)
    assert reply.error.code == "BAD_FRAME" and "limit" in reply.error.message
    assert client.call("health")["status"] == "ok"
    # Past the hard cap ZeroMQ drops that connection; the driver itself keeps serving everyone else.
    past_cap = driver.client()
    past_cap.send_raw(_forward_frame(8000))
    with pytest.raises(TimeoutError):
        past_cap.recv(1)
    assert driver.client().call("health")["status"] == "ok"


# A forward whose last token is 509 makes the test-only fault wrapper hold the engine for a while,
# so "a long forward" does not depend on how fast this machine is.
SLOW_FORWARD = {"PIE_DRIVER_FAULTS": "hang_on_token:509,hang_s:1.5"}


def test_health_answers_fast_while_a_long_forward_runs(start_driver):
    driver = start_driver(env=SLOW_FORWARD)
    client = driver.client()
    requests = [{"context": c, "tokens": [(c + i) % 500 for i in range(59)] + [509], "positions": list(range(60)),
                 "samplers": [greedy(59)]} for c in range(8)]
    forward_id = client.send("forward", requests=requests)
    time.sleep(0.3)  # the forward is now running on the worker
    started = time.monotonic()
    health_id = client.send("health")
    first = client.recv(30)
    latency = time.monotonic() - started
    assert first.id == health_id, "the forward finished before health could be asked; make it longer"
    assert latency < 0.1, latency
    assert first["replicas"][0]["inflight"] == 1
    second = client.recv(60)
    assert second.id == forward_id and all(r["ok"] for r in second["results"])


def test_sigterm_exits_zero_and_removes_socket(driver):
    path = Path(driver.endpoint.removeprefix("ipc://"))
    assert path.exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    driver.process.send_signal(signal.SIGTERM)
    assert driver.process.wait(10) == 0
    assert not path.exists() and not path.parent.exists()


def test_shutdown_op_replies_then_exits(driver):
    client = driver.client()
    assert client.call("shutdown").ok
    assert driver.process.wait(10) == 0


def test_driver_exits_when_parent_dies(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pie_driver_trtllm.client import spawn
        driver = spawn({str(config)!r})
        print(driver.process.pid, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child_pid):
            time.sleep(0.1)
        assert not _alive(child_pid)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_tensorrt_llm_engine_missing_fails_fast_with_one_line(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, engine="tensorrt_llm")
    started = time.monotonic()
    with pytest.raises(DriverFailed) as failure:
        spawn(config, env={"PYTHONPATH": ""})
    assert time.monotonic() - started < 5
    message = str(failure.value)
    assert "tensorrt_llm" in message and "pip install" in message


def test_frames_during_shutdown_get_shutting_down(start_driver):
    driver = start_driver(env=SLOW_FORWARD)
    client = driver.client()
    requests = [{"context": c, "tokens": [*range(1, 60), 509], "positions": list(range(60)),
                 "samplers": [greedy(59)]} for c in range(4)]
    running = client.send("forward", requests=requests)
    queued = client.send("forward", requests=requests[:1])
    time.sleep(0.2)
    stop = client.send("shutdown")
    late = client.send("health")
    replies = {reply.id: reply for reply in (client.recv(60) for _ in range(4))}
    assert replies[stop].ok
    assert replies[running].ok and all(r["ok"] for r in replies[running]["results"])
    assert replies[queued].error.code == "SHUTTING_DOWN"
    assert replies[late].error.code == "SHUTTING_DOWN"
    assert driver.process.wait(10) == 0


def test_deeply_nested_frame_does_not_stop_the_driver(driver):
    client = driver.client()
    client.send_raw(b"\x84\xa1v\x01\xa2id\x03\xa2op\xa6health\xa1x" + b"\x91" * 100000 + b"\x01")
    reply = client.recv(10)
    assert reply.error.code == "BAD_FRAME"
    assert client.call("health")["status"] == "ok"


def test_tcp_wildcard_port_is_resolved(tmp_path, tiny_model):
    process = spawn(write_config(tmp_path, tiny_model), endpoint="tcp://127.0.0.1:*")
    try:
        assert process.endpoint.startswith("tcp://127.0.0.1:") and not process.endpoint.endswith("*")
        assert process.client().call("health")["status"] == "ok"
    finally:
        process.stop()
    with pytest.raises(DriverFailed, match="loopback"):
        spawn(write_config(tmp_path, tiny_model), endpoint="tcp://0.0.0.0:5555")


def test_same_context_twice_in_one_forward_equals_two_forwards(start_driver, tiny_model):
    one, two = start_driver().client(), start_driver().client()
    prompt = PROMPTS[5]
    first = {"context": 1, "tokens": prompt, "positions": list(range(len(prompt))),
             "samplers": [greedy(len(prompt) - 1), greedy(2)]}
    second = {"context": 1, "tokens": [9, 9], "positions": [2, 3], "samplers": [greedy(1)]}  # rolls back
    together = one.forward([first, second])
    apart = two.forward([first]) + two.forward([second])
    assert together == apart
    assert together[0]["outputs"][1]["token"] == transformers_greedy(tiny_model, prompt[:3], 1)[0]
    assert one.call("stats")["requests"] == 2


@pytest.mark.slow
def test_the_handshake_reports_each_option_where_the_protocol_says(start_driver, tiny_model, engine_variant):
    options = {"max_concurrent_requests": 7, "max_batched_tokens": 300, "max_sampler_rows": 55,
               "max_output_elements": 999, "max_logprob_labels": 5, "lookahead_tokens": 3,
               "virtual_total_pages": 1234, "virtual_kv_page_size": 48, "max_seq_len": 96}
    if engine_variant != "trtllm-double-pyexecutor":  # the executor needs whole histories
        options["max_history_tokens"] = 80
    hello = start_driver(**options).client().call("handshake").result
    caps, model = hello["caps"], hello["model"]
    config = json.loads((tiny_model / "config.json").read_text())
    assert hello["protocol"] == 1 and hello["protocol_version"] == [1, 2]
    assert hello["driver"] == {"name": "pie-driver-trtllm", "version": pie_driver_trtllm.__version__}
    assert model["vocab_size"] == config["vocab_size"] and model["eos_token_id"] == config["eos_token_id"]
    assert model["max_model_len"] == caps["max_model_len"] == min(96, options.get("max_history_tokens", 96))
    assert {key: caps[key] for key in ("max_forward_requests", "max_forward_tokens", "max_logit_rows",
                                       "max_prob_rows", "max_sampler_rows", "max_output_elements",
                                       "max_logprob_labels", "lookahead_tokens", "total_pages", "max_page_refs",
                                       "kv_page_size")} == {
        "max_forward_requests": 7, "max_forward_tokens": 300, "max_logit_rows": 300, "max_prob_rows": 300,
        "max_sampler_rows": 55, "max_output_elements": 999, "max_logprob_labels": 5, "lookahead_tokens": 3,
        "total_pages": 1234, "max_page_refs": 1234, "kv_page_size": 48}
    assert (caps["swap_pool_size"], caps["max_custom_mask_bytes"], caps["max_sampler_tokens"]) == (0, 0, 64)
    assert (caps["supports_user_attention_mask"], caps["supports_adapters"]) == (False, False)
    assert (caps["tensor_parallel_size"], caps["replicas"], caps["devices"]) == (1, 1, ["cpu"])
    assert caps["activation_dtype"] == "float32" and caps["samplers"] == sorted(caps["samplers"])
    assert set(caps["samplers"]) == {"greedy", "multinomial", "top_k", "top_p", "min_p", "top_k_top_p", "dist",
                                     "logprobs"}


def test_a_history_evicted_by_the_total_token_bound_is_a_gap_from_0(start_driver):
    client = start_driver(max_total_history_tokens=10).client()
    for context in (1, 2):  # 6 tokens each: the second passes the bound of 10, and context 1 goes
        assert client.forward([{"context": context, "tokens": [3, 4, 5, 6, 7, 8], "positions": list(range(6))}])
    (gap,) = client.forward([{"context": 1, "tokens": [9], "positions": [6]}])
    assert gap["error"]["code"] == "HISTORY_GAP" and gap["error"]["known_length"] == 0
    stats = client.call("stats")
    assert stats["evictions"] == 1 and stats["contexts"] == 1


def test_a_greedy_run_fills_the_lookahead_buffer(start_driver):
    client = start_driver(lookahead_tokens=1).client()  # so a hit can come only from the run
    (run,) = client.forward([{"context": 1, "tokens": [1, 15, 99], "positions": [0, 1, 2],
                              "samplers": [{"at": 2, "type": "greedy", "max_tokens": 4}]}])
    tokens = run["outputs"][0]["tokens"]
    before = client.call("stats")
    (fed,) = client.forward([{"context": 1, "tokens": [tokens[0]], "positions": [3],
                              "samplers": [{"at": 0, "type": "greedy"}]}])
    after = client.call("stats")
    assert fed["outputs"][0]["token"] == tokens[1]
    assert after["lookahead_hits"] == before["lookahead_hits"] + 1 and after["engine_calls"] == before["engine_calls"]


def test_driver_random_seed_makes_unseeded_draws_repeatable(start_driver):
    def draws(seed: int) -> list[int]:
        client = start_driver(driver={"random_seed": seed}).client()
        request = {"context": 1, "tokens": [1, 15, 99], "positions": [0, 1, 2],
                   "samplers": [{"at": 2, "type": "multinomial", "temperature": 5.0}] * 8}
        return [out["token"] for out in client.forward([request])[0]["outputs"]]

    first = draws(11)
    assert draws(11) == first and draws(12) != first


def test_each_replica_draws_from_its_own_seed(tiny_model, tmp_path):
    from pie_driver_trtllm.config import SEED_MAX, load_config
    from pie_driver_trtllm.serving.driver import select_replica

    seeds = []
    for index in range(3):
        config = load_config(str(write_config(tmp_path, tiny_model, driver={"device": ["cpu"] * 3,
                                                                           "random_seed": SEED_MAX - 1})))
        select_replica(config, index)
        seeds.append(config.driver.random_seed)
    assert seeds == [SEED_MAX - 1, SEED_MAX, 0]  # replica 0 draws as one device does
