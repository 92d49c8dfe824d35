"""The HTTP layer of serve_openai_api.py: uvicorn with its h11 parser (always, even where httptools is
installed: one parser decides what a request is), changed where a client can hold the server up or get
an answer that is not OpenAI-shaped.

- A request h11 cannot parse gets an OpenAI-shaped JSON error, not uvicorn's text: 400 (a bad
  Content-Length, a missing or repeated Host, a malformed line), 414 (a request line over 16 KiB),
  431 (a head over 16 KiB), 501 (a transfer coding other than chunked). So does a request with both
  Transfer-Encoding and Content-Length (400: RFC 9112 section 6.1, request smuggling), which h11 would
  read as chunked and wait for forever.
- --header_timeout: from the connection's start, or the end of the previous answer on it, until the
  request head is complete; then 408 if part of a head came, or a silent close if nothing did.
  --body_timeout: from the end of the head until the body is complete (in all, so a client sending a
  byte now and then is cut off too); then 408, or only a close if the answer had begun.
  --keep_alive_timeout: an idle connection after an answer is closed (uvicorn's timeout_keep_alive).
- After each of these answers the connection is closed: the answer is sent, then the write side is
  shut, and what the client still sends is read and dropped for LINGER_S seconds, so the answer is
  not lost to a TCP reset when the client is still sending.
- SIGTERM / SIGINT: the server stops accepting at once; running answers go on for --shutdown_timeout
  seconds, then the engine cancels them (a stream ends with an error event and [DONE], other requests
  get 503, an upload still arriving gets 503 here), and the process exits with status 0 (uvicorn
  re-raises the signal, which would end it with -15).

Built on uvicorn 0.54's H11Protocol (requirements.txt pins it): handle_events() sends every h11
RemoteProtocolError through send_400_response(), which is overridden here."""
import asyncio
import contextlib
import http
import json
import signal
import sys
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_HEAD_BYTES = 16 * 1024  # h11's own limit on an incomplete head, applied to complete ones too
LINGER_S = 2.0
SHUTDOWN_GRACE_S = 5.0  # after --shutdown_timeout: time for the ended answers to go out before uvicorn cancels them
ERROR_CODES = {400: "invalid_http_request", 408: "request_timeout", 414: "url_too_long", 431: "headers_too_large",
               501: "unsupported_transfer_encoding", 503: "shutting_down"}


def error_response(status: int, message: str, default_headers=()) -> bytes:
    """A whole HTTP response: the OpenAI error body {"error": {"message", "type", "param", "code"}}."""
    type_ = "server_error" if status >= 500 and status != 501 else "invalid_request_error"
    body = json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": ERROR_CODES.get(status)}}).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    head += [k + b": " + v for k, v in default_headers]
    head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def head_problem(event: h11.Request):
    """(status, message) for a parsed request head this server refuses, else None."""
    names = [name.lower() for name, _ in event.headers]
    if b"transfer-encoding" in names and b"content-length" in names:
        return 400, ("the request has both Transfer-Encoding and Content-Length; send one (RFC 9112 section 6.1: "
                     "a request framed two ways may be read differently by a proxy)")
    if len(event.target) > MAX_HEAD_BYTES:
        return 414, f"the request URL is longer than {MAX_HEAD_BYTES} bytes"
    if sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_HEAD_BYTES:
        return 431, f"the request headers are larger than {MAX_HEAD_BYTES} bytes"
    return None


class Connection(h11.Connection):
    """h11's server side, which also refuses head_problem() (as a RemoteProtocolError), keeps the last
    error for the answer, and tells the protocol of each event (for the timers)."""

    def __init__(self, on_event, max_incomplete_event_size: int):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.on_event, self.error = on_event, None

    def next_event(self):
        try:
            event = super().next_event()
            problem = head_problem(event) if isinstance(event, h11.Request) else None
            if problem is not None:
                raise h11.RemoteProtocolError(problem[1], error_status_hint=problem[0])
        except h11.RemoteProtocolError as err:
            self.error = err
            raise
        self.on_event(event)
        return event


class Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON protocol errors, the head and body timeouts (config.header_timeout,
    config.body_timeout) and a lingering close after an error answer."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.conn = Connection(self.on_event, config.h11_max_incomplete_event_size or MAX_HEAD_BYTES)
        self.timers = {}  # "head" / "body": asyncio.TimerHandle
        self.lingering = False

    # -- timers --
    def arm(self, name: str, seconds: float, callback):
        self.disarm(name)
        self.timers[name] = self.loop.call_later(seconds, callback)

    def disarm(self, *names):
        for name in names or list(self.timers):
            timer = self.timers.pop(name, None)
            if timer is not None:
                timer.cancel()

    def connection_made(self, transport):
        super().connection_made(transport)
        self.arm("head", self.config.header_timeout, self.head_timeout)

    def connection_lost(self, exc):
        self.disarm()
        super().connection_lost(exc)

    def on_event(self, event):
        if isinstance(event, h11.Request):
            self.disarm("head")
            self.arm("body", self.config.body_timeout, self.body_timeout)
        elif isinstance(event, h11.EndOfMessage):
            self.disarm("body")

    def on_response_complete(self):
        if not self.transport.is_closing():  # the next head is timed from the end of this answer
            self.arm("head", self.config.header_timeout, self.head_timeout)
        super().on_response_complete()

    def head_timeout(self):
        self.timers.pop("head", None)
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0].strip():
            self.refuse(408, f"the request head did not arrive within {self.config.header_timeout:g} s "
                             "(--header_timeout)")
        else:  # nothing came: an idle connection, closed without a word
            self.transport.close()

    def body_timeout(self):
        self.timers.pop("body", None)
        if self.cycle is not None and self.cycle.response_complete:  # answered without its body: just close
            self.transport.close()
        elif not self.transport.is_closing():
            self.refuse(408, f"the request body did not arrive within {self.config.body_timeout:g} s of its head "
                             "(--body_timeout)")

    # -- errors --
    def send_400_response(self, msg: str):
        """uvicorn calls this for every request h11 refuses (msg is always 'Invalid HTTP request received.')."""
        err = self.conn.error
        status, message = getattr(err, "error_status_hint", 400), f"invalid HTTP request: {err or msg}"
        if str(err) == "Receive buffer too long":  # h11 only knows that the head was not complete by 16 KiB
            line_done = b"\n" in self.conn.trailing_data[0].lstrip(b"\r\n")[:MAX_HEAD_BYTES]
            status = 431 if line_done else 414
            message = (f"the request headers are larger than {MAX_HEAD_BYTES} bytes" if line_done
                       else f"the request URL is longer than {MAX_HEAD_BYTES} bytes")
        self.refuse(status, message)

    def refuse(self, status: int, message: str):
        """Answer with an OpenAI-shaped JSON error and close the connection; if an answer has begun on
        it, only close. The request's app, if it runs, then reads a disconnect and its answer is dropped."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                self.transport.close()
                return
            cycle.disconnected = True
            cycle.scope["minimind.refused"] = status  # counted in /metrics as this status, not as a client leaving
            cycle.message_event.set()
        self.transport.write(error_response(status, message, self.server_state.default_headers))
        self.linger()

    def linger(self):
        self.lingering = True
        self.disarm()
        self._unset_keepalive_if_required()
        if not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self.flow.resume_reading()
        self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes):
        if not self.lingering:  # after an error answer what comes is dropped
            super().data_received(data)

    def shutdown(self):
        if self.lingering:
            self.transport.close()
        else:
            super().shutdown()

    def end_upload(self):
        """At the end of the shutdown drain: a request whose body is still arriving gets 503."""
        cycle = self.cycle
        if (cycle is not None and cycle.more_body and not cycle.response_started and not self.lingering
                and not self.transport.is_closing()):
            self.refuse(503, "the server is shutting down")


class Server(uvicorn.Server):
    """uvicorn's server with a bounded drain: after `shutdown_timeout` seconds `engine.cancel_all()` ends
    what still runs (again every 0.1 s, for requests that reach the engine later), and a signal leaves
    the process with status 0."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float, engine=None):
        super().__init__(config)
        self.shutdown_timeout, self.engine = shutdown_timeout, engine

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:  # uvicorn's version re-raises the signal here
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        ender = asyncio.ensure_future(self.end_answers())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()

    async def end_answers(self):
        await asyncio.sleep(self.shutdown_timeout)
        if self.server_state.tasks:
            print(f"serve_openai_api.py: --shutdown_timeout ({self.shutdown_timeout:g} s) is over: ending "
                  f"{len(self.server_state.tasks)} unfinished request(s)", file=sys.stderr, flush=True)
        while True:
            if self.engine is not None:
                self.engine.cancel_all()
            for conn in list(self.server_state.connections):
                if isinstance(conn, Protocol):
                    conn.end_upload()
            await asyncio.sleep(0.1)


def make_server(app, host: str, port: int, *, header_timeout: float, body_timeout: float,
                keep_alive_timeout: float, shutdown_timeout: float) -> Server:
    """The uvicorn server main() runs (server.run()); tests run it in a thread. `app.engine`, when the
    app has one (create_app's does), is cancelled at the end of the shutdown drain."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=Protocol, ws="none",
                            timeout_keep_alive=keep_alive_timeout,
                            timeout_graceful_shutdown=shutdown_timeout + SHUTDOWN_GRACE_S)
    config.header_timeout, config.body_timeout = header_timeout, body_timeout
    return Server(config, shutdown_timeout, getattr(app, "engine", None))
