"""Unit tests of the startup configuration: defaults, aliases and one-line StartupErrors naming key and value."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pie_driver_trtllm.config import (
    MAX_LOOKAHEAD,
    DriverConfig,
    DriverOptions,
    DriverSection,
    ModelSection,
    StartupError,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent


def config(model: dict[str, Any] | None = None, driver: dict[str, Any] | None = None,
           options: dict[str, Any] | None = None, **tables: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"model": {"snapshot_dir": "/models/tiny", **(model or {})}}
    driver_table = dict(driver or {})
    if options is not None:
        driver_table["options"] = options
    if driver_table:
        data["driver"] = driver_table
    data.update(tables)
    return data


def startup_error(data: dict[str, Any]) -> str:
    with pytest.raises(StartupError) as info:
        parse_config(data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config: ")
    return message


def test_defaults() -> None:
    cfg = parse_config(config())
    assert isinstance(cfg, DriverConfig)
    assert cfg.engine == "tensorrt_llm"
    assert cfg.model.snapshot_dir == "/models/tiny"
    assert cfg.model.name == "tiny"  # the directory name
    assert cfg.model.hf_repo == ""
    assert cfg.driver.device == ["cuda:0"]
    assert cfg.driver.group_id == 0
    assert cfg.driver.activation_dtype == "bfloat16"
    assert cfg.driver.random_seed is None
    assert cfg.driver.tensor_parallel_size == 1
    o = cfg.options
    assert o.lookahead_tokens == 16 == MAX_LOOKAHEAD
    assert o.execution_mode == "generate"
    assert o.trust_remote_code is True
    assert o.llm_kwargs == {}
    assert o.max_concurrent_requests == 128
    assert o.max_batched_tokens == 8192
    assert o.max_logprob_labels == 1024
    assert o.max_session_histories == 65536
    assert o.max_history_tokens is None
    assert o.max_frame_bytes == 64 << 20
    assert o.kv_cache_free_gpu_memory_fraction is None


def test_defaults_do_not_share_mutable_values() -> None:
    a = parse_config(config())
    b = parse_config(config())
    a.options.llm_kwargs["x"] = 1
    a.driver.device.append("cpu")
    assert b.options.llm_kwargs == {}
    assert b.driver.device == ["cuda:0"]


def test_values_are_read() -> None:
    cfg = parse_config(config(model={"name": "m", "hf_repo": "org/m"},
                              driver={"device": ["cpu"], "group_id": 3, "activation_dtype": "float32",
                                      "random_seed": 7},
                              options={"engine": "reference", "lookahead_tokens": 1,
                                       "kv_cache_free_gpu_memory_fraction": 0.5,
                                       "llm_kwargs": {"enable_foo": True}}))
    assert cfg.engine == "reference"
    assert cfg.model.name == "m"
    assert cfg.model.hf_repo == "org/m"
    assert cfg.driver.device == ["cpu"]
    assert cfg.driver.group_id == 3
    assert cfg.driver.activation_dtype == "float32"
    assert cfg.driver.random_seed == 7
    assert cfg.options.lookahead_tokens == 1
    assert cfg.options.kv_cache_free_gpu_memory_fraction == 0.5
    assert cfg.options.llm_kwargs == {"enable_foo": True}


@pytest.mark.parametrize("alias", ["tensorrt_llm", "tensorrt-llm", "trtllm"])
def test_engine_aliases(alias: str) -> None:
    cfg = parse_config(config(options={"engine": alias}))
    assert cfg.engine == "tensorrt_llm"
    assert cfg.options.engine == alias


@pytest.mark.parametrize("devices", [["cpu"], ["cuda"], ["cuda:0"], ["cuda:12"], ["cuda:0", "cuda:1"]])
def test_good_devices(devices: list[str]) -> None:
    assert parse_config(config(driver={"device": devices})).driver.device == devices


@pytest.mark.parametrize("data, key", [
    (config(model={"revision": "main"}), "model.revision"),
    (config(driver={"gpus": 2}), "driver.gpus"),
    (config(options={"lookahead": 4}), "driver.options.lookahead"),
])
def test_unknown_key_names_key_and_allowed_keys(data: dict[str, Any], key: str) -> None:
    message = startup_error(data)
    assert f"unknown key {key}" in message
    assert "allowed keys" in message


def test_unknown_key_lists_allowed_option_keys() -> None:
    message = startup_error(config(options={"lookahed_tokens": 4}))
    assert "driver.options.lookahed_tokens" in message
    assert "lookahead_tokens" in message
    assert "execution_mode" in message


def test_unknown_table() -> None:
    message = startup_error(config(server={"port": 1}))
    assert "[server]" in message


@pytest.mark.parametrize("data, key, shown", [
    (config(driver={"group_id": True}), "driver.group_id", "True"),
    (config(options={"lookahead_tokens": True}), "driver.options.lookahead_tokens", "True"),
    (config(options={"max_concurrent_requests": False}), "driver.options.max_concurrent_requests", "False"),
    (config(options={"lookahead_tokens": 4.0}), "driver.options.lookahead_tokens", "4.0"),
    (config(options={"lookahead_tokens": "4"}), "driver.options.lookahead_tokens", "'4'"),
    (config(options={"trust_remote_code": 1}), "driver.options.trust_remote_code", "1"),
    (config(options={"kv_cache_free_gpu_memory_fraction": True}),
     "driver.options.kv_cache_free_gpu_memory_fraction", "True"),
    (config(driver={"device": "cpu"}), "driver.device", "'cpu'"),
    (config(model={"snapshot_dir": 5}), "model.snapshot_dir", "5"),
])
def test_wrong_type(data: dict[str, Any], key: str, shown: str) -> None:
    message = startup_error(data)
    assert f"{key} = {shown}" in message
    assert "expected" in message


@pytest.mark.parametrize("value", [0, MAX_LOOKAHEAD + 1, -1])
def test_lookahead_out_of_range(value: int) -> None:
    message = startup_error(config(options={"lookahead_tokens": value}))
    assert f"driver.options.lookahead_tokens = {value}" in message
    assert "out of range" in message
    assert "1..16" in message


@pytest.mark.parametrize("data, key, shown", [
    (config(options={"kv_cache_free_gpu_memory_fraction": 1.5}), "driver.options.kv_cache_free_gpu_memory_fraction",
     "1.5"),
    (config(options={"max_frame_bytes": 100}), "driver.options.max_frame_bytes", "100"),
    (config(driver={"group_id": -1}), "driver.group_id", "-1"),
])
def test_other_out_of_range(data: dict[str, Any], key: str, shown: str) -> None:
    message = startup_error(data)
    assert f"{key} = {shown}" in message
    assert "out of range" in message


@pytest.mark.parametrize("data, key, shown", [
    (config(options={"execution_mode": "fast"}), "driver.options.execution_mode", "'fast'"),
    (config(options={"engine": "vllm"}), "driver.options.engine", "'vllm'"),
    (config(driver={"activation_dtype": "int4"}), "driver.activation_dtype", "'int4'"),
    (config(driver={"tensor_parallel_size": 2}), "driver.tensor_parallel_size", "2"),
])
def test_bad_choice(data: dict[str, Any], key: str, shown: str) -> None:
    message = startup_error(data)
    assert f"{key} = {shown}" in message
    assert "is not allowed" in message


def test_bad_choice_lists_allowed_values() -> None:
    message = startup_error(config(options={"execution_mode": "fast"}))
    assert "'generate'" in message
    assert "'pyexecutor'" in message


@pytest.mark.parametrize("entry", ["gpu0", "cuda:", "cuda:x", "CPU", 0])
def test_bad_device_entry(entry: Any) -> None:
    message = startup_error(config(driver={"device": ["cpu", entry]}))
    assert "driver.device" in message
    assert repr(entry) in message


def test_empty_device_list() -> None:
    message = startup_error(config(driver={"device": []}))
    assert "driver.device = []" in message
    assert "empty" in message


@pytest.mark.parametrize("model", [{}, {"snapshot_dir": ""}])
def test_missing_snapshot_dir(model: dict[str, Any]) -> None:
    message = startup_error({"model": model})
    assert "model.snapshot_dir" in message
    assert "required" in message


def test_missing_model_table() -> None:
    assert "model.snapshot_dir" in startup_error({})


@pytest.mark.parametrize("data, section", [
    ({"model": "x"}, "[model]"),
    (config(driver={"options": 5}), "[driver.options]"),
])
def test_section_that_is_not_a_table(data: dict[str, Any], section: str) -> None:
    assert section in startup_error(data)


@pytest.mark.parametrize("driver", [5, "abc"])
def test_driver_that_is_not_a_table(driver: Any) -> None:
    assert "[driver]" in startup_error({"model": {"snapshot_dir": "/m"}, "driver": driver})


def test_llm_kwargs_key_must_be_identifier() -> None:
    message = startup_error(config(options={"llm_kwargs": {"not valid": 1}}))
    assert "driver.options.llm_kwargs" in message
    assert "'not valid'" in message


def test_pyexecutor_refuses_max_history_tokens() -> None:
    message = startup_error(config(options={"execution_mode": "pyexecutor", "max_history_tokens": 10}))
    assert "driver.options.max_history_tokens" in message


# ---------------------------------------------------------------- load_config


def test_relative_snapshot_dir_resolved_against_config_directory(tmp_path: Path) -> None:
    directory = tmp_path / "conf"
    directory.mkdir()
    path = directory / "driver.toml"
    path.write_text('[model]\nsnapshot_dir = "models/tiny"\n\n[driver]\ndevice = ["cpu"]\n\n'
                    '[driver.options]\nengine = "trtllm"\nlookahead_tokens = 4\n')
    cfg = load_config(path)
    assert cfg.model.snapshot_dir == str(directory / "models" / "tiny")
    assert cfg.model.name == "tiny"
    assert cfg.engine == "tensorrt_llm"
    assert cfg.options.lookahead_tokens == 4
    assert cfg.driver.device == ["cpu"]


def test_absolute_snapshot_dir_kept(tmp_path: Path) -> None:
    path = tmp_path / "driver.toml"
    path.write_text(f'[model]\nsnapshot_dir = "{tmp_path / "abs"}"\n')
    assert load_config(path).model.snapshot_dir == str(tmp_path / "abs")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "driver.toml"
    path.write_text("[model\nsnapshot_dir = \n")
    with pytest.raises(StartupError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid TOML" in message
    assert "\n" not in message


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "driver.toml"
    path.write_bytes(b'[model]\nsnapshot_dir = "\xff"\n')
    with pytest.raises(StartupError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(StartupError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "cannot read" in message
    assert "\n" not in message


def test_bad_config_in_file_names_key(tmp_path: Path) -> None:
    path = tmp_path / "driver.toml"
    path.write_text('[model]\nsnapshot_dir = "m"\n[driver.options]\nexecution_mode = "turbo"\n')
    with pytest.raises(StartupError) as info:
        load_config(path)
    assert "driver.options.execution_mode = 'turbo'" in str(info.value)


# ---------------------------------------------------------------- the real entry point


def test_bad_config_exits_with_one_stderr_line_and_no_ready_line(tmp_path: Path) -> None:
    path = tmp_path / "driver.toml"
    path.write_text('[model]\nsnapshot_dir = "m"\n[driver]\ndevice = ["cpu"]\n'
                    '[driver.options]\nengine = "reference"\nlookahead_tokens = 17\n')
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pie_driver_trtllm", "--config", str(path)],
                          capture_output=True, text=True, timeout=30, cwd=REPO, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "driver.options.lookahead_tokens" in lines[0]
    assert "17" in lines[0]
    assert elapsed < 10


@pytest.mark.parametrize("key", ["engine_step_timeout_s", "pyexecutor_worker_stop_timeout_s",
                                 "kv_cache_free_gpu_memory_fraction"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_numbers_must_be_finite(key: str, value: float) -> None:
    message = startup_error(config(options={key: value}))
    assert f"driver.options.{key}" in message and "finite" in message


@pytest.mark.parametrize("key, value", [
    ("max_frame_bytes", 2**61), ("engine_step_timeout_s", 1e12), ("max_batched_tokens", 2**40),
    ("max_concurrent_requests", 2**40), ("max_sampler_rows", 2**40), ("max_output_elements", 2**40),
    ("max_session_histories", 2**40), ("max_history_tokens", 2**33), ("max_seq_len", 2**33),
])
def test_sizes_have_upper_bounds(key: str, value: float) -> None:
    message = startup_error(config(options={key: value}))
    assert f"driver.options.{key} = {value!r}" in message and "out of range" in message


def test_trust_remote_code_defaults_to_false_for_the_reference_engine() -> None:
    assert parse_config(config(options={"engine": "reference"})).options.trust_remote_code is False
    assert parse_config(config(options={"engine": "trtllm"})).options.trust_remote_code is True
    assert parse_config(config(options={"engine": "reference", "trust_remote_code": True})).options.trust_remote_code


# ---------------------------------------------------------------- every refusal in the driver's words

KEYS = [("model", name) for name in ModelSection.__struct_fields__] + \
    [("driver", name) for name in DriverSection.__struct_fields__] + \
    [("driver.options", name) for name in DriverOptions.__struct_fields__]
TOML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@given(key=st.sampled_from(KEYS), value=TOML_VALUES)
@example(key=("driver", "device"), value=[["cpu"]])
@example(key=("driver.options", "llm_kwargs"), value={"kv_cache_config": 3})
@example(key=("driver", "random_seed"), value=2**64)
@example(key=("driver.options", "kv_cache_free_gpu_memory_fraction"), value=1.0)
def test_every_refusal_is_one_line_in_the_drivers_words(key: tuple[str, str], value: Any) -> None:
    section, name = key
    data = config()
    table = data["model"] if section == "model" else data.setdefault("driver", {})
    if section == "driver.options":
        table = table.setdefault("options", {})
    table[name] = value
    try:
        parse_config(data)
    except StartupError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("config: "), message
        assert f"{section}.{name}" in message, message
        assert "Expected `" not in message and "$." not in message, f"msgspec's own wording: {message}"


def test_a_table_key_that_is_not_a_string_is_named() -> None:
    assert startup_error(config(options={"llm_kwargs": {1: 2}})) == \
        "config: driver.options.llm_kwargs key 1 is not a string"


def test_a_pie_config_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "pie.toml"
    path.write_text('[[model]]\nname = "a"\n[model.driver]\ntype = "trtllm"\n')
    with pytest.raises(StartupError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config: {path} is a Pie config ([[model]] entries)")
