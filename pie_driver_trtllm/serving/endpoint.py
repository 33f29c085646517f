"""Where the driver listens, and who may talk to it: the endpoint URL rules and the CURVE keys."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq

from pie_driver_trtllm.config import StartupError

IPC_PATH_MAX = 107
# host:port, nothing else: no user part, path, query, interface-and-source pair or second address.
_TCP_URL = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*|\*):([0-9]{1,5}|\*)")


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
    if what == "client keys file" and mode & 0o022:  # whoever may write it decides who connects
        raise StartupError(f"endpoint: the CURVE client keys file {path} is writable by others "
                           f"(mode {oct(mode & 0o777)}); chmod 644 it")
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
    lock_fd: int | None = None  # an explicit ipc path: the lock held beside it while this process owns it
    bound: tuple[int, int, int] | None = None  # the ipc socket this process bound: see `_identity`


def resolve_endpoint(url: str | None, curve: bool = False) -> Endpoint:
    """The default is an ipc socket in a fresh 0700 directory; tcp stays on loopback unless CURVE is on.
    An explicit ipc path is claimed here: refused while another process serves it."""
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
        if not path or "\0" in path:
            raise StartupError(f"endpoint: {url!r} names no usable ipc path")
        if path.startswith("@"):  # Linux abstract namespace: no file, and the kernel refuses a name in use
            return Endpoint(url)
        endpoint = Endpoint(url, None, path, lock_fd=_lock_beside(path))
        try:
            check_free(endpoint)
        except StartupError:
            release(endpoint)
            raise
        return endpoint
    if url.startswith("tcp://"):
        match = _TCP_URL.fullmatch(url)
        if match is None:
            raise StartupError(f"endpoint: {url[:200]!r} is not tcp://HOST:PORT (an IP address, localhost or a "
                               "host name, and a port number or *)")
        if not curve and not _is_loopback(match.group(1)):
            raise StartupError(f"endpoint: {url} binds beyond loopback; only loopback addresses (127.0.0.0/8, "
                               "[::1], localhost) are allowed unless driver.options.curve_secret_key_file is set")
        return Endpoint(url)
    raise StartupError(f"endpoint: {url[:200]!r} is not an ipc:// or tcp:// URL")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    if host.startswith("["):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(host))  # the short forms too: 127.1
        except OSError:
            return False  # a host name or an interface: only with CURVE
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def check_bound_address(last_endpoint: str, curve: bool) -> None:
    """What the socket really listens on (ZeroMQ's LAST_ENDPOINT) must be loopback without CURVE."""
    if curve or not last_endpoint.startswith("tcp://"):
        return
    host = last_endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if not _is_loopback(host):
        raise StartupError(f"endpoint: the socket listens on {last_endpoint}, beyond loopback; refused without "
                           "driver.options.curve_secret_key_file")


def _lock_beside(path: str) -> int:
    """An exclusive lock on PATH.lock, held for the process's life: a second driver on the path is refused
    even while the first is still loading its model and has not bound yet."""
    lock_path = path + ".lock"
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StartupError(f"endpoint: cannot create the lock file {lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"endpoint: ipc://{path} is in use by another driver (its lock {lock_path} is "
                               "held)") from None
        try:
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its owner removed it as we locked it: lock the new one


def check_free(endpoint: Endpoint) -> None:
    """The ipc path must be free, or a socket nobody serves (removed then). Anything else is refused:
    a live socket, a regular file, a directory."""
    path = endpoint.socket_path
    assert path is not None
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"endpoint: cannot inspect ipc path {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(info.st_mode):
        raise StartupError(f"endpoint: ipc path {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket: its owner is gone, and this process holds the lock
        return
    except OSError as exc:
        raise StartupError(f"endpoint: ipc path {path} cannot be probed: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"endpoint: ipc path {path} is served by a live process; choose another path")


def note_bound(endpoint: Endpoint) -> None:
    """Remember which socket file this process bound: only that one is removed at exit."""
    if endpoint.socket_path:
        endpoint.bound = _identity(os.lstat(endpoint.socket_path))


def _identity(info: os.stat_result) -> tuple[int, int, int]:
    # The inode alone is not enough: a file made right after another's removal often gets its number.
    return info.st_dev, info.st_ino, info.st_ctime_ns


def release(endpoint: Endpoint) -> None:
    """Remove what this process made: the socket it bound (if the path still holds it), its lock, and
    its private directory. Never a file some other process put there."""
    path = endpoint.socket_path
    if path and endpoint.bound is not None:
        with contextlib.suppress(OSError):
            if _identity(os.lstat(path)) == endpoint.bound:
                os.unlink(path)
        endpoint.bound = None
    if endpoint.lock_fd is not None:
        with contextlib.suppress(OSError):
            if path and os.stat(path + ".lock").st_ino == os.fstat(endpoint.lock_fd).st_ino:
                os.unlink(path + ".lock")
        os.close(endpoint.lock_fd)
        endpoint.lock_fd = None
    if endpoint.private_dir:
        shutil.rmtree(endpoint.private_dir, ignore_errors=True)

