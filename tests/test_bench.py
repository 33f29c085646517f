"""The benchmark workloads: the quick set runs on CPU and writes sound JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pie_driver_trtllm.benchmarks import codec
from pie_driver_trtllm.benchmarks.cli import WORKLOADS, run_benchmarks
from pie_driver_trtllm.wire.codec import ForwardItem, decode_frame

# Documented keys (pie_driver_trtllm/benchmarks/cli.py) that must hold positive finite numbers, as dotted paths.
NUMBERS: dict[str, list[str]] = {
    "transport": ["driver.p50_us", "driver.p99_us", "raw_zmq.p50_us", "raw_zmq.p99_us", "p50_ratio", "p99_ratio",
                  "frame_bytes", "thread.p50_ratio"],
    "lookahead": ["lookahead_16.engine_calls_per_token", "lookahead_16.tokens_per_s", "lookahead_16.step_ms",
                  "lookahead_1.engine_calls_per_token", "lookahead_1.tokens_per_s", "lookahead_1.step_ms",
                  "engine_calls_reduction", "tokens_per_s_ratio"],
    "history": ["short.history_tokens", "short.step_ms", "short.step_p50_ms", "long.history_tokens",
                "long.step_ms", "long.step_p50_ms", "ratio", "p50_ratio"],
    "codec": ["requests", "tokens", "frame_bytes", "mean_ms", "p50_ms", "p99_ms", "decode_mean_ms",
              "encode_reply_mean_ms", "host_encode_mean_ms"],
    "multitoken": ["rows.0.tokens_per_s", "rows.0.round_trips_per_token", "rows.1.tokens_per_s_ratio"],
    "rl": ["prompt_ratio", "fresh_prompt_ratio", "forks_tokens_per_s", "fresh_tokens_per_s", "tokens_per_s_ratio"],
    "driver_cost": ["batches.0.socket.median_us", "batches.0.stream.median_us", "batches.0.in_process.median_us"],
}
OVERHEAD_ROW = ["driver_tokens_per_s", "in_process_tokens_per_s", "ratio", "driver_step_ms", "in_process_step_ms"]


def dig(data: Any, path: str) -> Any:
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def positive_finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_set_writes_every_documented_number(tmp_path: Path) -> None:
    results = run_benchmarks(list(WORKLOADS), size="tiny", device="cpu", dtype="float32", out_dir=tmp_path,
                             quick=True)
    for name in WORKLOADS:
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data == json.loads(json.dumps(results[name]))
        assert data["workload"] == name and data["device"] == "cpu" and data["quick"] is True
        for path in NUMBERS.get(name, []):
            assert positive_finite(dig(data, path)), f"{name}: {path} = {dig(data, path)!r}"
    rows = json.loads((tmp_path / "overhead.json").read_text())["batches"]
    assert [r["batch"] for r in rows] == [1, 16, 64]
    for row in rows:
        for key in OVERHEAD_ROW:
            assert positive_finite(row[key]), f"overhead batch {row['batch']}: {key} = {row[key]!r}"
        assert math.isfinite(row["driver_cost_us"])  # a difference: may be negative within noise
    look = results["lookahead"]
    assert look["lookahead_1"]["engine_calls_per_token"] == pytest.approx(1 / look["contexts"])  # a call a step
    assert look["engine_calls_reduction"] == pytest.approx(16.0)  # one call per 16 steps of every context
    assert results["history"]["long"]["history_tokens"] > results["history"]["short"]["history_tokens"]
    assert (results["codec"]["requests"], results["codec"]["tokens"]) == (64, 8192)
    multi = results["multitoken"]
    assert multi["all_equal"] and len(multi["rows"]) == 2 * 2 * 2 * 2  # contexts x samplers x host times x runs
    assert {r["round_trips_per_token"] for r in multi["rows"] if r["max_tokens"] == 16} == {2 / 32}
    assert results["rl"]["prompt_ratio"] == 1.0  # each prompt computed once for all its samples


def test_codec_frame_holds_64_requests_and_8192_tokens() -> None:
    frame = msgpack.packb(codec.build_forward())
    request = codec.driver_side(frame)[0]
    items = request.body.items
    assert len(items) == 64 and all(isinstance(i, ForwardItem) for i in items)  # none refused by the edge checks
    assert sum(len(i.tokens) for i in items) == 8192
    assert all(len(i.samplers) == 1 and i.samplers[0].is_greedy for i in items)
    assert decode_frame(frame, codec.LIMITS).id == request.id


def test_plot_overhead_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from pie_driver_trtllm.benchmarks.plot import plot_overhead

    rows = [{"batch": b, "driver_tokens_per_s": 10.0 * b, "in_process_tokens_per_s": 11.0 * b, "ratio": 10 / 11}
            for b in (1, 16, 64)]
    source = tmp_path / "overhead.json"
    source.write_text(json.dumps({"engine": "reference", "size": "tiny", "device": "cpu", "dtype": "float32",
                                  "batches": rows}))
    png = plot_overhead(source, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_workload_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        run_benchmarks(["nope"], out_dir=tmp_path)


def test_socket_floor_times_every_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    from pie_driver_trtllm.benchmarks import socket_floor

    monkeypatch.setattr(socket_floor, "ROUND_TRIPS", 60)
    monkeypatch.setattr(socket_floor, "WARMUP", 10)
    for times in (socket_floor.zmq_round_trips(echo_spins=False), socket_floor.unix_round_trips()):
        assert len(times) == 60 and all(t > 0 for t in times)
        row = socket_floor.summary("x", times)
        assert row["p10_us"] <= row["median_us"] <= row["p90_us"]


def test_overhead_asks_the_driver_under_test_for_stage_times_only_if_it_knows_them(
        tiny_model: Path, tmp_path: Path) -> None:
    from pie_driver_trtllm.benchmarks.common import Bench
    from pie_driver_trtllm.benchmarks.overhead import _driver_takes

    bench = Bench(size="tiny", device="cpu", dtype="float32", out_dir=tmp_path)
    assert _driver_takes(bench, tiny_model, "stage_times", True)
    assert not _driver_takes(bench, tiny_model, "no_such_option", True)


@pytest.mark.slow
def test_overhead_reaches_the_driver_over_the_stream_socket_with_step_ops_when_asked(tmp_path: Path) -> None:
    from pie_driver_trtllm.benchmarks import overhead
    from pie_driver_trtllm.benchmarks.common import Bench

    bench = Bench(size="tiny", device="cpu", dtype="float32", out_dir=tmp_path, work_dir=tmp_path, quick=True)
    result = overhead.run(bench, overlaps=(False,), host_op="step", stream_socket=True)
    assert result["driver_options"] == {"stream_socket": True} and result["host_op"] == "step"
    assert {row["host_transport"] for row in result["batches"]} == {"stream"}
    assert all(positive_finite(row["driver_step_ms"]) for row in result["batches"])


@pytest.mark.parametrize("op", ["forward", "step"])
def test_the_timed_host_sends_decode_steps_as_step_ops_when_asked(op: str) -> None:
    import msgspec

    from pie_driver_trtllm.benchmarks.overhead import TimedHost

    sent: list[dict[str, Any]] = []
    reply = msgspec.msgpack.encode({"v": 1, "id": 1, "ok": True, "results": [{"ok": True, "outputs": [{"token": 4}]}]})

    class Socket:
        def poll(self, timeout: int) -> bool:
            return True

        def recv(self) -> bytes:
            return reply

    class Client:
        socket, busy_poll_s, timeout_s = Socket(), 0.0, 1.0

        def send_raw(self, frame: bytes) -> None:
            sent.append(msgspec.msgpack.decode(frame))

    host = TimedHost(Client(), op)  # type: ignore[arg-type]
    greedy = {"at": 0, "type": "greedy"}
    host.forward([{"context": 3, "tokens": [1, 2], "positions": [0, 1], "samplers": [{**greedy, "at": 1}]}])
    host.forward([{"context": 3, "tokens": [5], "positions": [2], "samplers": [greedy]}])
    assert sent[0]["op"] == "forward"  # a prompt is never a step
    if op == "step":
        assert {k: sent[1][k] for k in ("op", "contexts", "tokens", "positions", "sampler")} == {
            "op": "step", "contexts": [3], "tokens": [5], "positions": [2], "sampler": greedy}
    else:
        assert sent[1]["op"] == "forward"


@pytest.mark.slow
def test_cold_steps_reports_each_stage_with_and_without_rehearsal() -> None:
    from pie_driver_trtllm.benchmarks.cold_steps import STAGES, measure, report

    rows = measure(batches=(1,), reps=1, steps=5, evict_bytes=1 << 20)
    for prefix in ("plain", "rehearsed"):
        for stage in (*STAGES, "total"):
            assert positive_finite(rows[0][f"{prefix}_{stage}"]["median_us"]), (prefix, stage)
    assert "rehearsal" in report(rows)
