"""`validate` and `list` on full Pie configs: [[model]] entries, [model.driver] aliases, offending lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pie_driver_trtllm.tools.cli import app
from pie_driver_trtllm.tools.pie_config import find_line, load_pie_config

GOOD = """# Pie server config
[[model]]
name = "chat"
hf_repo = "Qwen/Qwen3-0.6B"

[model.driver]
type = "vllm"
device = "cuda:1"

[[model]]
name = "llama"
hf_repo = "meta-llama/Llama-3.2-1B"

[model.driver]
type = "{type}"
device = ["cuda:0", "cuda:2"]
tensor_parallel_size = 1
activation_dtype = "bfloat16"

[model.driver.options]
venv = "/home/me/.pie/venvs/tensorrt_llm"
max_batch_size = 64
lookahead_tokens = 8
"""


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("kind", ["tensorrt_llm", "tensorrt-llm", "trtllm"])
def test_valid_config_and_type_aliases(tmp_path: Path, kind: str) -> None:
    result = run("validate", str(write(tmp_path, GOOD.replace("{type}", kind))))
    assert result.exit_code == 0, result.output
    assert "2 [[model]] entry(ies), 1 for this driver, no problems" in result.output


@pytest.mark.parametrize(("old", "new", "needle", "message"), [
    ("lookahead_tokens = 8", "lookahead_tokens = 99", "lookahead_tokens = 99",
     "model.driver.options.lookahead_tokens = 99 is out of range; expected 1..16"),
    ("lookahead_tokens = 8", "lookahed_tokens = 8", "lookahed_tokens",
     "unknown key model.driver.options.lookahed_tokens"),
    ("tensor_parallel_size = 1", "tensor_parallel_size = 2", "tensor_parallel_size = 2",
     "tensor_parallel_size must be 1"),
    ('activation_dtype = "bfloat16"', 'activation_dtype = "bf17"', "bf17", "activation_dtype = 'bf17'"),
    ('activation_dtype = "bfloat16"', 'activaton_dtype = "bfloat16"', "activaton_dtype",
     "unknown key `activaton_dtype` in [model.driver]"),
    ("max_batch_size = 64", "max_num_seqs = 64", "max_num_seqs", "`max_num_seqs` is not accepted"),
    ('venv = "/home/me/.pie/venvs/tensorrt_llm"', 'venv = "/v"\npython = "/p"', 'python = "/p"', "pick one"),
    ('device = ["cuda:0", "cuda:2"]', 'device = ["cuda:0", "gpu2"]', '"gpu2"', "'gpu2' is not allowed"),
    ('device = ["cuda:0", "cuda:2"]', 'device = ["cuda:1"]', 'device = ["cuda:1"]', "claimed by both"),
])
def test_validate_points_at_the_offending_line(tmp_path: Path, old: str, new: str, needle: str,
                                               message: str) -> None:
    text = GOOD.replace("{type}", "tensorrt_llm").replace(old, new)
    path = write(tmp_path, text)
    result = run("validate", str(path))
    assert result.exit_code == 1, result.output
    line = line_of(text, needle)
    assert f"{path}:{line}: [[model]] #2" in result.output or f"{path}:{line}: device" in result.output, \
        result.output
    assert message in result.output
    assert f"  {line:>4} | {text.splitlines()[line - 1]}" in result.output, "the offending line is shown"


def test_validate_reports_toml_syntax_errors_with_their_line(tmp_path: Path) -> None:
    text = GOOD.replace("{type}", "trtllm").replace("lookahead_tokens = 8", "lookahead_tokens = = 8")
    path = write(tmp_path, text)
    result = run("validate", str(path))
    assert result.exit_code == 1
    assert f"{path}:{line_of(text, '= = 8')}: not valid TOML" in result.output


def test_line_finder_handles_dotted_keys_and_inline_tables() -> None:
    text = ('[[model]]\nname = "a"\ndriver.type = "trtllm"\n\n[[model]]\nname = "b"\n[model.driver]\n'
            'type = "trtllm"\noptions = { engine = "reference", lookahead_tokens = 99 }\n')
    assert find_line(text, 0, "model.driver", "type") == 3
    assert find_line(text, 1, "model.driver", "type") == 8
    assert find_line(text, 1, "model.driver.options", "lookahead_tokens") == 9
    assert find_line(text, 1, "model") == 5


def test_validate_without_this_driver_warns_and_passes(tmp_path: Path) -> None:
    text = GOOD.replace("{type}", "sglang")
    result = run("validate", str(write(tmp_path, text)))
    assert result.exit_code == 0 and "no [[model]] entry uses type" in result.output


def test_validate_accepts_a_driver_startup_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    path = write(tmp_path, '[model]\nsnapshot_dir = "m"\n\n[driver]\ndevice = ["cpu"]\n')
    assert run("validate", str(path)).exit_code == 0
    path.write_text('[model]\nsnapshot_dir = "m"\n\n[driver]\ndevice = ["tpu"]\n')
    result = run("validate", str(path))
    assert result.exit_code == 1 and "driver.device entry 'tpu'" in result.output


def test_list_shows_driver_types_and_which_models_use_this_driver(tmp_path: Path) -> None:
    result = run("list", "-c", str(write(tmp_path, GOOD.replace("{type}", "tensorrt-llm"))))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Subprocess drivers (Python wheels):"
    assert any(line.split()[:1] == ["tensorrt_llm"] and "this driver" in line for line in lines)
    assert any(line.split()[:1] == ["vllm"] for line in lines)
    assert "  1. chat: type vllm, devices cuda:1" in lines
    assert "  2. llama: type tensorrt-llm, devices cuda:0, cuda:2  <- this driver" in lines


def test_load_pie_config_models() -> None:
    cfg = load_pie_config(Path("/nonexistent/config.toml"))
    assert cfg.problems and "cannot read" in cfg.problems[0].message
