"""The `pie-driver-trtllm` command line (typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Pie driver for NVIDIA TensorRT-LLM (with a PyTorch reference engine).",
                  no_args_is_help=True, add_completion=False)


@app.command()
def serve(config: Annotated[Path, typer.Option("--config", help="startup TOML written by the host")],
          handshake_fd: Annotated[int | None, typer.Option("--handshake-fd")] = None,
          endpoint: Annotated[str | None, typer.Option("--endpoint")] = None) -> None:
    """Run the driver (the same as `python -m pie_driver_trtllm`)."""
    from .driver import main as driver_main

    argv = ["--config", str(config)]
    if handshake_fd is not None:
        argv += ["--handshake-fd", str(handshake_fd)]
    if endpoint is not None:
        argv += ["--endpoint", endpoint]
    raise typer.Exit(driver_main(argv))


@app.command("make-model")
def make_model_command(
        directory: Annotated[Path, typer.Argument(help="where to write the checkpoint")],
        size: Annotated[str, typer.Option(help="tiny (tests), small (demo) or 1b (GPU benchmarks)")] = "tiny",
        seed: Annotated[int, typer.Option(help="weights seed")] = 0,
        dtype: Annotated[str, typer.Option(help="float32 or bfloat16")] = "float32") -> None:
    """Write a random-weight Llama checkpoint (no download needed)."""
    from .modelgen import SIZES, make_model, parameter_count

    if size not in SIZES:
        typer.echo(f"error: --size {size!r} is not one of {', '.join(SIZES)}", err=True)
        raise typer.Exit(2)
    path = make_model(directory, size, seed, dtype)
    typer.echo(f"wrote {path} ({size}, {parameter_count(size) / 1e6:.1f}M parameters, seed {seed}, {dtype})")


@app.command()
def demo(contexts: Annotated[int, typer.Option(help="host contexts to run (8 or more)")] = 8,
         steps: Annotated[int, typer.Option(help="decode steps per context")] = 24,
         size: Annotated[str, typer.Option(help="model size for make-model")] = "small",
         workdir: Annotated[Path | None, typer.Option(help="where the model and config go")] = None) -> None:
    """Start a real driver subprocess on a random-weight model and act as its host."""
    from .demo import run_demo

    raise typer.Exit(run_demo(contexts=contexts, steps=steps, size=size, workdir=workdir))


def main() -> None:
    app()
