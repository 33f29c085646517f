"""Where the driver listens, and who may talk to it: the endpoint URL rules and the CURVE keys."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import zmq

from pie_driver_trtllm.config import StartupError

IPC_PATH_MAX = 107
_LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}


@dataclass(frozen=True)
class CurveKeys:
    """The server's CURVE key pair (Z85 bytes) and, optionally, the client public keys it admits."""

    secret_key: bytes
    public_key: bytes
    client_keys: frozenset[bytes] | None = None


def _read_key_file(path: str, what: str) -> str:
    try:
        mode = os.stat(path).st_mode
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"endpoint: cannot read the CURVE {what} {path}: {exc}") from None
    if what == "secret key file" and mode & 0o077:
        raise StartupError(f"endpoint: the CURVE secret key file {path} is readable by others "
                           f"(mode {oct(mode & 0o777)}); chmod 600 it")
    return text


def load_curve(secret_key_file: str | None, client_keys_file: str | None) -> CurveKeys | None:
    """Read the configured CURVE keys; None when CURVE is off."""
    if secret_key_file is None:
        return None
    if not zmq.has("curve"):
        raise StartupError("endpoint: CURVE keys are configured but this libzmq was built without CURVE")
    secret = _read_key_file(secret_key_file, "secret key file").strip().encode()
    try:
        public = zmq.curve_public(secret)
    except (zmq.ZMQError, ValueError):
        raise StartupError(f"endpoint: {secret_key_file} does not hold a 40-character Z85 CURVE secret key "
                           "(make one with python -c 'import zmq; print(zmq.curve_keypair()[1].decode())')") from None
    clients = None
    if client_keys_file is not None:
        lines = _read_key_file(client_keys_file, "client keys file").split()
        bad = [key for key in lines if len(key) != 40]
        if bad or not lines:
            raise StartupError(f"endpoint: {client_keys_file} must list 40-character Z85 public keys, one per "
                               f"line; got {bad[0]!r}" if bad else f"endpoint: {client_keys_file} lists no keys")
        clients = frozenset(key.encode() for key in lines)
    return CurveKeys(secret, public, clients)


class AllowedClients:
    """ZAP callback: admit a CURVE client only if its public key is listed."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


@dataclass
class Endpoint:
    url: str
    private_dir: str | None = None  # created by us, removed on exit
    socket_path: str | None = None


def resolve_endpoint(url: str | None, curve: bool = False) -> Endpoint:
    """The default is an ipc socket in a fresh 0700 directory; tcp stays on loopback unless CURVE is on."""
    if url is None:
        import tempfile

        private = tempfile.mkdtemp(prefix="pie-trtllm-", dir="/tmp")
        os.chmod(private, 0o700)
        path = os.path.join(private, "d.sock")
        return Endpoint(f"ipc://{path}", private, path)
    if url.startswith("ipc://"):
        path = url[len("ipc://"):]
        if len(path.encode()) > IPC_PATH_MAX:
            raise StartupError(f"endpoint: ipc path is {len(path.encode())} bytes, over the {IPC_PATH_MAX}-byte "
                               "limit of Unix sockets; choose a shorter path (e.g. under /tmp)")
        return Endpoint(url, None, path)
    if url.startswith("tcp://"):
        host = urlparse(url).hostname or ""
        if host not in _LOOPBACK and not curve:
            raise StartupError(f"endpoint: {url} binds beyond loopback; only 127.0.0.1 / [::1] are allowed "
                               "unless driver.options.curve_secret_key_file is set")
        return Endpoint(url)
    raise StartupError(f"endpoint: {url!r} is not an ipc:// or tcp:// URL")


def remove_endpoint_files(endpoint: Endpoint) -> None:
    if endpoint.socket_path and os.path.exists(endpoint.socket_path):
        os.unlink(endpoint.socket_path)
    if endpoint.private_dir:
        shutil.rmtree(endpoint.private_dir, ignore_errors=True)
