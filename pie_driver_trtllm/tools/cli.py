"""The `pie-driver-trtllm` command line (typer).

The verbs `install`, `set`, `unset`, `show`, `doctor`, `exec`, `list` and `validate` mirror
`pie driver tensorrt-llm <verb>`: Pie can mount this typer app from the `pie.drivers` entry point group.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pie_driver_trtllm.tools import cli_run

app = typer.Typer(
    help="Pie driver for NVIDIA TensorRT-LLM (with a PyTorch reference engine).\n\n"
         "Set up a machine with `install --run`, `set venv` and `doctor`; check a Pie config with "
         "`validate`; Pie starts the driver itself (`serve`). User guide: docs/user-guide.md.\n\n"
         "Example: pie-driver-trtllm install --run && pie-driver-trtllm set venv ~/.pie/venvs/tensorrt_llm",
    no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]})


def _show_version(value: bool) -> None:
    if value:
        from pie_driver_trtllm import __version__

        typer.echo(f"pie-driver-trtllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_show_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """Pie driver for NVIDIA TensorRT-LLM (with a PyTorch reference engine)."""


class Kind(StrEnum):
    venv = "venv"
    python = "python"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


# --- setting up a machine: install, set, unset, show, doctor, exec, list, validate ------------------------


@app.command()
def install(
        path: Annotated[Path | None, typer.Argument(
            help="venv folder [default: $PIE_HOME/venvs/tensorrt_llm; PIE_HOME defaults to ~/.pie]", metavar="PATH",
            show_default=False)] = None,
        run: Annotated[bool, typer.Option("--run", help="do it, instead of printing the recipe")] = False,
        extra: Annotated[str | None, typer.Option(help="extra to install: tensorrt (TensorRT-LLM), reference "
                                                       "(PyTorch only) or none [default: tensorrt with an NVIDIA "
                                                       "GPU, else reference with CPU torch]",
                                                  show_default=False)] = None,
        source: Annotated[str | None, typer.Option(
            "--from", help="a source checkout or wheel to install [default: where this copy came from]",
            metavar="PATH", show_default=False)] = None,
        no_deps: Annotated[bool, typer.Option("--no-deps", help="install only this package, no dependencies "
                                              "(fast; for tests and pre-built venvs)")] = False,
        python: Annotated[str | None, typer.Option(help="Python version or interpreter path for a new venv "
                                                        "[default: 3.12, else this Python with a notice]",
                                                   show_default=False)] = None) -> None:
    """Print the venv recipe, or create the venv with --run.

    Without --run: print copy-pasteable commands. With --run: create the venv (uv when present, else
    python -m venv; Python 3.12 preferred), install pie-driver-trtllm from where this copy came from
    (its checkout or wheel) with the extra, check that it imports, and say how to register it. Without
    an NVIDIA GPU the reference extra is the default and the CPU build of torch is installed first.

    \b
    Examples:
      pie-driver-trtllm install                      # print the recipe
      pie-driver-trtllm install --run                # make ~/.pie/venvs/tensorrt_llm
      pie-driver-trtllm install /tmp/v --run --from . --extra none --no-deps   # from a checkout, fast
    """
    from pie_driver_trtllm.tools.install import EXTRAS, choose_python, default_extra, recipe, run_install
    from pie_driver_trtllm.tools.pie_home import default_venv

    extra = extra or default_extra()
    if run and python:
        found, _, notice = choose_python(python)
        if not found:
            raise _fail(str(notice), 2)
    if extra not in EXTRAS:
        raise _fail(f"--extra {extra!r} is not one of {', '.join(EXTRAS)}", 2)
    venv = Path(os.path.abspath(os.path.expanduser(str(path)))) if path else default_venv()
    if not run:
        typer.echo(recipe(venv, extra, source, no_deps))
        return
    raise typer.Exit(run_install(venv, extra=extra, source=source, no_deps=no_deps, python=python, echo=typer.echo))


@app.command("set")
def set_command(kind: Annotated[Kind, typer.Argument(help="venv (a virtual environment folder) or python "
                                                          "(an interpreter)", metavar="venv|python")],
                path: Annotated[str, typer.Argument(help="the folder or interpreter; stored as an absolute path",
                                                    metavar="PATH")],
                shared: Annotated[bool, typer.Option("--shared", help="write the [python] block every driver "
                                                     "type falls back to, not [driver.tensorrt_llm]")] = False
                ) -> None:
    """Register this driver's venv or python in drivers.toml.

    Writes $PIE_HOME/drivers.toml; setting one of venv/python clears the other. Other drivers'
    blocks and all comments are kept; the file is replaced atomically.

    \b
    Examples:
      pie-driver-trtllm set venv ~/.pie/venvs/tensorrt_llm
      pie-driver-trtllm set python /opt/conda/bin/python3.12
    """
    from pie_driver_trtllm.tools.pie_home import PieHomeError, block_name, drivers_toml, set_interpreter, venv_python

    target = drivers_toml()
    try:
        stored = set_interpreter(kind.value, path, target, shared=shared)
    except PieHomeError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"Set {kind.value} = {stored!r} in {block_name(shared)} of {target}")
    interpreter = venv_python(stored) if kind is Kind.venv else Path(stored)
    if not interpreter.exists():
        typer.echo(f"! warning: {interpreter} does not exist yet (create it with "
                   f"`pie-driver-trtllm install {shlex.quote(stored)} --run`)", err=True)
    typer.echo("")
    show()


@app.command()
def unset(kind: Annotated[Kind, typer.Argument(help="venv or python", metavar="venv|python")],
          shared: Annotated[bool, typer.Option("--shared", help="edit the shared [python] block instead")] = False
          ) -> None:
    """Remove this driver's venv or python from drivers.toml.

    An emptied block is dropped; everything else in $PIE_HOME/drivers.toml is kept.

    Example: pie-driver-trtllm unset venv
    """
    from pie_driver_trtllm.tools.pie_home import PieHomeError, block_name, drivers_toml, unset_interpreter

    target = drivers_toml()
    try:
        removed = unset_interpreter(kind.value, target, shared=shared)
    except PieHomeError as exc:
        raise _fail(str(exc)) from None
    if removed:
        typer.echo(f"Removed {kind.value} from {block_name(shared)} in {target}")
    else:
        typer.echo(f"Nothing to remove: {kind.value} is not set in {block_name(shared)} of {target}")
    typer.echo("")
    show()


@app.command()
def show() -> None:
    """Print the resolved interpreter and the step that chose it.

    Precedence, first match wins: 1 [model.driver.options] venv/python, 2 $PIE_PYTHON, 3 $VIRTUAL_ENV,
    4 drivers.toml [driver.tensorrt_llm], 5 drivers.toml [python], 6 python3 on PATH. Like `pie driver
    ... show`, step 1 is not looked at here (it lives in a Pie config).

    Example: pie-driver-trtllm show
    """
    from pie_driver_trtllm.tools.pie_home import STEPS, PieHomeError, drivers_toml, resolve_interpreter

    typer.echo("driver:  tensorrt_llm")
    try:
        resolved = resolve_interpreter({})
    except PieHomeError as exc:
        typer.echo("python:  NOT RESOLVED\n")
        raise _fail(str(exc)) from None
    exists = "" if resolved.python.exists() else "   (! does not exist)"
    typer.echo(f"python:  {resolved.python}{exists}")
    typer.echo(f"source:  {resolved.source}  [step {resolved.step} of {len(STEPS)}: {STEPS[resolved.step - 1]}]")
    path = drivers_toml()
    typer.echo(f"file:    {path}{'' if path.exists() else ' (absent)'}")


@app.command()
def doctor(config: Annotated[Path | None, typer.Option("--config", "-c", help="also check this Pie config or "
                                                       "driver startup TOML", show_default=False)] = None,
           engine: Annotated[str | None, typer.Option(help="engine to check readiness for: tensorrt_llm or "
                                                            "reference [default: from --config, else "
                                                            "tensorrt_llm]", show_default=False)] = None,
           as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
           min_free_gib: Annotated[float, typer.Option(help="disk room below this is a warning")] = 20.0) -> None:
    """Check this machine is ready to serve: PASS / WARN / FAIL.

    Each line says what was found and, when it is not a PASS, the fix. Colours on a terminal only,
    and never with NO_COLOR set.

    Checks: the interpreter and its version, this package and tensorrt_llm importable in it (with the
    library-path bootstrap), MPI runtime, torch / CUDA and each GPU's free memory, the reference engine,
    the config (--config) with each device visible, and disk room. Exit status 0 when nothing FAILs.

    \b
    Examples:
      pie-driver-trtllm doctor
      pie-driver-trtllm doctor --config ~/.pie/config.toml --json
      pie-driver-trtllm doctor --engine reference
    """
    from pie_driver_trtllm.config import ENGINE_ALIASES
    from pie_driver_trtllm.tools.doctor import run_checks
    from pie_driver_trtllm.tools.doctor_report import print_report

    if engine is not None and engine not in ENGINE_ALIASES:
        raise _fail(f"--engine {engine!r} is not one of tensorrt_llm, reference", 2)
    started = time.time()
    report = run_checks(config, ENGINE_ALIASES[engine] if engine else None, min_free_gib)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report, started=started)
    raise typer.Exit(0 if report["ok"] else 1)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_command(command: Annotated[list[str] | None, typer.Argument(help="the command and its arguments",
                                                                     metavar="CMD", show_default=False)] = None
                 ) -> None:
    """Run a command with this driver's interpreter.

    `python`/`python3` become the resolved interpreter and `pip`/`pip3` become `<it> -m pip`; its
    folder goes first on PATH.

    \b
    Examples:
      pie-driver-trtllm exec -- python -c "import tensorrt_llm; print(tensorrt_llm.__version__)"
      pie-driver-trtllm exec -- pip list
    """
    from pie_driver_trtllm.tools.pie_home import PieHomeError, resolve_interpreter

    if not command:
        raise _fail("no command to exec. Usage: pie-driver-trtllm exec -- <cmd...>", 2)
    try:
        python = resolve_interpreter({}).python
    except PieHomeError as exc:
        raise _fail(str(exc)) from None
    argv = list(command)
    if argv[0] in ("python", "python3"):
        argv[0] = str(python)
    elif argv[0] in ("pip", "pip3"):
        argv[:1] = [str(python), "-m", "pip"]
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(filter(None, (str(python.parent), env.get("PATH"))))
    if (python.parent.parent / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(python.parent.parent)
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env["PATH"])
    if not program:
        raise _fail(f"command not found: {argv[0]}", 127)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, argv, env)
    except OSError as exc:
        raise _fail(f"cannot run {program}: {exc.strerror or exc}", 126) from None


@app.command("list")
def list_command(config: Annotated[Path | None, typer.Option("--config", "-c", help="a Pie config: also list "
                                                             "its [[model]] entries", show_default=False)] = None
                 ) -> None:
    """List driver types, and which [[model]] entries use this one.

    With --config, the [[model]] entries of that Pie config, marking those served by this driver.

    Example: pie-driver-trtllm list -c ~/.pie/config.toml
    """
    from importlib.metadata import entry_points

    from pie_driver_trtllm.tools.pie_config import KNOWN_TYPES, TYPE_ALIASES, load_pie_config

    typer.echo("Subprocess drivers (Python wheels):")
    for name, how in KNOWN_TYPES.items():
        mark = "  <- this driver (aliases: " + ", ".join(TYPE_ALIASES[1:]) + ")" if name == "tensorrt_llm" else ""
        typer.echo(f"  {name:<14}{how}{mark}")
    mounted = sorted(ep.name for ep in entry_points(group="pie.drivers"))
    typer.echo(f"CLI plug-ins installed here (entry point group pie.drivers): {', '.join(mounted) or 'none'}")
    if config is None:
        return
    cfg = load_pie_config(config)
    typer.echo(f"\n[[model]] entries in {config}:")
    if not cfg.models:
        typer.echo("  (none)")
    for m in cfg.models:
        mark = "  <- this driver" if m.ours else ""
        typer.echo(f"  {m.index + 1}. {m.name or '(no name)'}: type {m.type}, devices "
                   f"{', '.join(m.devices) or '(none)'}{mark}")
    if cfg.problems:
        typer.echo(f"\n! {len(cfg.problems)} problem(s); see `pie-driver-trtllm validate {config}`")


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="a Pie config ([[model]] entries) or a driver "
                                                         "startup TOML", metavar="CONFIG")]) -> None:
    """Check a Pie config, pointing at each offending line.

    Every problem is printed as FILE:LINE: message, followed by the line itself.

    For a Pie config, every [[model]] whose [model.driver] type is tensorrt_llm (or tensorrt-llm,
    trtllm) is checked with the driver's own rules plus Pie's. A driver startup TOML gets the checks
    `serve` runs, its model directory included. Exit status 1 when anything is wrong.

    Example: pie-driver-trtllm validate ~/.pie/config.toml
    """
    from pie_driver_trtllm.tools.validate import validate_file

    problems, warnings, verdict = validate_file(config)
    for problem in problems:
        typer.echo(problem, err=True)
    for warning in warnings:
        typer.echo(warning)
    if problems:
        typer.echo(f"✗ {len(problems)} problem(s) in {config}", err=True)
        raise typer.Exit(1)
    typer.echo(verdict)


# --- running: serve, make-model, demo ------------------------------------------------------------------


# Running the driver and its workloads (defined in cli_run.py; registered here so `--help` lists them).
app.command()(cli_run.serve)
app.command("make-model")(cli_run.make_model_command)
app.command()(cli_run.demo)
app.command()(cli_run.bench)
app.command()(cli_run.selftest)


def main() -> None:
    # transformers draws progress bars on every model write and load; a driver's stderr is the host's.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()


if __name__ == "__main__":
    main()
