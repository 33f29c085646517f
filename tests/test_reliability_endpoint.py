"""Endpoint ownership and process faults: a live ipc path is never taken over, only the socket this process
bound is removed, tcp URLs are checked as bound, key files are checked for who may change them, and the
driver follows its parent process (not the thread that spawned it) and cleans up when stopped early."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zmq
from conftest import write_config

from pie_driver_trtllm.client import DriverClient, DriverFailed, spawn
from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.serving.endpoint import (
    check_bound_address,
    load_curve,
    note_bound,
    release,
    resolve_endpoint,
)


@pytest.mark.parametrize("url", ["tcp://127.1:*", "tcp://127.0.0.1:5555", "tcp://localhost:*", "tcp://[::1]:*",
                                 "tcp://127.255.0.9:80"])
def test_loopback_forms_are_accepted(url):
    assert resolve_endpoint(url).url == url


@pytest.mark.parametrize("url", [
    "tcp://0.0.0.0:5555@127.0.0.1", "tcp://0.0.0.0:5555;127.0.0.1:5555", "tcp://user@127.0.0.1:5555",
    "tcp://127.0.0.1:5555/x", "tcp://127.0.0.1:5555?a=1", "tcp://127.0.0.1", "tcp://*:5555", "tcp://0.0.0.0:*",
    "tcp://[::]:*", "tcp://[::ffff:0.0.0.0]:*", "tcp://eth0:5555", "tcp://127.0.0.1 :5555", "tcp://10.0.0.1:5",
])
def test_url_tricks_are_refused_without_curve(url):
    with pytest.raises(StartupError, match="endpoint"):
        resolve_endpoint(url)


def test_the_bound_address_is_checked():
    check_bound_address("tcp://[::ffff:127.0.0.1]:4000", curve=False)
    check_bound_address("tcp://127.0.0.1:4000", curve=False)
    for bound in ("tcp://[::ffff:0.0.0.0]:5599", "tcp://0.0.0.0:5599", "tcp://[::]:1"):
        with pytest.raises(StartupError, match="beyond loopback"):
            check_bound_address(bound, curve=False)
        check_bound_address(bound, curve=True)


def test_a_live_ipc_path_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "live.sock"
    other = zmq.Context.instance().socket(zmq.ROUTER)
    other.bind(f"ipc://{path}")
    try:
        with pytest.raises(StartupError, match="live"):
            resolve_endpoint(f"ipc://{path}")
        assert path.is_socket()
    finally:
        other.close(0)


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_an_ipc_path_that_is_not_a_socket_is_refused_and_kept(tmp_path, kind):
    path = tmp_path / "x.sock"
    if kind == "file":
        path.write_text("precious")
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StartupError, match="not a socket"):
        resolve_endpoint(f"ipc://{path}")
    assert path.is_symlink() if kind == "symlink" else path.exists()
    if kind == "file":
        assert path.read_text() == "precious"


def test_a_stale_socket_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays; nobody listens
    endpoint = resolve_endpoint(f"ipc://{path}")
    assert not path.exists()
    release(endpoint)


def test_a_claimed_path_is_refused_to_a_second_claimant_until_released(tmp_path):
    url = f"ipc://{tmp_path / 'd.sock'}"
    first = resolve_endpoint(url)
    with pytest.raises(StartupError, match="in use"):
        resolve_endpoint(url)
    release(first)
    release(resolve_endpoint(url))
    assert not (tmp_path / "d.sock.lock").exists()


def test_release_removes_only_the_socket_this_process_bound(tmp_path):
    path = tmp_path / "d.sock"
    endpoint = resolve_endpoint(f"ipc://{path}")
    release(endpoint)  # never bound: nothing there to remove, nothing removed
    endpoint = resolve_endpoint(f"ipc://{path}")
    context = zmq.Context()
    ours = context.socket(zmq.ROUTER)
    ours.bind(f"ipc://{path}")
    note_bound(endpoint)
    ours.close(0)
    context.term()
    path.unlink()
    replacement = socket.socket(socket.AF_UNIX)
    replacement.bind(str(path))  # someone else's socket now
    try:
        release(endpoint)
        assert path.is_socket()
    finally:
        replacement.close()


def test_a_world_writable_client_keys_file_is_refused(tmp_path):
    if not zmq.has("curve"):
        pytest.skip("libzmq without CURVE")
    public, secret = zmq.curve_keypair()
    secret_file = tmp_path / "server.key"
    secret_file.write_text(secret.decode())
    secret_file.chmod(0o600)
    clients = tmp_path / "clients.txt"
    clients.write_text(public.decode() + "\n")
    for mode in (0o666, 0o646, 0o664):
        clients.chmod(mode)
        with pytest.raises(StartupError, match="writable by others"):
            load_curve(str(secret_file), str(clients))
    clients.chmod(0o644)
    assert load_curve(str(secret_file), str(clients)).client_keys == {public}


@pytest.mark.slow
def test_a_second_driver_on_a_live_path_is_refused_and_the_first_keeps_serving(tmp_path, tiny_model):
    path = tmp_path / "d.sock"
    first = spawn(write_config(tmp_path, tiny_model), endpoint=f"ipc://{path}")
    try:
        broken = tmp_path / "broken"
        broken.mkdir()
        for config in (write_config(broken, tiny_model), write_config(broken, broken / "no-model")):
            with pytest.raises(DriverFailed, match=r"in use|live"):
                spawn(config, endpoint=f"ipc://{path}")
        assert DriverClient(first.endpoint).call("health")["status"] == "ok"
    finally:
        first.stop()
    assert not path.exists() and not Path(str(path) + ".lock").exists()


@pytest.mark.slow
def test_an_ipc_directory_is_a_one_line_start_up_error(tmp_path, tiny_model):
    (tmp_path / "dir.sock").mkdir()
    result = subprocess.run([sys.executable, "-m", "pie_driver_trtllm", "--config",
                             str(write_config(tmp_path, tiny_model)), "--endpoint", f"ipc://{tmp_path}/dir.sock"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a socket" in result.stderr and "Traceback" not in result.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_a_driver_spawned_from_a_thread_that_exits_lives_until_its_parent_exits(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import threading, time
        from pie_driver_trtllm.client import spawn
        started = []
        thread = threading.Thread(target=lambda: started.append(spawn({str(config)!r})))
        thread.start()
        thread.join()
        print(started[0].process.pid, started[0].endpoint, flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        pid, url = parent.stdout.readline().split()
        time.sleep(1.0)  # the spawning thread is gone by now
        assert _alive(int(pid)) and DriverClient(url).call("health")["status"] == "ok"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(int(pid)):
            time.sleep(0.1)
        assert not _alive(int(pid))
    finally:
        parent.kill()


@pytest.mark.slow
def test_sigterm_during_start_up_removes_what_start_up_made(tmp_path, tiny_model):
    lock = tmp_path / "d.sock.lock"  # made with the endpoint, like the default private directory
    process = subprocess.Popen([sys.executable, "-m", "pie_driver_trtllm", "--config",
                                str(write_config(tmp_path, tiny_model)), "--endpoint", f"ipc://{tmp_path}/d.sock"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not lock.exists():  # the endpoint is claimed: the model is loading
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and b"Traceback" not in stderr
    assert stderr.decode().strip().splitlines()[-1] == "pie-driver-trtllm: stopped by a signal during start-up"
    assert not lock.exists() and not (tmp_path / "d.sock").exists()


@pytest.mark.slow
def test_sigterm_while_replicas_start_removes_them_and_the_private_directory(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, driver={"device": ["cpu", "cpu"]})
    before = set(Path("/tmp").glob("pie-trtllm-*"))
    process = subprocess.Popen([sys.executable, "-m", "pie_driver_trtllm", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def replicas() -> list[str]:  # processes started with this config and --replica
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if str(config).encode() in args and b"--replica" in args:
                found.append(cmdline.parent.name)
        return found

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not replicas():  # the endpoint is made and a replica starts
        time.sleep(0.01)
    made = set(Path("/tmp").glob("pie-trtllm-*")) - before
    assert made and replicas()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2, stderr
    assert stderr.decode().strip().splitlines()[-1] == "pie-driver-trtllm: stopped by a signal during start-up"
    assert not any(path.exists() for path in made)
    deadline = time.monotonic() + 10
    while replicas():
        assert time.monotonic() < deadline, "a replica outlived the driver's start-up"
        time.sleep(0.05)


def _driver_under_fd_limit(config: Path, soft: int, hard: int) -> subprocess.Popen:
    launcher = ("import resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
                "sys.argv = ['pie_driver_trtllm', '--config', sys.argv[1]]; "
                "runpy.run_module('pie_driver_trtllm', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", launcher, str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_the_open_files_limit_is_raised_to_the_hard_limit_or_start_up_refused(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model)
    refused = _driver_under_fd_limit(config, 512, 1024)
    _, stderr = refused.communicate(timeout=120)
    assert refused.returncode == 2 and "open-files limit is 1024" in stderr and "Traceback" not in stderr
    raised = _driver_under_fd_limit(config, 1024, 4096)
    try:
        assert "caps" in raised.stdout.readline()
        limits = Path(f"/proc/{raised.pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["4096", "4096"]
                   for line in limits.splitlines())
    finally:
        raised.terminate()
        raised.wait(60)


def test_an_abstract_ipc_name_makes_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    endpoint = resolve_endpoint("ipc://@pie-test-abstract")
    assert endpoint.socket_path is None and endpoint.lock_fd is None and not list(tmp_path.iterdir())


def test_an_ipc_path_of_107_bytes_is_taken_and_one_of_108_refused(tmp_path):
    base = f"/tmp/pie-len-{tmp_path.name[:8]}-"
    taken = resolve_endpoint("ipc://" + base + "x" * (107 - len(base)))
    try:
        assert taken.socket_path is not None and len(taken.socket_path.encode()) == 107
    finally:
        release(taken)
    with pytest.raises(StartupError, match="108 bytes, over the 107-byte limit"):
        resolve_endpoint("ipc://" + base + "x" * (108 - len(base)))
