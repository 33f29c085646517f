"""The `pie-driver-trtllm` verbs that run things: the driver, the model maker, the demo, the benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(config: Annotated[Path, typer.Option("--config", help="startup TOML written by the host")],
          handshake_fd: Annotated[int | None, typer.Option("--handshake-fd")] = None,
          endpoint: Annotated[str | None, typer.Option("--endpoint")] = None) -> None:
    """Run the driver (Pie does this for you).

    The same as `python -m pie_driver_trtllm`.

    Example: pie-driver-trtllm serve --config driver.toml --handshake-fd 3
    """
    from pie_driver_trtllm.serving.driver import main as driver_main

    argv = ["--config", str(config)]
    if handshake_fd is not None:
        argv += ["--handshake-fd", str(handshake_fd)]
    if endpoint is not None:
        argv += ["--endpoint", endpoint]
    raise typer.Exit(driver_main(argv))


def make_model_command(
        directory: Annotated[Path, typer.Argument(help="where to write the checkpoint")],
        size: Annotated[str, typer.Option(help="tiny (tests), small (demo) or 1b (GPU benchmarks)")] = "tiny",
        seed: Annotated[int, typer.Option(help="weights seed")] = 0,
        dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32") -> None:
    """Write a random-weight Llama checkpoint (no download needed).

    Example: pie-driver-trtllm make-model /tmp/tiny-llama --size tiny
    """
    from pie_driver_trtllm.modelgen import SIZES, make_model, parameter_count

    if size not in SIZES:
        typer.echo(f"error: --size {size!r} is not one of {', '.join(SIZES)}", err=True)
        raise typer.Exit(2)
    path = make_model(directory, size, seed, dtype)
    typer.echo(f"wrote {path} ({size}, {parameter_count(size) / 1e6:.1f}M parameters, seed {seed}, {dtype})")


def demo(contexts: Annotated[int, typer.Option(help="host contexts to run (8 or more)")] = 8,
         steps: Annotated[int, typer.Option(help="decode steps per context")] = 24,
         size: Annotated[str, typer.Option(help="model size for make-model")] = "small",
         workdir: Annotated[Path | None, typer.Option(help="where the model and config go")] = None) -> None:
    """Run a driver on a random-weight model and act as its host.

    Example: pie-driver-trtllm demo --contexts 8 --steps 24
    """
    from pie_driver_trtllm.tools.demo import run_demo

    raise typer.Exit(run_demo(contexts=contexts, steps=steps, size=size, workdir=workdir))


def bench(workload: Annotated[list[str] | None, typer.Option(
              "--workload", "-w", help="transport, overhead, lookahead, history, codec (repeat; default all)")] = None,
          size: Annotated[str, typer.Option(help="model size: tiny, small or 1b")] = "tiny",
          device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
          dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
          out: Annotated[Path, typer.Option(help="folder for <workload>.json")] = Path("bench-out"),
          quick: Annotated[bool, typer.Option(help="small sizes, about a minute on a CPU")] = False,
          plot: Annotated[Path | None, typer.Option(help="write the overhead PNG here")] = None) -> None:
    """Measure the driver side by side with its floors; print tables, write JSON.

    Example: pie-driver-trtllm bench -w transport -w codec --quick --out /tmp/bench
    """
    from pie_driver_trtllm.benchmarks.cli import main as bench_main

    argv = ["--size", size, "--device", device, "--dtype", dtype, "--out", str(out)]
    argv += ["--workloads", *workload] if workload else []
    argv += ["--quick"] if quick else []
    argv += ["--plot", str(plot)] if plot else []
    raise typer.Exit(bench_main(argv))


def selftest(engine: Annotated[str, typer.Option(help="tensorrt_llm or reference")] = "tensorrt_llm",
             model: Annotated[Path | None, typer.Option(help="checkpoint (default: bf16 random weights)")] = None,
             execution_mode: Annotated[str, typer.Option(help="generate or pyexecutor")] = "generate",
             double: Annotated[Path | None, typer.Option(help="the TensorRT-LLM test double's folder")] = None,
             json_path: Annotated[Path | None, typer.Option("--json", help="the JSON report's path")] = None) -> None:
    """Run the protocol scenarios against a driver subprocess: a PASS/FAIL table and a JSON report.

    Example: pie-driver-trtllm selftest --engine tensorrt_llm --execution-mode pyexecutor --json report.json
    """
    from pie_driver_trtllm.tools.selftest import run_selftest

    raise typer.Exit(run_selftest(engine, model, execution_mode, double, json_path, echo=typer.echo))
