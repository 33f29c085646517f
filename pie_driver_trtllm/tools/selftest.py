"""`pie-driver-trtllm selftest`: the protocol scenarios against a driver subprocess, as a PASS/FAIL table.

Built for the first run on a GPU machine with the real TensorRT-LLM: one command that says what works,
plus a JSON report to attach to a bug report. Greedy tokens are checked against the reference engine in
the same dtype with a stated near-tie rule (docs/tensorrt-llm.md, "Validation on a GPU machine").
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pie_driver_trtllm.client import DriverClient, DriverProcess, spawn
from pie_driver_trtllm.modelgen import make_model

# A TensorRT-LLM greedy token that is the reference's second choice passes when the reference's top-2
# logit gap is below this: bf16 rounding moves a small model's logits by a few hundredths.
NEAR_TIE_LOGIT_GAP = 0.25
PROMPTS = [[5 + 11 * c + i for i in range(6 + 3 * c)] for c in range(4)]
STEPS = 16


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


def write_config(path: Path, model: Path, device: str, options: dict[str, Any]) -> Path:
    lines = ["[model]", f"snapshot_dir = {_toml(str(model))}", "", "[driver]", f"device = {_toml([device])}",
             'activation_dtype = "bfloat16"', "", "[driver.options]"]
    lines += [f"{k} = {_toml(v)}" for k, v in options.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def greedy(at: int) -> dict[str, Any]:
    return {"at": at, "type": "greedy"}


def whole(context: int, tokens: list[int], samplers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"context": context, "tokens": tokens, "positions": list(range(len(tokens))), "samplers": samplers}


def decode(client: DriverClient, contexts: dict[int, list[int]], steps: int) -> dict[int, list[int]]:
    """Greedy decode of every context in lock-step forwards, as a host does."""
    lengths = {c: len(p) for c, p in contexts.items()}
    requests = [whole(c, p, [greedy(len(p) - 1)]) for c, p in contexts.items()]
    out: dict[int, list[int]] = {c: [] for c in contexts}
    for _ in range(steps):
        results = client.forward(requests)
        requests = []
        for context, result in zip(contexts, results, strict=True):
            if not result["ok"]:
                raise AssertionError(f"context {context}: {result['error']}")
            token = result["outputs"][0]["token"]
            out[context].append(token)
            requests.append({"context": context, "tokens": [token], "positions": [lengths[context]],
                             "samplers": [greedy(0)]})
            lengths[context] += 1
    return out


class Selftest:
    def __init__(self, engine: DriverProcess, reference: DriverProcess) -> None:
        self.engine = engine
        self.client = engine.client(timeout_s=300)
        self.reference = reference.client(timeout_s=300)
        self.decoded: dict[int, list[int]] = {}

    def scenarios(self) -> list[tuple[str, Callable[[], tuple[str, dict[str, Any]]]]]:
        return [("handshake", self.handshake), ("greedy-parity", self.greedy_parity),
                ("lookahead", self.lookahead), ("fork", self.fork), ("rollback", self.rollback),
                ("seeded-sampling", self.seeded), ("unseeded-sampling", self.unseeded),
                ("min-p", self.min_p), ("dist-logprobs", self.dist_logprobs), ("errors", self.errors),
                ("health-during-forward", self.health_during_forward), ("shutdown", self.shutdown)]

    def handshake(self) -> tuple[str, dict[str, Any]]:
        caps = self.engine.handshake_line["caps"]
        assert "greedy" in caps["samplers"], caps
        return f"samplers {', '.join(caps['samplers'])}", {"caps": caps}

    def greedy_parity(self) -> tuple[str, dict[str, Any]]:
        self.decoded = decode(self.client, {c + 1: list(p) for c, p in enumerate(PROMPTS)}, STEPS)
        checked, ties, misses = 0, [], []
        for c, prompt in enumerate(PROMPTS):
            sequence = prompt + self.decoded[c + 1]
            at = list(range(len(prompt) - 1, len(sequence) - 1))
            (result,) = self.reference.forward([whole(100 + c, sequence, [{"at": a, "type": "dist", "k": 2}
                                                                         for a in at])])
            assert result["ok"], result
            for step, (token, out) in enumerate(zip(self.decoded[c + 1], result["outputs"], strict=True)):
                (first, second), (p1, p2) = out["dist"]
                checked += 1
                gap = math.log(p1 / p2) if p2 > 0 else math.inf
                if token == first:
                    continue
                entry = {"context": c + 1, "step": step, "token": token, "reference_top2": [first, second],
                         "logit_gap": round(gap, 4)}
                (ties if token == second and gap < NEAR_TIE_LOGIT_GAP else misses).append(entry)
        assert not misses, f"{len(misses)} of {checked} tokens disagree beyond a near-tie: {misses[:3]}"
        return f"{checked} tokens, {len(ties)} near-ties", {"near_ties": ties, "checked": checked}

    def lookahead(self) -> tuple[str, dict[str, Any]]:
        again = decode(self.client, {50: list(PROMPTS[0])}, STEPS)[50]
        assert again == self.decoded[1], (again, self.decoded[1])
        return f"{STEPS} tokens equal to the first decode of the same prompt", {}

    def fork(self) -> tuple[str, dict[str, Any]]:
        assert self.client.call("fork", src=1, dst=60)["length"] == len(PROMPTS[0]) + STEPS - 1
        length = len(PROMPTS[0]) + STEPS - 1
        token = self.decoded[1][-1]
        results = self.client.forward([{"context": cx, "tokens": [token], "positions": [length],
                                        "samplers": [greedy(0)]} for cx in (1, 60)])
        assert results[0]["outputs"] == results[1]["outputs"], results
        return "the fork continues exactly like its source", {}

    def rollback(self) -> tuple[str, dict[str, Any]]:
        prompt = PROMPTS[1]
        edited = prompt[:-1] + [(prompt[-1] + 7) % 500 + 3]
        fresh = self.client.forward([whole(70, edited, [greedy(len(edited) - 1)])])[0]
        rolled = self.client.forward([{"context": 2, "tokens": [edited[-1]], "positions": [len(prompt) - 1],
                                       "samplers": [greedy(0)]}])[0]
        assert rolled["ok"] and rolled["outputs"] == fresh["outputs"], (rolled, fresh)
        return "an overwritten position gives the fresh context's token", {}

    def _draw(self, context: int, **sampler: Any) -> int:
        result = self.client.forward([whole(context, PROMPTS[2], [{"at": len(PROMPTS[2]) - 1, **sampler}])])[0]
        assert result["ok"], result
        return int(result["outputs"][0]["token"])

    def seeded(self) -> tuple[str, dict[str, Any]]:
        draws = [self._draw(200 + c, type="multinomial", temperature=1.5, seed=1234) for c in range(4)]
        assert len(set(draws)) == 1, draws
        others = {self._draw(210 + s, type="top_k_top_p", temperature=2.0, top_k=50, top_p=0.95, seed=s)
                  for s in range(12)}
        assert len(others) > 1, others
        return f"seed 1234 drew {draws[0]} in 4 contexts; 12 seeds drew {len(others)} tokens", {}

    def unseeded(self) -> tuple[str, dict[str, Any]]:
        draws = {self._draw(300 + i, type="multinomial", temperature=3.0) for i in range(12)}
        assert len(draws) > 1, draws
        return f"12 unseeded draws gave {len(draws)} tokens", {}

    def min_p(self) -> tuple[str, dict[str, Any]]:
        top = self._draw(400, type="greedy")
        draws = {self._draw(401 + i, type="min_p", temperature=2.0, min_p=0.999) for i in range(6)}
        assert draws == {top}, (draws, top)
        return "min_p 0.999 keeps only the top token", {}

    def dist_logprobs(self) -> tuple[str, dict[str, Any]]:
        prompt, at = PROMPTS[3], len(PROMPTS[3]) - 1
        result = self.client.forward([whole(500, prompt, [{"at": at, "type": "dist", "k": 5},
                                                          {"at": at, "type": "greedy"}])])[0]
        assert result["ok"], result
        (ids, probs), token = result["outputs"][0]["dist"], result["outputs"][1]["token"]
        assert ids[0] == token and sum(probs) <= 1.0 + 1e-4, (ids, probs, token)
        logprobs = self.client.forward([whole(501, prompt, [{"at": at, "type": "logprobs",
                                                             "token_ids": ids[:2]}])])[0]
        assert logprobs["ok"], logprobs
        expected = [math.log(p) for p in probs[:2]]
        assert all(abs(a - b) < 1e-3 for a, b in zip(logprobs["outputs"][0]["logprobs"], expected, strict=True))
        return f"top-5 {ids}, log-probabilities agree", {}

    def errors(self) -> tuple[str, dict[str, Any]]:
        results = self.client.forward([whole(600, [5, 6, 7], [greedy(2)]), whole(601, [10**9], [greedy(0)])])
        assert results[0]["ok"] and not results[1]["ok"], results
        unknown = self.client.call("no_such_op", check=False)
        assert unknown.error is not None and unknown.error.code == "UNKNOWN_OP", unknown
        return f"a bad request failed alone ({results[1]['error']['code']}); unknown op refused", {}

    def health_during_forward(self) -> tuple[str, dict[str, Any]]:
        long = [whole(700 + c, [3 + (c + i) % 400 for i in range(200)], [greedy(199)]) for c in range(8)]
        forward_id = self.client.send("forward", requests=long)
        health_id = self.client.send("health")
        replies = {reply.id: reply for reply in (self.client.recv(), self.client.recv())}
        assert replies[health_id].ok and replies[health_id]["status"] in ("ok", "degraded"), replies
        assert replies[forward_id].ok, replies[forward_id]
        order = [r for r in replies]
        return f"health answered ({'before' if order[0] == health_id else 'after'} the forward)", {}

    def shutdown(self) -> tuple[str, dict[str, Any]]:
        assert self.client.call("shutdown").ok
        started = time.monotonic()
        code = self.engine.process.wait(timeout=120)
        assert code == 0, code
        return f"exit 0 after {time.monotonic() - started:.1f} s", {}


def environment(engine: str, double: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "engine": engine,
                            "test_double": str(double) if double else None}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as exc:  # report what is there; a broken torch is itself a finding
        info["torch"] = f"unavailable: {exc}"
    if engine == "tensorrt_llm" and double is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            info["tensorrt_llm"] = version("tensorrt_llm")
        except PackageNotFoundError:
            info["tensorrt_llm"] = None
    return info


def run_selftest(engine: str = "tensorrt_llm", model: Path | None = None, execution_mode: str = "generate",
                 double: Path | None = None, json_path: Path | None = None, workdir: Path | None = None,
                 echo: Callable[[str], None] = print) -> int:
    """Run every scenario; 0 when all pass."""
    label = ("[test double, NOT TensorRT-LLM] " if double else f"[{engine}] ")
    if engine == "tensorrt_llm" and double is None and importlib.util.find_spec("tensorrt_llm") is None:
        echo(f"{label}FAIL setup: tensorrt_llm is not importable (run `pie-driver-trtllm doctor`)")
        return 1
    root = Path(workdir or tempfile.mkdtemp(prefix="pie-selftest-"))
    root.mkdir(parents=True, exist_ok=True)
    model = model or make_model(root / "selftest-bf16", "selftest", dtype="bfloat16")
    env: dict[str, str] = {}
    device = "cpu"
    if double is not None:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(double), os.environ.get("PYTHONPATH", "")) if p),
               "PIE_TRTLLM_TEST_DOUBLE": "1"}
    else:
        import torch

        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    options: dict[str, Any] = {"engine": engine, "lookahead_tokens": 8}
    if engine == "tensorrt_llm":
        options.update(execution_mode=execution_mode, kv_cache_free_gpu_memory_fraction=0.5)
    outcomes: list[Outcome] = []
    processes: list[DriverProcess] = []
    try:
        processes.append(spawn(write_config(root / "engine.toml", model, device, options), env=env))
        # The reference runs on the CPU: the GPU stays TensorRT-LLM's.
        processes.append(spawn(write_config(root / "reference.toml", model, "cpu", {"engine": "reference"})))
        test = Selftest(*processes)
        for name, scenario in test.scenarios():
            try:
                detail, data = scenario()
                outcomes.append(Outcome(name, True, detail, data))
            except Exception as exc:
                text = " ".join(str(exc).split())[:300] or type(exc).__name__
                outcomes.append(Outcome(name, False, f"{type(exc).__name__}: {text}",
                                        {"traceback": traceback.format_exc()}))
            echo(f"{label}{'PASS' if outcomes[-1].ok else 'FAIL'} {name}: {outcomes[-1].detail}")
    except Exception as exc:
        outcomes.append(Outcome("setup", False, f"{type(exc).__name__}: {exc}", {"traceback": traceback.format_exc()}))
        echo(f"{label}FAIL setup: {outcomes[-1].detail}")
    finally:
        for process in processes:
            process.stop()
    report = {"environment": environment(engine, double), "execution_mode": execution_mode, "model": str(model),
              "near_tie_logit_gap": NEAR_TIE_LOGIT_GAP, "engine_stderr_tail": _tail(processes[:1]),
              "scenarios": [asdict(o) for o in outcomes], "passed": all(o.ok for o in outcomes)}
    text = json.dumps(report, indent=2, default=str)
    if json_path:
        Path(json_path).write_text(text + "\n")
        echo(f"{label}report written to {json_path}")
    else:
        sys.stdout.write(text + "\n")
    passed = sum(o.ok for o in outcomes)
    echo(f"{label}{passed} of {len(outcomes)} scenarios passed")
    return 0 if report["passed"] else 1


def _tail(processes: list[DriverProcess]) -> str:
    return processes[0].stderr()[-4000:] if processes else ""
