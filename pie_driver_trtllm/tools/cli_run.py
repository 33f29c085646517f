"""The `pie-driver-trtllm` verbs that run things: the driver, the model maker, the demo, the benchmarks."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pie_driver_trtllm.benchmarks.cli import Size
from pie_driver_trtllm.benchmarks.cli import bench as bench  # registered by cli.py


class ModelDtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"


def serve(config: Annotated[Path, typer.Option("--config", help="startup TOML written by the host")],
          handshake_fd: Annotated[int | None, typer.Option("--handshake-fd", help="an open fd for the two "
                                                           "handshake lines [default: stdout]",
                                                           show_default=False)] = None,
          endpoint: Annotated[str | None, typer.Option("--endpoint", help="ipc:// or tcp:// URL [default: a "
                                                       "private ipc socket]", show_default=False)] = None) -> None:
    """Run the driver (Pie does this for you).

    The same as `python -m pie_driver_trtllm`. Exit status 130 after Ctrl-C, 0 after SIGTERM.

    Example: pie-driver-trtllm serve --config driver.toml --handshake-fd 3
    """
    from pie_driver_trtllm.serving.driver import main as driver_main

    problem = _serve_problem(config, handshake_fd)
    if problem:
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    argv = ["--config", str(config)]
    if handshake_fd is not None:
        argv += ["--handshake-fd", str(handshake_fd)]
    if endpoint is not None:
        argv += ["--endpoint", endpoint]
    raise typer.Exit(driver_main(argv))


def _serve_problem(config: Path, handshake_fd: int | None) -> str | None:
    """What makes `serve` fail before it starts, in one line; None when nothing does."""
    import tomllib

    from pie_driver_trtllm.config import StartupError, is_pie_config, pie_config_message
    from pie_driver_trtllm.serving.driver import check_handshake_fd

    try:
        check_handshake_fd(handshake_fd)
    except StartupError as exc:
        return str(exc)
    try:
        data = tomllib.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None  # the driver names these itself
    return pie_config_message(config) if is_pie_config(data) else None


def make_model_command(
        directory: Annotated[Path, typer.Argument(help="where to write the checkpoint (a new or empty folder)")],
        size: Annotated[Size, typer.Option(help="tiny (tests), small (demo) or 1b (GPU benchmarks)")] = Size.tiny,
        seed: Annotated[int, typer.Option(help="weights seed")] = 0,
        dtype: Annotated[ModelDtype, typer.Option(help="weights dtype")] = ModelDtype.float32) -> None:
    """Write a random-weight Llama checkpoint (no download needed).

    Example: pie-driver-trtllm make-model /tmp/tiny-llama --size tiny
    """
    from pie_driver_trtllm.modelgen import make_model, parameter_count

    if directory.exists() and not directory.is_dir():
        typer.echo(f"error: {directory} is a file; make-model writes a folder (give a new path)", err=True)
        raise typer.Exit(2)
    try:
        path = make_model(directory, size.value, seed, dtype.value)
    except OSError as exc:
        typer.echo(f"error: cannot write {directory}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} ({size.value}, {parameter_count(size.value) / 1e6:.1f}M parameters, seed {seed}, "
               f"{dtype.value})")


def demo(contexts: Annotated[int, typer.Option(min=8, help="host contexts to run")] = 8,
         steps: Annotated[int, typer.Option(min=4, help="decode steps per context")] = 24,
         size: Annotated[Size, typer.Option(help="model size for make-model")] = Size.small,
         workdir: Annotated[Path | None, typer.Option(help="where the model and config go [default: ./.demo]",
                                                      show_default=False)] = None) -> None:
    """Run a driver on a random-weight model and act as its host.

    Example: pie-driver-trtllm demo --contexts 8 --steps 24
    """
    from pie_driver_trtllm.tools.demo import run_demo

    raise typer.Exit(run_demo(contexts=contexts, steps=steps, size=size.value, workdir=workdir))


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
