"""The driver's ROUTER socket: its options, CURVE (with a ZAP thread when clients are listed), the bind,
and the check of where it really listens."""

from __future__ import annotations

import os
from typing import Any

import zmq

from pie_driver_trtllm.config import StartupError
from pie_driver_trtllm.serving import endpoint as endpoints
from pie_driver_trtllm.serving.connection_cap import ConnectionCap
from pie_driver_trtllm.serving.endpoint import AllowedClients, CurveKeys, Endpoint

HARD_CAP_FACTOR = 4  # ZeroMQ drops a peer whose message exceeds this many times the frame limit
RECEIVE_HWM = 64  # messages ZeroMQ queues per connection before it stops reading that connection
SEND_HWM = 256  # replies ZeroMQ queues per connection; it learns of reads in batches of half that


class Delimited(bytes):
    """The routing identity of a peer whose message carried an empty delimiter frame (a `REQ` socket, or
    a `DEALER` speaking like one): its reply goes back with the delimiter, or a `REQ` drops it."""

    __slots__ = ()


def read_message(router: zmq.Socket) -> tuple[bytes, Any, int]:
    """One message off the ROUTER (raises zmq.Again when none waits): the sender's identity (`Delimited`
    after an empty delimiter), its first frame, and how many frames it had. Frames past the first are
    counted, not kept, so a message of a million parts costs no list (libzmq holds it whole until then)."""
    identity = router.recv(zmq.NOBLOCK)
    if not router.rcvmore:
        return identity, None, 0
    frame = router.recv(copy=False)
    more = router.rcvmore  # asked once per part: a message of one frame costs what recv_multipart did
    if more and not frame.buffer:  # the delimiter, kept in the reply's envelope
        identity, frame = Delimited(identity), router.recv(copy=False)
        more = router.rcvmore
    count = 1
    while more:
        router.recv()
        count += 1
        more = router.rcvmore
    return identity, frame, count


class Listener:
    """The bound ROUTER socket and what closes with it: the connection cap and the ZAP thread. If the
    bind fails, everything made is closed, the endpoint released, and the StartupError raised."""

    def __init__(self, context: zmq.Context, endpoint: Endpoint, max_frame_bytes: int, curve: CurveKeys | None,
                 max_connections: int) -> None:
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes * HARD_CAP_FACTOR)
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.router.setsockopt(zmq.SNDHWM, SEND_HWM)
        if endpoint.url.startswith("tcp://["):
            self.router.setsockopt(zmq.IPV6, 1)
        self.auth = self._secure(context, curve) if curve is not None else None
        self.connections = ConnectionCap(context, self.router, max_connections)
        try:
            self._bind(endpoint, curve is not None)
        except StartupError:
            self.close(linger=0)
            endpoints.release(endpoint)
            raise

    def close(self, linger: int | None = None) -> None:
        self.connections.close()
        self.router.close(linger)
        if self.auth is not None:
            self.auth.stop()

    def _bind(self, endpoint: Endpoint, curve: bool) -> None:
        """Bind where the endpoint says and check where the socket really listens."""
        if endpoint.socket_path and endpoint.private_dir is None:
            endpoints.check_free(endpoint)  # again: the model took a while to load
        umask = os.umask(0o077)  # the socket file is private from its creation, not from a chmod after it
        try:
            self.router.bind(endpoint.url)
        except zmq.ZMQError as exc:
            raise StartupError(f"endpoint: cannot bind {endpoint.url[:200]}: {exc}") from None
        finally:
            os.umask(umask)
        if endpoint.socket_path:
            os.chmod(endpoint.socket_path, 0o600)
            endpoints.note_bound(endpoint)
        endpoint.url = self.router.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves a tcp wildcard port
        self.connections.listening_on(endpoint.url)
        endpoints.check_bound_address(endpoint.url, curve)

    def _secure(self, context: zmq.Context, curve: CurveKeys) -> Any:
        """CURVE on the ROUTER: a peer that does not know the server's public key never completes the
        handshake, so it gets nothing back. With a client list, a ZAP thread admits listed keys only."""
        auth = None
        if curve.client_keys is not None:
            from zmq.auth.thread import ThreadAuthenticator

            auth = ThreadAuthenticator(context)
            auth.start()
            auth.configure_curve_callback("*", AllowedClients(curve.client_keys))
        self.router.curve_secretkey = curve.secret_key
        self.router.curve_publickey = curve.public_key
        self.router.curve_server = True
        return auth
