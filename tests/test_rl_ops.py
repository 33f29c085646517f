"""Weight refits, sleep and wake on the reference engines, driven through the core as the server drives it:
after a refit every token equals a fresh engine's on the new weights; a refused load changes nothing."""

from __future__ import annotations

import shutil

import msgpack
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from trtllm_support import CoreHarness

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.model_facts import read_model_info
from pie_driver_trtllm.engines.reference import batched as batched_module
from pie_driver_trtllm.engines.reference.batched import BatchedReferenceEngine
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.modelgen import make_model
from pie_driver_trtllm.serving.backend import LocalBackend
from pie_driver_trtllm.wire.codec import (
    Fork,
    Forward,
    FrameRejected,
    LoadWeights,
    Release,
    Sleep,
    Truncate,
    Wake,
    decode_frame,
)
from pie_driver_trtllm.wire.errors import DriverError, ErrorCode

KINDS = {  # engine kind -> (lookahead tokens, the batched path's overlap forced on)
    "batched-lookahead": (4, False),
    "batched-overlap": (1, True),
    "per-context": (4, False),
}


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """Another random checkpoint of the same architecture: its greedy tokens differ from the first's."""
    return make_model(tmp_path_factory.mktemp("models") / "tiny-seed1", "tiny", seed=1)


def harness(path, kind="batched-lookahead"):
    lookahead, overlap = KINDS[kind]
    config = parse_config({"model": {"snapshot_dir": str(path)},
                           "driver": {"device": ["cpu"], "activation_dtype": "float32",
                                      "options": {"engine": "reference", "lookahead_tokens": lookahead}}})
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # its own: a refit changes it
    info = read_model_info(config)
    engine = ReferenceEngine(model, "cpu", info) if kind == "per-context" else \
        BatchedReferenceEngine(model, "cpu", info, slots=4, version="test", overlap=overlap)
    return CoreHarness(config, engine)


def full_forward(h, requests):
    """The whole forward reply map (results and weights_version)."""
    frame = msgpack.packb({"v": 1, "id": 1, "op": "forward", "requests": requests})
    body = decode_frame(frame, h.limits).body
    assert isinstance(body, Forward)
    return h.core.forward(body)


def greedy(context, tokens, start):
    return {"context": context, "tokens": tokens, "positions": list(range(start, start + len(tokens))),
            "samplers": [{"at": len(tokens) - 1, "type": "greedy"}]}


def decode(h, histories, steps):
    """`steps` decode steps of every context (each fed the token it was given); the replies' versions."""
    versions = set()
    for _ in range(steps):
        requests = [greedy(c, [h_[-1]], len(h_) - 1) for c, h_ in histories.items()]
        reply = full_forward(h, requests)
        versions.add(reply["weights_version"])
        for history, result in zip(histories.values(), reply["results"], strict=True):
            assert result["ok"], result
            history.append(result["outputs"][0]["token"])
    return versions


def start(h, prompts):
    """Prompt every context; each history ends with the token it was given."""
    histories = {}
    for context, prompt in prompts.items():
        (result,) = h.forward([greedy(context, prompt, 0)])
        histories[context] = list(prompt) + [result["outputs"][0]["token"]]
    return histories


PROMPTS = {1: [5, 6, 7], 2: [11, 12, 13, 14], 3: [40, 41, 42]}


@pytest.mark.parametrize("kind", list(KINDS))
def test_after_a_refit_every_token_equals_a_fresh_engine_on_the_new_weights(tiny_model, second_model, kind):
    old, fresh, unchanged = harness(tiny_model, kind), harness(second_model, kind), harness(tiny_model, kind)
    histories = start(old, PROMPTS)
    decode(old, histories, 2)
    engine = old.engine
    if kind == "batched-overlap":  # a step was run ahead on the old weights when the refit came
        assert engine.run_ahead.pending is not None and engine.run_ahead.pending.output is not None
    else:  # greedy tokens of the old weights wait in the lookahead buffer
        assert len(old.core.lookahead) == len(PROMPTS)

    assert old.core.load_weights(LoadWeights(str(second_model), 7)) == {"weights_version": 7}
    assert len(old.core.lookahead) == 0 and old.core.weights_version == 7

    # Contexts that existed before: replayed from history. The fresh engine gets each history whole.
    replayed = {c: list(h) for c, h in histories.items()}
    expected = {c: list(h) for c, h in histories.items()}
    for context, history in expected.items():
        history.append(fresh.forward([greedy(context, history, 0)])[0]["outputs"][0]["token"])
    assert decode(old, replayed, 1) == {7}
    assert replayed == expected
    # Old and new weights disagree here, so a token computed with old KV or old weights would show.
    old_next = {c: unchanged.forward([greedy(c, h, 0)])[0]["outputs"][0]["token"] for c, h in histories.items()}
    assert any(old_next[c] != expected[c][-1] for c in histories)
    assert decode(old, replayed, 4) == {7}
    decode(fresh, expected, 4)
    assert replayed == expected
    # A new context.
    new = {9: [3, 1, 4, 1, 5]}
    assert start(old, new) == start(fresh, new)


def test_a_truncated_checkpoint_is_refused_and_the_old_weights_stay(tiny_model, second_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(second_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    h, unchanged = harness(tiny_model), harness(tiny_model)
    histories = start(h, PROMPTS)
    decode(h, histories, 2)
    stored = {c: list(h.core.store.get(c)) for c in histories}
    with pytest.raises(DriverError) as failed:
        h.core.load_weights(LoadWeights(str(broken), 1))
    assert failed.value.code == "WEIGHTS_LOAD_FAILED" and failed.value.details == {"serving_previous": True}
    assert "truncated" in failed.value.message
    assert {c: h.core.store.get(c) for c in histories} == stored
    assert h.core.weights_health() == {"weights_version": 0, "weights": "serving", "asleep": 0}
    # Served on the old weights, tokens equal to an engine that never saw the load.
    expected = {c: list(hist) for c, hist in histories.items()}
    for context, history in expected.items():
        history.append(unchanged.forward([greedy(context, history, 0)])[0]["outputs"][0]["token"])
    assert decode(h, histories, 1) == {0}
    assert histories == expected


def _checkpoint(directory, model_path, change):
    """A copy of a checkpoint's tensors with `change(tensors)` applied, saved as one safetensors file."""
    tensors = dict(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict())
    change(tensors)
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def _junk(directory, content):
    directory.mkdir()
    (directory / "x.safetensors").write_bytes(content)
    return directory


BAD_CHECKPOINTS = {
    "missing": (lambda d, m: d / "nowhere", "does not exist"),
    "a file": (lambda d, m: m / "config.json", "is not a directory"),
    "no safetensors": (lambda d, m: (d / "empty").mkdir() or d / "empty", "no *.safetensors"),
    "wrong shape": (lambda d, m: _checkpoint(d / "c", m, lambda t: t.update(
        {"model.norm.weight": torch.ones(65)})), "has shape [65]"),
    "extra tensor": (lambda d, m: _checkpoint(d / "c", m, lambda t: t.update(
        {"model.extra.weight": torch.ones(2)})), "is not a parameter"),
    "missing tensor": (lambda d, m: _checkpoint(d / "c", m, lambda t: t.pop("lm_head.weight")),
                       "lacks 'lm_head.weight'"),
    "integer dtype": (lambda d, m: _checkpoint(d / "c", m, lambda t: t.update(
        {"model.norm.weight": torch.ones(64, dtype=torch.int32)})), "has dtype 'I32'"),
    "not a header": (lambda d, m: _junk(d / "junk", (1 << 40).to_bytes(8, "little")), "not a safetensors file"),
    "header not JSON": (lambda d, m: _junk(d / "junk", (4).to_bytes(8, "little") + b"{{{{"), "not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_gets_a_clear_error_and_changes_nothing(tiny_model, second_model, tmp_path, case):
    make_path, words = BAD_CHECKPOINTS[case]
    h = harness(tiny_model)
    histories = start(h, {1: [5, 6, 7]})
    with pytest.raises(DriverError) as failed:
        h.core.load_weights(LoadWeights(str(make_path(tmp_path, second_model)), 1))
    assert failed.value.code == "WEIGHTS_LOAD_FAILED" and failed.value.details == {"serving_previous": True}
    assert words in failed.value.message, failed.value.message
    assert h.engine.slot_index(1) is not None  # the cached KV stays: the weights did not change
    assert decode(h, histories, 1) == {0}


def test_a_swap_that_fails_part_way_serves_nothing_until_a_good_load(tiny_model, second_model, monkeypatch):
    h, fresh = harness(tiny_model), harness(second_model)
    histories = start(h, PROMPTS)

    real_apply = batched_module.apply

    def half_then_fail(model, staged):  # the device fails half way through the copy
        real_apply(model, dict(list(staged.items())[: len(staged) // 2]))
        raise RuntimeError("device lost")

    monkeypatch.setattr(batched_module, "apply", half_then_fail)
    with pytest.raises(DriverError) as failed:
        h.core.load_weights(LoadWeights(str(second_model), 1))
    assert failed.value.code == "WEIGHTS_LOAD_FAILED" and failed.value.details == {"serving_previous": False}
    assert h.core.weights_health() == {"weights_version": 0, "weights": "unavailable", "asleep": 0}
    assert LocalBackend(h.core, "cpu").health()["status"] == "degraded"
    with pytest.raises(DriverError) as again:  # a load refused before it changed anything: still nothing served
        h.core.load_weights(LoadWeights(str(second_model / "missing"), 1))
    assert again.value.code == "WEIGHTS_LOAD_FAILED" and again.value.details == {"serving_previous": False}
    lengths = {c: h.core.store.length(c) for c in histories}
    reply = full_forward(h, [greedy(c, [hist[-1]], len(hist) - 1) for c, hist in histories.items()]
                         + [greedy(9, [100_000], 0)])  # an entry that would be OUT_OF_RANGE: every entry fails alike
    assert [r["error"]["code"] for r in reply["results"]] == ["WEIGHTS_UNAVAILABLE"] * (len(histories) + 1)
    assert {c: h.core.store.length(c) for c in histories} == lengths  # nothing merged
    with pytest.raises(RuntimeError, match="serves no weights"):
        h.engine.step([])
    monkeypatch.setattr(batched_module, "apply", real_apply)
    assert h.core.load_weights(LoadWeights(str(second_model), 2)) == {"weights_version": 2}
    expected = {c: list(hist) for c, hist in histories.items()}
    for context, history in expected.items():
        history.append(fresh.forward([greedy(context, history, 0)])[0]["outputs"][0]["token"])
    assert decode(h, histories, 1) == {2}
    assert histories == expected


@pytest.mark.parametrize("kind", ["batched-lookahead", "per-context"])
def test_sleep_and_wake(tiny_model, second_model, kind):
    h, fresh = harness(tiny_model, kind), harness(second_model, kind)
    histories = start(h, PROMPTS)
    assert h.core.wake(Wake()) == {"asleep": 0}  # awake already: nothing to do
    assert h.core.sleep(Sleep(1)) == {"asleep": 1}
    if kind != "per-context":
        assert h.engine.decoder.cache == []  # the KV cache is gone, not just emptied
    reply = full_forward(h, [greedy(c, [hist[-1]], len(hist) - 1) for c, hist in histories.items()]
                         + [greedy(9, [100_000], 0)])  # an entry that would be OUT_OF_RANGE: every entry fails alike
    assert [r["error"]["code"] for r in reply["results"]] == ["ASLEEP"] * (len(histories) + 1)
    # Histories only: fork, truncate and release work while asleep.
    assert h.core.fork(Fork(1, 4, 3)) == {"length": 3}
    assert h.core.truncate(Truncate(2, 3)) == {"length": 3}
    histories[2] = histories[2][:3]
    assert h.core.release(Release((3,))) == {"released": 1}
    del histories[3]
    histories[4] = list(PROMPTS[1])
    # A load at level 1 is allowed; at level 2 the weights are in host memory: refused.
    assert h.core.load_weights(LoadWeights(str(second_model), 3)) == {"weights_version": 3}
    assert h.core.sleep(Sleep(2)) == {"asleep": 2}
    with pytest.raises(DriverError) as refused:
        h.core.load_weights(LoadWeights(str(tiny_model), 4))
    assert refused.value.code == "ASLEEP"
    assert h.core.weights_health() == {"weights_version": 3, "weights": "serving", "asleep": 2}
    assert h.core.wake(Wake()) == {"asleep": 0}
    expected = {c: list(hist) for c, hist in histories.items()}
    for context, history in expected.items():
        history.append(fresh.forward([greedy(context, history, 0)])[0]["outputs"][0]["token"])
    assert decode(h, histories, 1) == {3}
    assert histories == expected


def test_a_decode_step_reply_carries_the_weights_version(tiny_model, second_model):
    h = harness(tiny_model, "batched-overlap")
    histories = start(h, PROMPTS)
    h.core.load_weights(LoadWeights(str(second_model), 12))
    frame = msgpack.packb({"v": 1, "id": 1, "op": "forward",
                           "requests": [greedy(c, [hist[-1]], len(hist) - 1) for c, hist in histories.items()]})
    body = decode_frame(frame, h.limits).body
    plan = h.core.plan_decode(body)  # the fast path takes it
    assert plan is not None
    reply = h.core.finish_decode(plan, h.core.run_rows(plan.rows))
    assert reply.weights_version == 12 and reply.as_map()["weights_version"] == 12


def _frame(op, **fields):
    return msgpack.packb({"v": 1, "id": 5, "op": op, **fields})


@settings(deadline=None)
@given(version=st.one_of(st.integers(-(2**63), 2**64 - 1), st.text(max_size=3), st.floats(), st.none(),
                         st.booleans(), st.lists(st.integers(0, 3), max_size=2)))
@example(version=-1)
@example(version=2**64 - 1)
@example(version=True)
def test_load_weights_takes_a_u64_version_or_says_why_not(tiny_model, version):
    limits = harness_limits(tiny_model)
    frame = _frame("load_weights", path="/some/dir", version=version)
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        assert decode_frame(frame, limits).body == LoadWeights("/some/dir", version)
    else:
        with pytest.raises(FrameRejected) as rejected:
            decode_frame(frame, limits)
        assert rejected.value.error.code == "BAD_REQUEST" and rejected.value.request_id == 5
        assert "version" in rejected.value.error.message


@pytest.mark.parametrize("fields", [
    {"path": "", "version": 1}, {"path": 7, "version": 1}, {"version": 1}, {"path": "/d"},
    {"path": "/d\0x", "version": 1}, {"path": "x" * 5000, "version": 1}, {"path": "/d", "version": 1, "x": 1}])
def test_load_weights_fields_are_checked_at_the_edge(tiny_model, fields):
    with pytest.raises(FrameRejected) as rejected:
        decode_frame(_frame("load_weights", **fields), harness_limits(tiny_model))
    assert rejected.value.error.code == "BAD_REQUEST"


@pytest.mark.parametrize("level", [0, 3, "1", None, 1.0])
def test_sleep_level_is_one_or_two(tiny_model, level):
    with pytest.raises(FrameRejected) as rejected:
        decode_frame(_frame("sleep", level=level), harness_limits(tiny_model))
    assert rejected.value.error.code == "BAD_REQUEST"
    assert decode_frame(_frame("sleep", level=2), harness_limits(tiny_model)).body == Sleep(2)
    assert decode_frame(_frame("wake"), harness_limits(tiny_model)).body == Wake()


_LIMITS = {}


def harness_limits(model):
    if model not in _LIMITS:
        _LIMITS[model] = harness(model).limits
    return _LIMITS[model]


def _outcome(index, ok, serving_previous=True):
    from pie_driver_trtllm.client import ErrorInfo, Reply
    from pie_driver_trtllm.replicas.weights import Outcome

    reply = Reply(1, True, {"weights_version": 1}) if ok else \
        Reply(1, False, {}, ErrorInfo("WEIGHTS_LOAD_FAILED", "bad file", {"serving_previous": serving_previous}))
    return Outcome(index, f"cuda:{index}", reply)


def test_a_sleep_or_wake_one_replica_failed_names_it_and_leaves_the_driver_asleep():
    from pie_driver_trtllm.client import ErrorInfo, Reply
    from pie_driver_trtllm.replicas.weights import FleetWeights, Outcome

    fleet = FleetWeights()
    fleet.offered({"rl_ops": ["load_weights", "sleep", "wake"], "sleep_levels": [1]})

    def outcomes(ok_first: bool, second: Reply | None) -> list[Outcome]:
        first = Reply(1, True, {}) if ok_first else Reply(1, False, {}, ErrorInfo("ENGINE_ERROR", "boom", {}))
        return [Outcome(0, "cuda:0", first), Outcome(1, "cuda:1", second)]

    with pytest.raises(DriverError) as unsupported:  # a level the engine does not offer
        fleet.run("sleep", Sleep(2), lambda op, **fields: outcomes(True, Reply(1, True, {})))
    assert unsupported.value.code == ErrorCode.UNSUPPORTED and fleet.asleep == 0
    with pytest.raises(DriverError) as slept:
        fleet.run("sleep", Sleep(1), lambda op, **fields: outcomes(True, None))  # replica 1 is down
    assert slept.value.code == ErrorCode.ENGINE_ERROR and slept.value.details == {"replicas_failed": [1]}
    assert fleet.asleep == 1  # forwards get ASLEEP until a wake succeeds on all
    with pytest.raises(DriverError) as woken:
        fleet.run("wake", Wake(), lambda op, **fields: outcomes(False, Reply(1, True, {})))
    assert woken.value.details == {"replicas_failed": [0]} and fleet.health()["asleep"] == 1
    assert fleet.run("wake", Wake(), lambda op, **fields: outcomes(True, Reply(1, True, {}))) == {"asleep": 0}


def test_a_sleep_level_the_engine_does_not_offer_is_unsupported(tiny_model):
    h = harness(tiny_model)
    h.engine.sleep_levels = (1,)
    with pytest.raises(DriverError) as refused:
        h.core.sleep(Sleep(2))
    assert refused.value.code == ErrorCode.UNSUPPORTED and h.core.weights_health()["asleep"] == 0


def test_replicas_that_did_not_all_load_serve_no_weights_until_a_load_succeeds_on_all():
    from pie_driver_trtllm.replicas.weights import FleetWeights

    fleet = FleetWeights()
    load = LoadWeights("/w", 1)
    # Every replica refused before changing anything: the old version is still served everywhere.
    with pytest.raises(DriverError) as refused:
        fleet.loaded_by(load, [_outcome(0, False), _outcome(1, False)])
    assert refused.value.details == {"serving_previous": True, "replicas_failed": [0, 1]}
    assert fleet.refusal() is None and fleet.version == 0
    # One loaded and one did not: two versions would be served, so none is.
    with pytest.raises(DriverError) as split:
        fleet.loaded_by(load, [_outcome(0, True), _outcome(1, False)])
    assert split.value.details == {"serving_previous": False, "replicas_failed": [1]}
    assert "replica 1 (cuda:1)" in split.value.message
    refusal = fleet.refusal()
    assert refusal is not None and refusal.code == "WEIGHTS_UNAVAILABLE" and "[1]" in refusal.message
    assert fleet.health()["weights"] == "unavailable"
    # A replica that died meanwhile counts as failed.
    from pie_driver_trtllm.replicas.weights import Outcome

    with pytest.raises(DriverError):
        fleet.loaded_by(LoadWeights("/w", 2), [_outcome(0, True), Outcome(1, "cuda:1", None)])
    assert fleet.refusal() is not None
    assert fleet.loaded_by(LoadWeights("/w", 3), [_outcome(0, True), _outcome(1, True)]) == {"weights_version": 3}
    assert fleet.refusal() is None and fleet.health() == {"weights_version": 3, "weights": "serving", "asleep": 0}


@pytest.mark.parametrize("loads", [True, False])
def test_a_replica_restarted_after_a_load_gets_the_loaded_weights_before_it_serves(loads):
    from pie_driver_trtllm.replicas.pool import Replica
    from pie_driver_trtllm.replicas.weights import FleetWeights

    replica = Replica(0, "cuda:0", process=object(), alive=True)  # type: ignore[arg-type]
    fleet = FleetWeights()
    fleet.catch_up([replica], lambda r, op, **fields: pytest.fail("nothing to catch up at start-up"))
    fleet.loaded_by(LoadWeights("/w", 3), [_outcome(0, True)])
    fleet.asleep = 1
    calls = []

    def call(r, op, **fields):
        calls.append((op, fields))
        if not loads and op == "load_weights":
            raise DriverError(ErrorCode.WEIGHTS_LOAD_FAILED, "bad file", serving_previous=True)

    fleet.catch_up([replica], call)
    assert calls == []  # the same process: nothing to catch up
    replica.process = object()  # type: ignore[assignment]  # restarted, on its startup weights
    fleet.catch_up([replica], call)
    assert calls == [("load_weights", {"path": "/w", "version": 3}), ("sleep", {"level": 1})]
    assert (fleet.unavailable is None) == loads
