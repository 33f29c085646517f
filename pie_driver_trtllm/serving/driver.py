"""Driver start-up: config, engine, socket, the two handshake lines, then serve until told to stop."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from typing import Any, NoReturn, TextIO

from pie_driver_trtllm import DRIVER_NAME, PROTOCOL_MINOR, PROTOCOL_VERSION, __version__
from pie_driver_trtllm.config import SEED_MAX, DriverConfig, StartupError, load_config
from pie_driver_trtllm.core.driver_core import DriverCore
from pie_driver_trtllm.engines import load_engine
from pie_driver_trtllm.engines.base import Engine, rl_ops, sleep_levels
from pie_driver_trtllm.engines.faults import ENV_VAR as FAULTS_ENV_VAR
from pie_driver_trtllm.engines.tensorrt_llm.startup import ensure_library_path, require_package
from pie_driver_trtllm.replicas.router import ReplicaSet
from pie_driver_trtllm.serving.backend import LocalBackend
from pie_driver_trtllm.serving.endpoint import Endpoint, load_curve, release, resolve_endpoint
from pie_driver_trtllm.serving.engine_guard import GuardedEngine
from pie_driver_trtllm.serving.server import DriverServer
from pie_driver_trtllm.wire.codec import Limits


def build_limits(config: DriverConfig, engine: Engine) -> Limits:
    o = config.options
    return Limits(vocab_size=engine.model.vocab_size, max_model_len=engine.model.max_model_len,
                  max_forward_requests=o.max_concurrent_requests, max_forward_tokens=o.max_batched_tokens,
                  max_logprob_labels=o.max_logprob_labels if "logprobs" in engine.samplers else 0,
                  max_frame_bytes=o.max_frame_bytes, samplers=engine.samplers, max_sampler_rows=o.max_sampler_rows,
                  max_prob_rows=o.max_batched_tokens, max_logit_rows=o.max_batched_tokens,
                  max_output_elements=o.max_output_elements)


def build_caps(config: DriverConfig, engine: Engine, limits: Limits) -> dict[str, Any]:
    o = config.options
    return {
        "total_pages": o.virtual_total_pages, "kv_page_size": o.virtual_kv_page_size, "swap_pool_size": 0,
        "max_forward_tokens": limits.max_forward_tokens, "max_forward_requests": limits.max_forward_requests,
        "max_page_refs": o.virtual_total_pages, "max_logit_rows": limits.max_logit_rows,
        "max_prob_rows": limits.max_prob_rows, "max_custom_mask_bytes": 0, "max_sampler_rows": limits.max_sampler_rows,
        "max_output_elements": limits.max_output_elements,
        "max_logprob_labels": limits.max_logprob_labels, "max_sampler_tokens": limits.max_sampler_tokens,
        "activation_dtype": config.driver.activation_dtype,
        "supports_user_attention_mask": False, "supports_adapters": False,
        "samplers": sorted(engine.samplers), "lookahead_tokens": o.lookahead_tokens,
        "tensor_parallel_size": 1, "replicas": len(config.driver.device), "devices": list(config.driver.device),
        "arch_name": engine.model.arch_name, "vocab_size": engine.model.vocab_size,
        "max_model_len": engine.model.max_model_len, "snapshot_dir": config.model.snapshot_dir,
        "rl_ops": rl_ops(engine), "sleep_levels": sleep_levels(engine),
    }


def build_handshake(config: DriverConfig, engine: Engine, caps: dict[str, Any]) -> dict[str, Any]:
    m = engine.model
    return {
        "protocol": PROTOCOL_VERSION,
        "protocol_version": [PROTOCOL_VERSION, PROTOCOL_MINOR],
        "driver": {"name": DRIVER_NAME, "version": __version__},
        "engine": {"kind": engine.kind, "version": engine.version, "execution_mode": engine.execution_mode},
        "model": {"name": m.name, "arch_name": m.arch_name, "vocab_size": m.vocab_size,
                  "max_model_len": m.max_model_len, "eos_token_id": m.eos_token_id},
        "caps": caps,
    }


PARENT_POLL_S = 0.2
MIN_OPEN_FILES = 2048  # below this many descriptors a few hundred hosts could exhaust them
FD_RESERVE = 1024  # descriptors beyond max_connections: model files, replicas, connections not yet closed
MAX_OPEN_FILES = 1 << 20  # never ask for more, however high the hard limit is


def raise_open_files_limit(needed: int = MIN_OPEN_FILES) -> int:
    """Raise the soft open-files limit to the hard one (each connection holds a descriptor, and libzmq
    aborts when accepting one fails for lack of them); refuse to start below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise StartupError(f"endpoint: the open-files limit is {soft} (hard limit {hard}); the driver needs at "
                           f"least {needed} (max_connections + {FD_RESERVE}, at least {MIN_OPEN_FILES}): raise it "
                           "(ulimit -n)")
    return soft


class StopDuringStartup(BaseException):
    """SIGTERM or SIGINT before the driver serves: unwinds start-up so that what it made is removed."""


def watch_parent(parent: int) -> None:
    """SIGTERM this process once its parent process exits, whichever of the parent's threads spawned it.

    (PR_SET_PDEATHSIG would fire when the spawning *thread* exits, which kills a driver started from a
    short-lived thread.) The signal takes the same path as a host's SIGTERM: start-up unwinds, or the
    server stops.
    """
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="driver-parent-watch", daemon=True).start()


def _stop_during_startup(signum: int, frame: object) -> None:
    raise StopDuringStartup(signum)


def check_handshake_fd(fd: int | None) -> None:
    """Refuse a `--handshake-fd` that is not open for writing, before anything else starts."""
    if fd is None:
        return
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except (OSError, OverflowError, ValueError):
        raise StartupError(f"--handshake-fd {fd} is not an open file descriptor (the host opens it for the "
                           "driver; leave the option out to write the handshake to stdout)") from None
    if mode == os.O_RDONLY:
        raise StartupError(f"--handshake-fd {fd} is open for reading only; the driver writes its handshake "
                           "lines to it")


def _handshake_stream(fd: int | None) -> TextIO:
    """The stream for the two handshake lines; standard output then carries stderr's text instead."""
    sys.stdout.flush()
    target = os.dup(1) if fd is None or fd == 1 else fd
    os.dup2(2, 1)  # libraries that print (TensorRT-LLM's banner) must not corrupt the handshake
    return os.fdopen(target, "w", buffering=1)


class _OneLineParser(argparse.ArgumentParser):
    """A usage error in one line on stderr and exit status 2, as the rest of the command line does it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{DRIVER_NAME}: {message} (see `{self.prog} --help`)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m pie_driver_trtllm", description="Pie driver for TensorRT-LLM")
    parser.add_argument("--config", required=True, help="startup TOML written by the host")
    parser.add_argument("--handshake-fd", type=int, default=None, help="fd for the handshake lines (default stdout)")
    parser.add_argument("--endpoint", default=None, help="ipc:// or tcp:// URL (default: private ipc socket)")
    parser.add_argument("--replica", type=int, default=None, help=argparse.SUPPRESS)  # set by the replica router
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parent = os.getppid()
    signal.signal(signal.SIGTERM, _stop_during_startup)
    signal.signal(signal.SIGINT, _stop_during_startup)
    watch_parent(parent)
    try:
        return _main(args, argv, parent)
    except StopDuringStartup:
        print(f"{DRIVER_NAME}: stopped by a signal during start-up", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, argv: list[str] | None, parent: int) -> int:
    try:
        check_handshake_fd(args.handshake_fd)
        config = load_config(args.config)
        raise_open_files_limit(max(MIN_OPEN_FILES, config.options.max_connections + FD_RESERVE))
        if args.replica is not None:
            select_replica(config, args.replica)
        if config.engine == "tensorrt_llm" and len(config.driver.device) == 1:
            require_package()
            ensure_library_path(sys.argv[1:] if argv is None else argv)  # may re-exec this process once
    except StartupError as exc:
        print(f"{DRIVER_NAME}: {exc}", file=sys.stderr)
        return 2
    handshake_out = _handshake_stream(args.handshake_fd)
    endpoint = None
    close = None
    stopped_by: list[int] = []
    try:
        curve = load_curve(config.options.curve_secret_key_file, config.options.curve_client_keys_file)
        endpoint = resolve_endpoint(args.endpoint, curve=curve is not None)
        backend, handshake, limits, close = _build_backend(config, args.config, endpoint)
        server = DriverServer(endpoint, limits, backend, handshake, parent_pid=parent, curve=curve,
                              busy_poll_s=config.options.busy_poll_us / 1e6,
                              max_queued=config.options.max_queued_requests,
                              max_queued_bytes=config.options.max_queued_bytes,
                              max_connections=config.options.max_connections,
                              max_unread_reply_bytes=config.options.max_unread_reply_bytes,
                              stage_times=config.options.stage_times,
                              stream_socket=config.options.stream_socket,
                              rehearse=config.options.rehearse_steps)

        def request_stop(signum: int, frame: object) -> None:
            stopped_by.append(signum)
            server.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
    except BaseException as exc:
        if endpoint is not None:
            release(endpoint)
        if close is not None:
            close()
        if not isinstance(exc, StartupError):
            raise
        print(f"{DRIVER_NAME}: {exc}", file=sys.stderr)
        return 2
    if config.options.trust_remote_code:  # after loading, so that a start-up failure stays one line
        print(f"{DRIVER_NAME}: warning: trust_remote_code is true: a checkpoint's own Python code (auto_map) "
              "ran at load", file=sys.stderr)
    line: dict[str, Any] = {"group_id": config.driver.group_id, "endpoint": endpoint.url}
    if server.stream_url is not None:
        line["stream_endpoint"] = server.stream_url
    handshake_out.write(json.dumps({**line, "caps": handshake["caps"]}) + "\n")
    handshake_out.write(json.dumps({"ready": True, "num_groups": 1}) + "\n")
    handshake_out.close()
    try:
        server.serve()
    finally:
        close()
    # Ctrl-C is the shell's 130; SIGTERM is how a host stops its driver, an ordinary 0.
    return 128 + signal.SIGINT if signal.SIGINT in stopped_by else 0


def select_replica(config: DriverConfig, index: int) -> None:
    """In a replica subprocess: keep only its own device (the parent already pinned CUDA_VISIBLE_DEVICES)."""
    devices = config.driver.device
    if not 0 <= index < len(devices):
        raise StartupError(f"--replica {index} is outside driver.device ({len(devices)} entries)")
    device = devices[index]
    if device.startswith("cuda:") and os.environ.get("CUDA_VISIBLE_DEVICES") == device.split(":", 1)[1]:
        device = "cuda:0"  # the only GPU this process can see
    config.driver.device = [device]
    if config.driver.random_seed is not None:  # replicas drawing one sequence would give alike samples
        config.driver.random_seed = (config.driver.random_seed + index) % (SEED_MAX + 1)


def _build_backend(config: DriverConfig, config_path: str, endpoint: Endpoint) -> tuple[Any, ...]:
    """One device: the core in this process. Several: a replica subprocess per device behind a router."""
    if len(config.driver.device) > 1:
        private_dir = endpoint.private_dir or tempfile.mkdtemp(prefix="pie-trtllm-r-", dir="/tmp")
        replicas = ReplicaSet(config_path, config.driver.device, private_dir)
        handshake = replicas.handshake
        caps, model = handshake["caps"], handshake["model"]  # forward caps: N replicas' worth (replica_batches)
        limits = Limits(vocab_size=model["vocab_size"], max_model_len=model["max_model_len"],
                        max_forward_requests=caps["max_forward_requests"],
                        max_forward_tokens=caps["max_forward_tokens"],
                        max_logprob_labels=caps["max_logprob_labels"], max_frame_bytes=config.options.max_frame_bytes,
                        samplers=frozenset(caps["samplers"]), max_sampler_tokens=caps["max_sampler_tokens"],
                        max_sampler_rows=caps["max_sampler_rows"],
                        max_prob_rows=caps["max_prob_rows"], max_logit_rows=caps["max_logit_rows"],
                        max_output_elements=caps["max_output_elements"])
        return replicas, handshake, limits, replicas.close
    engine = _wrap_engine(load_engine(config, config.driver.device[0]), config)
    core = DriverCore(engine, max_contexts=config.options.max_session_histories,
                      lookahead_tokens=config.options.lookahead_tokens, random_seed=config.driver.random_seed,
                      max_total_tokens=config.options.max_total_history_tokens)
    limits = build_limits(config, engine)
    handshake = build_handshake(config, engine, build_caps(config, engine, limits))
    return LocalBackend(core, config.driver.device[0]), handshake, limits, engine.close


def _wrap_engine(engine: Engine, config: DriverConfig) -> Engine:
    """Test-only fault injection when its variable is set, then the engine thread and its deadline."""
    faults = os.environ.get(FAULTS_ENV_VAR)
    if faults:
        from pie_driver_trtllm.engines.faults import FaultyEngine, parse_faults

        engine = FaultyEngine(engine, parse_faults(faults))
    timeout = config.options.engine_step_timeout_s
    return GuardedEngine(engine, timeout)
