"""Shared fixtures: a tiny random-weight checkpoint, startup configs, and driver subprocesses."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from pie_driver_trtllm.client import DriverProcess, spawn
from pie_driver_trtllm.engines.tensorrt_llm.startup import TEST_DOUBLE_ENV
from pie_driver_trtllm.modelgen import make_model

# Property tests: in CI (the CI variable set) a fixed seed and more examples, so that a run cannot pass by
# luck; locally a fresh seed each run, so that new cases can still turn up. A test that names its own
# max_examples keeps it. Every failing case found is pinned with @example where it was found.
settings.register_profile("ci", derandomize=True, max_examples=40, print_blob=True, deadline=None)
settings.register_profile("dev", max_examples=10, print_blob=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def double(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make `import tensorrt_llm` find the test double for one test; undo it afterwards."""
    from trtllm_support import DOUBLE_DIR

    monkeypatch.syspath_prepend(str(DOUBLE_DIR))
    monkeypatch.setenv(TEST_DOUBLE_ENV, "1")
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


def toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans and lists of them read the same in TOML


def write_config(directory: Path, model: Path, *, device: str = "cpu", dtype: str = "float32",
                 driver: dict[str, Any] | None = None, **options: Any) -> Path:
    """A startup TOML for the reference engine; keyword arguments become [driver.options]."""
    options = {"engine": "reference", **options}
    driver = {"device": [device], "activation_dtype": dtype, **(driver or {})}
    lines = ["[model]", f"snapshot_dir = {toml_value(str(model))}", "", "[driver]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in driver.items()]
    lines += ["", "[driver.options]"] + [f"{k} = {toml_value(v)}" for k, v in options.items()]
    path = directory / "driver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


# Engine variants a driver fixture can run: the reference engine, and the TensorRT-LLM engine in each
# execution mode on the TensorRT-LLM test double (tests/trtllm_double), never the real package.
ENGINE_VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"engine": "reference"},
    "trtllm-double-generate": {"engine": "tensorrt_llm", "execution_mode": "generate"},
    "trtllm-double-pyexecutor": {"engine": "tensorrt_llm", "execution_mode": "pyexecutor"},
}


@pytest.fixture
def engine_variant() -> str:
    return "reference"


@pytest.fixture
def start_driver(tmp_path: Path, tiny_model: Path, engine_variant: str) -> Iterator[Callable[..., DriverProcess]]:
    """Start a driver subprocess on the tiny model; every one started is stopped at teardown."""
    started: list[DriverProcess] = []

    def start(env: dict[str, str] | None = None, **options: Any) -> DriverProcess:
        from trtllm_support import double_env

        directory = tmp_path / f"driver{len(started)}"
        directory.mkdir()
        options = {**ENGINE_VARIANTS[engine_variant], **options}
        env = {**(double_env() if options["engine"] == "tensorrt_llm" else {}), **(env or {})}
        process = spawn(write_config(directory, tiny_model, **options), env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def driver(start_driver: Callable[..., DriverProcess]) -> DriverProcess:
    return start_driver()
