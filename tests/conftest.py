"""Shared fixtures: a tiny random-weight checkpoint, startup configs, and driver subprocesses."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pie_driver_trtllm.client import DriverProcess, spawn
from pie_driver_trtllm.modelgen import make_model


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
    lines = ["[model]", f"snapshot_dir = {toml_value(str(model))}", "", "[driver]",
             f"device = {toml_value([device])}", f"activation_dtype = {toml_value(dtype)}"]
    lines += [f"{k} = {toml_value(v)}" for k, v in (driver or {}).items()]
    lines += ["", "[driver.options]"] + [f"{k} = {toml_value(v)}" for k, v in options.items()]
    path = directory / "driver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start_driver(tmp_path: Path, tiny_model: Path) -> Iterator[Callable[..., DriverProcess]]:
    """Start a driver subprocess on the tiny model; every one started is stopped at teardown."""
    started: list[DriverProcess] = []

    def start(**options: Any) -> DriverProcess:
        directory = tmp_path / f"driver{len(started)}"
        directory.mkdir()
        process = spawn(write_config(directory, tiny_model, **options))
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def driver(start_driver: Callable[..., DriverProcess]) -> DriverProcess:
    return start_driver()
