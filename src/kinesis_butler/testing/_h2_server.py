"""A minimal HTTP/2 test server on the sans-IO ``h2`` library, and a self-signed TLS context.

:class:`H2ServerProtocol` answers each request with what an async ``handler`` returns: a body, or
a stream of parts, where a part is bytes (sent respecting the client's flow-control windows) or an
:class:`Action` (reset the stream, GOAWAY, drop the connection, stall). :class:`ProtocolSwitch`
lets one port serve HTTP/2 and HTTP/1.1, as AWS and kinesis-local do: by the ALPN choice on TLS,
by the client preface (h2c with prior knowledge) in plain text. The fake fan-out server uses
them; nothing here knows about Kinesis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import enum
import ipaddress
import ssl
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["Action", "H2Reply", "H2ServerProtocol", "ProtocolSwitch", "tls_server_context"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Action(enum.Enum):
    """What a streamed response does instead of sending more bytes."""

    RESET = "reset"  # RST_STREAM INTERNAL_ERROR
    GOAWAY = "goaway"  # GOAWAY NO_ERROR, then close the connection
    KILL = "kill"  # drop the connection
    STALL = "stall"  # send nothing more, keep the stream open


@dataclasses.dataclass
class H2Reply:
    """A response: ``parts`` stream when set, else ``body`` is sent whole."""

    status: int = 200
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    parts: AsyncGenerator[bytes | Action, None] | None = None


Handler = Callable[[dict[str, str], bytes], Awaitable[H2Reply]]


class ProtocolSwitch(asyncio.Protocol):
    """Hands a connection to the HTTP/2 or the HTTP/1.1 protocol, then forwards every callback."""

    def __init__(
        self, h2_factory: Callable[[], asyncio.Protocol], http1_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self._factories = (h2_factory, http1_factory)
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._head = b""

    def _choose(self, h2: bool) -> asyncio.Protocol:
        assert self._transport is not None  # noqa: S101 - called after connection_made
        self._inner = self._factories[0 if h2 else 1]()
        self._inner.connection_made(self._transport)
        return self._inner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._choose(ssl_object.selected_alpn_protocol() == "h2")

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:  # plain text: h2c if the bytes are the HTTP/2 client preface
            self._head += data
            if len(self._head) < len(_PREFACE) and _PREFACE.startswith(self._head):
                return
            inner, data, self._head = self._choose(self._head.startswith(_PREFACE)), self._head, b""
        inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


def tls_server_context(alpn: list[str]) -> tuple[ssl.SSLContext, str]:
    """A server TLS context with a fresh self-signed certificate for localhost and 127.0.0.1.

    Returns:
        The context (offering ``alpn``) and the certificate PEM for clients to trust.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kinesis-butler test server")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:  # the ssl module loads keys from files only
        (Path(folder) / "cert.pem").write_bytes(cert_pem)
        (Path(folder) / "key.pem").write_bytes(key_pem)
        context.load_cert_chain(Path(folder) / "cert.pem", Path(folder) / "key.pem")
    context.set_alpn_protocols(alpn)
    return context, cert_pem.decode()


class H2ServerProtocol(asyncio.Protocol):
    """One server-side HTTP/2 connection; ``connections`` tracks the live ones (for shutdown)."""

    def __init__(self, handler: Handler, connections: set[H2ServerProtocol], max_streams: int) -> None:
        self._handler = handler
        self._connections = connections
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._h2.local_settings = h2.settings.Settings(
            client=False, initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams}
        )
        self._transport: asyncio.Transport | None = None
        self._requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._window = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - stream transports only
        self._transport = transport
        self._connections.add(self)
        self._h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        for task in self._tasks.values():
            task.cancel()
        self._window.set()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            stream_id = getattr(event, "stream_id", 0) or 0
            if isinstance(event, h2.events.RequestReceived):
                self._requests[stream_id] = ({str(k): str(v) for k, v in event.headers or ()}, bytearray())
            elif isinstance(event, h2.events.DataReceived) and stream_id in self._requests:
                self._requests[stream_id][1].extend(event.data or b"")
                self._h2.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
            elif isinstance(event, h2.events.StreamEnded) and stream_id in self._requests:
                headers, body = self._requests.pop(stream_id)
                self._tasks[stream_id] = asyncio.get_running_loop().create_task(
                    self._respond(stream_id, headers, bytes(body))
                )
            elif isinstance(event, h2.events.StreamReset) and stream_id in self._tasks:
                self._tasks.pop(stream_id).cancel()
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                self._window.set()
        self._flush()

    async def abort(self) -> None:
        """Drop the connection and wait for its responses to stop."""
        if self._transport is not None:
            self._transport.abort()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(self, stream_id: int, data: bytes, *, end: bool) -> None:
        view = memoryview(data)
        while True:
            window = self._h2.local_flow_control_window(stream_id)
            size = min(len(view), window, self._h2.max_outbound_frame_size)
            if view and size <= 0:  # the client has not acknowledged enough: wait for WINDOW_UPDATE
                self._window.clear()
                await self._window.wait()
                continue
            self._h2.send_data(stream_id, view[:size].tobytes(), end_stream=end and size == len(view))
            self._flush()
            view = view[size:]
            if not view:
                return

    async def _respond(self, stream_id: int, headers: dict[str, str], body: bytes) -> None:
        reply = await self._handler(headers, body)
        try:
            self._h2.send_headers(stream_id, [(":status", str(reply.status)), *reply.headers])
            if reply.parts is None:
                await self._send(stream_id, reply.body, end=True)
                return
            async for part in reply.parts:
                if isinstance(part, bytes):
                    await self._send(stream_id, part, end=False)
                elif part is Action.STALL:
                    await asyncio.Event().wait()  # until cancelled
                elif part is Action.RESET:
                    self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.INTERNAL_ERROR)
                    return
                elif self._transport is not None:
                    if part is Action.GOAWAY:
                        self._h2.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=stream_id)
                        self._flush()
                        self._transport.close()
                    else:
                        self._transport.abort()
                    return
            self._h2.end_stream(stream_id)
        except (h2.exceptions.H2Error, OSError):
            return  # the client went away
        finally:
            self._flush()
            self._tasks.pop(stream_id, None)
            if reply.parts is not None:
                await reply.parts.aclose()
