"""`doctor`'s checks for the known real-world start failures of TensorRT-LLM 1.2.1."""

from __future__ import annotations

from pie_driver_trtllm.tools.doctor import nvidia_driver_version, probe_wheels, trtllm_runtime_checks


def by_name(checks: list) -> dict[str, object]:
    return {c.name: c for c in checks}


def test_a_ready_machine_passes() -> None:
    probe = {"torch": {"version": "2.9.1+cu130"}, "wheels": {"nvidia-cublas": "13.0.2.14"}}
    checks = by_name(trtllm_runtime_checks(probe, {"PATH": "/usr/bin"}, "580.95.05"))
    assert {name: c.status for name, c in checks.items()} == {
        "MPI launcher variables": "PASS", "torch for TensorRT-LLM": "PASS", "cuBLAS (CUDA 13) wheel": "PASS",
        "NVIDIA driver": "PASS"}


def test_each_known_start_failure_is_named_with_its_fix() -> None:
    probe = {"torch": {"version": "2.8.0+cu128"}, "wheels": {"nvidia-cublas-cu12": "12.8.4.1"}}
    env = {"OMPI_COMM_WORLD_SIZE": "4", "SLURM_JOB_ID": "7", "PMIX_RANK": "0"}
    checks = by_name(trtllm_runtime_checks(probe, env, "550.54.15"))
    launcher = checks["MPI launcher variables"]
    assert launcher.status == "WARN" and "OMPI_COMM_WORLD_SIZE" in launcher.found and "unset" in launcher.fix
    assert checks["torch for TensorRT-LLM"].status == "WARN" and "2.9.1" in checks["torch for TensorRT-LLM"].fix
    assert checks["cuBLAS (CUDA 13) wheel"].status == "WARN" and "nvidia-cublas-cu12" in checks[
        "cuBLAS (CUDA 13) wheel"].found
    assert checks["NVIDIA driver"].status == "FAIL" and "580" in checks["NVIDIA driver"].fix


def test_no_driver_found_is_a_warning_and_the_probes_run_here() -> None:
    assert by_name(trtllm_runtime_checks({}, {}, None))["NVIDIA driver"].status == "WARN"
    assert isinstance(probe_wheels(), dict)
    assert nvidia_driver_version() is None or nvidia_driver_version()[0].isdigit()
