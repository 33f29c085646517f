"""The reference engine on a CUDA GPU (runs on the lent GPU machines; skips on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch

from pie_driver_trtllm.config import parse_config
from pie_driver_trtllm.engines.base import Row
from pie_driver_trtllm.engines.reference import llama_layers
from pie_driver_trtllm.engines.reference.engine import ReferenceEngine
from pie_driver_trtllm.sampler import Sampler

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")]

GREEDY = Sampler(type="greedy", at=0, temperature=0.0)


def engine(tiny_model, device: str, activation_dtype: str, compiled: bool = True,
           overlap: bool = True) -> ReferenceEngine:
    config = parse_config({"model": {"snapshot_dir": str(tiny_model)},
                           "driver": {"device": [device], "activation_dtype": activation_dtype,
                                      "options": {"engine": "reference", "reference_compile": compiled,
                                                  "reference_overlap": overlap}}})
    return ReferenceEngine.load(config, device)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_on_cuda_matches_cpu_float32(tiny_model, dtype, compiled):
    gpu, cpu = engine(tiny_model, "cuda:0", dtype, compiled), engine(tiny_model, "cpu", "float32")
    history = [5, 6, 7, 8]
    for _ in range(24):
        token_gpu = gpu.step([Row(1, history, len(history), GREEDY)])[0].tokens[0]
        token_cpu = cpu.step([Row(1, history, len(history), GREEDY)])[0].tokens[0]
        if dtype == "float32":
            assert token_gpu == token_cpu
        history.append(token_cpu)  # both continue from the same history, so a bf16 flip cannot compound
    burst = gpu.step([Row(2, history[:4], 4, GREEDY, steps=16)])[0].tokens
    if dtype == "float32":
        assert burst == history[4:20]
    assert len(burst) == 16
    # several contexts in one batch, rows in a scattered order of slots
    rows = [Row(c, history[:6 + c], 6 + c, GREEDY) for c in (7, 3, 5)]
    for row in rows:
        gpu.step([row])
        cpu.step([row])
    rows = [Row(r.context, history[:r.length + 1], r.length + 1, GREEDY) for r in rows]
    got, want = gpu.step(rows), cpu.step(rows)
    if dtype == "float32":
        assert [r.tokens for r in got] == [r.tokens for r in want]


def test_a_failing_compile_falls_back_to_the_plain_step(tiny_model, capfd):
    gpu, cpu = engine(tiny_model, "cuda:0", "float32"), engine(tiny_model, "cpu", "float32")

    def broken(*args):
        raise RuntimeError("compile failed (planted by the test)")

    gpu.decoder._step_fns = (broken, llama_layers.gated_mlp, True)
    history = [5, 6, 7, 8, 9]
    gpu.step([Row(1, history[:4], 4, GREEDY)])
    cpu.step([Row(1, history[:4], 4, GREEDY)])
    got = gpu.step([Row(1, history, 5, GREEDY)])[0]  # one new token: the decode graph, captured now
    assert got.error is None and got.tokens == cpu.step([Row(1, history, 5, GREEDY)])[0].tokens
    assert gpu.decoder._step_fns is gpu.decoder._plain
    assert "running it uncompiled" in capfd.readouterr().err


def test_running_ahead_on_cuda_gives_the_tokens_of_the_plain_step(tiny_model):
    ahead, plain = engine(tiny_model, "cuda:0", "float32"), engine(tiny_model, "cuda:0", "float32", overlap=False)
    histories = {c: [c + 5, c + 6, c + 7] for c in range(4)}
    for step in range(20):
        rows = [Row(c, h, len(h), GREEDY) for c, h in histories.items()]
        if step == 12:  # the host breaks the loop once: context 0 gets another token
            histories[0][-1] = (histories[0][-1] + 1) % 50
        got, want = ahead.step(rows), plain.step(rows)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        for h, result in zip(histories.values(), got, strict=True):
            h.append(result.tokens[0])
    # Step 1 predicts, step 2 confirms and launches; 3-11 are served from launches; 12 discards one;
    # 13 confirms again; 14-19 are served; the launch after 19 is pending.
    assert (ahead.ahead_hits, ahead.ahead_launches, plain.ahead_launches) == (15, 17, 0)


def test_a_bucket_is_captured_for_every_window_at_its_first_step(tiny_model):
    gpu = engine(tiny_model, "cuda:0", "float32")
    gpu.step([Row(1, [5, 6, 7], 3, GREEDY)])
    gpu.step([Row(1, [5, 6, 7, 8], 4, GREEDY)])
    # The tiny model holds 2,048 positions: windows of 128 columns and up, doubling, cover them.
    assert sorted(w for b, w in gpu.decoder._graphs if b == 1) == [128, 256, 512, 1024, 2048]
    assert {b for b, _ in gpu.decoder._graphs} == {1}


def test_bursts_of_several_contexts_match_cpu_float32(tiny_model):
    """Lookahead bursts run as one queued chain of passes per burst length; tokens and the cache they
    leave behind (checked by the step after) equal the CPU's."""
    gpu, cpu = engine(tiny_model, "cuda:0", "float32"), engine(tiny_model, "cpu", "float32")
    prompts = {1: [6, 7, 8], 2: [9, 10, 11, 12], 3: [13, 14]}
    rows = [Row(c, p, len(p), GREEDY, steps=5 if c == 3 else 9) for c, p in prompts.items()]
    got, want = gpu.step(rows), cpu.step(rows)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    assert [len(r.tokens) for r in got] == [9, 9, 5]
    histories = {c: p + r.tokens for (c, p), r in zip(prompts.items(), got, strict=True)}
    rows = [Row(c, h, len(h), GREEDY) for c, h in histories.items()]
    assert [r.tokens for r in gpu.step(rows)] == [r.tokens for r in cpu.step(rows)]


def test_a_burst_between_loop_steps_does_not_leak_into_the_step_run_ahead(tiny_model):
    """Three contexts in a decode loop (slots 0-2, the batch-4 graph); a fourth context's first step is a
    lookahead burst, whose passes run that same graph; the loop's next step must not read the launched
    step's results from the graph's buffers, which the burst overwrote."""
    ahead, plain = engine(tiny_model, "cuda:0", "float32"), engine(tiny_model, "cuda:0", "float32", overlap=False)
    histories = {c: [c + 5, c + 6, c + 7] for c in range(3)}
    for _ in range(5):
        rows = [Row(c, h, len(h), GREEDY) for c, h in histories.items()]
        got, want = ahead.step(rows), plain.step(rows)
        assert [r.tokens for r in got] == [r.tokens for r in want]
        for h, result in zip(histories.values(), got, strict=True):
            h.append(result.tokens[0])
    assert ahead.ahead_launches >= 2
    burst = [Row(9, [40, 41, 42], 3, GREEDY, steps=6)]
    assert [r.tokens for r in ahead.step(burst)] == [r.tokens for r in plain.step(burst)]
    rows = [Row(c, h, len(h), GREEDY) for c, h in histories.items()]
    assert [r.tokens for r in ahead.step(rows)] == [r.tokens for r in plain.step(rows)]


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    from pie_driver_trtllm.modelgen import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny-seed1", "tiny", seed=1)


def _decode(engine_, histories, steps):
    for _ in range(steps):
        rows = [Row(c, h, len(h), GREEDY) for c, h in histories.items()]
        for h, result in zip(histories.values(), engine_.step(rows), strict=True):
            h.append(result.tokens[0])


def test_a_refit_on_cuda_keeps_the_graphs_and_gives_the_new_weights_tokens(tiny_model, second_model):
    gpu, cpu = engine(tiny_model, "cuda:0", "float32"), engine(second_model, "cpu", "float32")
    histories = {c: [c + 5, c + 6, c + 7] for c in range(3)}
    _decode(gpu, histories, 6)
    graphs = dict(gpu.decoder._graphs)
    assert gpu._ahead is not None and gpu._ahead.output is not None  # a step ran ahead on the old weights
    gpu.load_weights(str(second_model))
    assert gpu.decoder._graphs == graphs  # the weights were copied in place: the same graphs serve
    want = {c: list(h) for c, h in histories.items()}
    _decode(gpu, histories, 6)
    _decode(cpu, want, 6)
    assert histories == want


def _stack_size() -> int:
    """The current context's per-thread stack size (CU_LIMIT_STACK_SIZE), from the driver API."""
    import ctypes

    size = ctypes.c_size_t()
    assert ctypes.CDLL("libcuda.so.1").cuCtxGetLimit(ctypes.byref(size), 0) == 0
    return size.value


def test_sleep_frees_the_kv_cache_and_then_the_weights_and_wake_serves_again(tiny_model):
    gpu, cpu = engine(tiny_model, "cuda:0", "float32"), engine(tiny_model, "cpu", "float32")
    histories = {c: [c + 5, c + 6, c + 7] for c in range(3)}
    _decode(gpu, histories, 4)
    cache_bytes = sum(c.numel() * c.element_size() for c in gpu.decoder.cache)
    weight_bytes = sum(p.numel() * p.element_size() for p in gpu.decoder.model.parameters())
    torch.cuda.synchronize()
    awake = torch.cuda.memory_allocated()
    stack = _stack_size()
    gpu.sleep(1)
    assert _stack_size() < stack  # the context's stack reservation is given back too
    level1 = torch.cuda.memory_allocated()
    assert awake - level1 >= 0.9 * cache_bytes
    gpu.sleep(2)
    level2 = torch.cuda.memory_allocated()
    assert level1 - level2 >= 0.9 * weight_bytes
    assert _stack_size() < stack
    with pytest.raises(RuntimeError, match="asleep"):
        gpu.step([Row(1, histories[1], len(histories[1]), GREEDY)])
    gpu.wake()
    assert _stack_size() == stack
    assert torch.cuda.memory_allocated() >= awake - 0.1 * (cache_bytes + weight_bytes)
    want = {c: list(h) for c, h in histories.items()}
    _decode(gpu, histories, 5)  # replayed from history, then graph-captured decode steps again
    _decode(cpu, want, 5)
    assert histories == want
    assert gpu.decoder._graphs


def test_sampled_logprobs_on_cuda_match_cpu_float32(tiny_model, device: str = "cuda:0"):
    """`return_logprob` on the CUDA paths (a prefill, then the decode batch) equals a CPU `logprobs` sampler
    of the token the GPU chose: raw with no temperature, processed at T for a sampler without filters."""
    gpu, cpu = engine(tiny_model, device, "float32"), engine(tiny_model, "cpu", "float32")
    samplers = {0: (Sampler(type="greedy", at=0, temperature=0.0, return_logprob=True), 1.0),
                1: (Sampler(type="top_k", at=0, top_k=20, temperature=0.8, return_logprob=True, logprob_mode="raw"),
                    1.0),
                2: (Sampler(type="multinomial", at=0, temperature=0.7, return_logprob=True), 0.7)}
    history = [5, 6, 7, 8]
    for step in range(6):  # step 0 prefills every context; the others decode one token each, in one batch
        rows = [Row(c, history, len(history), sampler, seed=step) for c, (sampler, _) in samplers.items()]
        results = gpu.step(rows)
        for result, (_, temperature) in zip(results, samplers.values(), strict=True):
            assert result.error is None and len(result.tokens) == len(result.token_logprobs) == 1
            check = Sampler(type="logprobs", at=0, temperature=temperature, token_ids=(result.tokens[0],))
            (expected,) = cpu.step([Row(9, history, len(history), check)])[0].logprobs
            assert result.token_logprobs[0] == pytest.approx(expected, abs=1e-4)
        history.append(results[0].tokens[0])
