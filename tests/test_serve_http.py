"""The server's HTTP layer (scripts/serve_http.py), driven with raw sockets against a real uvicorn on
127.0.0.1 built by make_server() as main() builds it: protocol errors are OpenAI-shaped JSON and close
the connection, slow or idle clients are cut off by the head/body/keep-alive timeouts, and SIGTERM
ends what still runs after --shutdown_timeout."""
import json
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from scripts.serve_openai_api import build_parser, create_app, main  # noqa: E402
from tests.test_serve import (USER, ScriptedModel, client, launch_server, openai, running,  # noqa: E402
                              tokenizer)  # noqa: F401 (tokenizer: a fixture)

HEAD_S, BODY_S, IDLE_S = 1.0, 1.0, 0.5  # the test server's --header_timeout, --body_timeout, --keep_alive_timeout
CHAT = b'{"messages": [{"role": "user", "content": "hi"}]}'


@pytest.fixture(scope="module")
def port(tokenizer):
    app = create_app(ScriptedModel(tokenizer, "好的"), tokenizer, prefix_cache=0, max_seq_len=1024)
    timeouts = dict(header_timeout=HEAD_S, body_timeout=BODY_S, keep_alive_timeout=IDLE_S, shutdown_timeout=1)
    with running(app, **timeouts) as server:
        yield server.config.port


def connect(port) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_reply(sock, timeout=5.0, trickle=b"", every=0.1):
    """Read until the server closes the connection or `timeout` passes, sending `trickle` one byte every
    `every` seconds meanwhile (a slow client). Returns (bytes read, closed by the server, seconds)."""
    start, reply = time.time(), b""
    sock.settimeout(every)
    while time.time() - start < timeout:
        if trickle:
            try:
                sock.send(trickle[:1])
            except OSError:
                pass
            trickle = trickle[1:]
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return reply, True, time.time() - start
        if not chunk:
            return reply, True, time.time() - start
        reply += chunk
    return reply, False, time.time() - start


def parse(reply: bytes):
    """(status, headers with lower-case names, body bytes) of one HTTP response."""
    assert b"\r\n\r\n" in reply, f"no complete response: {reply[:200]!r}"
    head, body = reply.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body[:int(headers.get("content-length", len(body)))]


def one_response(sock) -> tuple:
    """Read one response with a Content-Length from a keep-alive connection; (status, headers, body)."""
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(parse(reply)[1]["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {reply!r}"
        reply += chunk
    return parse(reply)


def assert_json_error(reply: bytes, status: int) -> dict:
    got, headers, body = parse(reply)
    assert got == status, reply[:300]
    assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def request(method="GET", target="/v1/models", headers=("Host: 127.0.0.1",), body=b"") -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"{method} {target} HTTP/1.1\r\n{head}\r\n".encode() + body


POST = ("Host: 127.0.0.1", "Content-Type: application/json")
MALFORMED = [  # (raw request, status): each must be answered at once with JSON, then the connection closed
    (request("POST", "/v1/chat/completions", POST + ("Content-Length: -1",), CHAT), 400),
    (request("POST", "/v1/chat/completions", POST + ("Content-Length: abc",), CHAT), 400),
    (request("GET", "/v1/models?" + "a" * 100_000), 414),
    (request("GET", "/v1/models", ("Host: 127.0.0.1", "X-Big: " + "b" * 200_000)), 431),
    (request("GET", "/v1/models", ()), 400),  # no Host
    (request("GET", "/v1/models", ("Host: 127.0.0.1", "Host: evil.example")), 400),
    (request("GET", "/v1/models", ("Host: [::1",)), 400),
    (request("GET", "/v1/models", ("Host: [::1]:80x",)), 400),
    (request("GET", "/v1/models", ("Host: a b",)), 400),
    (request("GET", "/v1/models", ("Host: ::1",)), 400),
    # both framings (RFC 9112 6.1: request smuggling); the JSON body is no chunk, so h11 would wait forever
    (request("POST", "/v1/chat/completions", POST + ("Transfer-Encoding: chunked", "Content-Length: 5"), CHAT), 400),
    (request("POST", "/v1/chat/completions", POST + ("Transfer-Encoding: gzip",), CHAT), 501),
    (b"GARBAGE\r\n\r\n", 400),
]


@pytest.mark.parametrize("raw,status", MALFORMED, ids=["length-1", "length-abc", "url-100kB", "header-200kB",
                                                       "no-host", "two-hosts", "host-[::1", "host-port-x",
                                                       "host-space", "host-::1", "te-and-cl", "te-gzip", "garbage"])
def test_protocol_errors_are_openai_json_and_close_the_connection(port, raw, status):
    with connect(port) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # the server answered and stopped reading before all was sent: the reply tells
            pass
        reply, closed, seconds = read_reply(sock, timeout=5)
    assert_json_error(reply, status)
    assert closed and seconds < 2, (closed, seconds)


def test_well_formed_hosts_and_keep_alive_still_work(port):
    with connect(port) as sock:
        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "[::1]", "LOCALHOST:"):
            sock.sendall(request(headers=(f"Host: {host}",)))
            status, headers, body = one_response(sock)
            assert status == 200 and json.loads(body)["data"][0]["id"] == "minimind", host
        sock.sendall(request("POST", "/v1/chat/completions", POST + (f"Content-Length: {len(CHAT)}",), CHAT))
        reply = b""
        while b'"usage"' not in reply:
            reply += sock.recv(65536)
        assert parse(reply)[0] == 200 and "好的" in reply.decode()


def test_an_idle_connection_is_closed_after_the_header_timeout(port):
    with connect(port) as sock:
        reply, closed, seconds = read_reply(sock, timeout=HEAD_S + 3)
    assert closed and reply == b"" and HEAD_S - 0.2 < seconds < HEAD_S + 1.5, (closed, reply, seconds)


def test_two_hundred_idle_connections_are_all_closed_and_the_server_keeps_serving(port):
    socks = [connect(port) for _ in range(200)]
    try:   # a generous limit: in the full suite this in-process server shares the GIL and 2 cores with the rest
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 200
        deadline, open_ = time.time() + HEAD_S + 5, list(socks)
        while open_ and time.time() < deadline:
            for s in list(open_):
                s.settimeout(0.01)
                try:
                    if s.recv(1) == b"":
                        open_.remove(s)
                except socket.timeout:
                    pass
                except ConnectionResetError:
                    open_.remove(s)
        assert not open_, f"{len(open_)} of 200 idle connections still open"
    finally:
        for s in socks:
            s.close()
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200


def test_a_slow_request_head_gets_408_at_the_header_timeout(port):
    with connect(port) as sock:  # 1 byte every 0.1 s: the head would take 4 s
        reply, closed, seconds = read_reply(sock, timeout=HEAD_S + 4, trickle=request()[:40])
    assert assert_json_error(reply, 408)["code"] == "request_timeout"
    assert closed and HEAD_S - 0.2 < seconds < HEAD_S + 1.5, (closed, seconds)


def test_a_slow_body_gets_408_at_the_body_timeout(port):
    with connect(port) as sock:  # the head at once, then the body at 10 bytes/s: it would take 5 s
        sock.sendall(request("POST", "/v1/chat/completions", POST + (f"Content-Length: {len(CHAT)}",)))
        reply, closed, seconds = read_reply(sock, timeout=BODY_S + 4, trickle=CHAT)
    assert assert_json_error(reply, 408)["code"] == "request_timeout"
    assert closed and BODY_S - 0.2 < seconds < BODY_S + 1.5, (closed, seconds)
    counted = 'minimind_http_responses_total{path="/v1/chat/completions",status="408"}'
    deadline = time.time() + 5
    while counted not in (metrics := httpx.get(f"http://127.0.0.1:{port}/metrics").text):  # counted as what was sent
        assert time.time() < deadline, metrics
        time.sleep(0.05)


def test_keep_alive_connections_are_closed_when_idle_and_timed_when_slow(port):
    with connect(port) as sock:
        sock.sendall(request())
        assert one_response(sock)[0] == 200
        reply, closed, seconds = read_reply(sock, timeout=IDLE_S + 3)
        assert closed and reply == b"" and seconds < IDLE_S + 1, (closed, seconds)
    with connect(port) as sock:  # after an answer, the next head must also come within --header_timeout
        sock.sendall(request())
        assert one_response(sock)[0] == 200
        reply, closed, seconds = read_reply(sock, timeout=HEAD_S + 4, trickle=request()[:40])
    assert_json_error(reply, 408)
    assert closed and seconds < HEAD_S + 1.5, (closed, seconds)


def test_timeout_flags_and_defaults():
    args = build_parser().parse_args([])
    assert (args.header_timeout, args.body_timeout, args.keep_alive_timeout, args.shutdown_timeout) == (10, 60, 5, 10)
    for flag in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        with pytest.raises(ValueError, match=f"--{flag} must be > 0"):
            main([f"--{flag}", "0"])
    with pytest.raises(ValueError, match="--shutdown_timeout must be >= 0"):
        main(["--shutdown_timeout", "-1"])


def test_an_upload_still_arriving_when_the_shutdown_drain_ends_gets_503(tokenizer):
    app = create_app(ScriptedModel(tokenizer, "好的"), tokenizer, prefix_cache=0, max_seq_len=1024)
    with running(app, header_timeout=5, body_timeout=30, keep_alive_timeout=5, shutdown_timeout=0.5) as server:
        with connect(server.config.port) as sock:
            sock.sendall(request("POST", "/v1/chat/completions", POST + (f"Content-Length: {len(CHAT)}",), CHAT[:10]))
            time.sleep(0.3)
            server.should_exit = True  # what SIGTERM does
            reply, closed, seconds = read_reply(sock, timeout=5)
    assert assert_json_error(reply, 503)["code"] == "shutting_down"
    assert closed and 0.4 < seconds < 2, (closed, seconds)


def sse_events(stream):
    """The `data:` payloads of an SSE byte stream, as they come."""
    buffer = b""
    for chunk in stream:
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            yield event.decode()[len("data: "):]


def test_readme_command_takes_the_key_from_the_environment_and_sigterm_ends_it(tmp_path):
    """`python scripts/serve_openai_api.py` (the README command) in a subprocess, one process for both checks:
    the API key comes from MINIMIND_API_KEY (never the command line); SIGTERM ends the answers still running
    after --shutdown_timeout and the process exits 0."""
    import os
    proc, port = launch_server(tmp_path, "--shutdown_timeout", "1", env={**os.environ, "MINIMIND_API_KEY": "sk-env"})
    try:
        url = f"http://127.0.0.1:{port}/v1"
        with pytest.raises(openai.AuthenticationError):
            client(url).models.list()
        r = client(url, "sk-env").chat.completions.create(model="minimind", messages=USER, max_tokens=4)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
        assert "sk-env" not in " ".join(proc.args)

        key = {"authorization": "Bearer sk-env"}
        long = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8000, "temperature": 0}
        whole = {}

        def not_streamed():
            whole["reply"] = httpx.post(f"{url}/chat/completions", json=long, headers=key, timeout=60)

        waiter = threading.Thread(target=not_streamed)
        with httpx.stream("POST", f"{url}/chat/completions", json=long | {"stream": True}, headers=key,
                          timeout=60) as r:
            events = sse_events(r.iter_raw())
            first = [next(events) for _ in range(20)]  # the answer is under way
            waiter.start()
            time.sleep(0.5)
            assert all(json.loads(e)["choices"] for e in first)
            proc.send_signal(signal.SIGTERM)
            sent = time.time()
            while time.time() - sent < 0.8:  # it stops accepting at once
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("new connections are still accepted 0.8 s after SIGTERM")
            rest = list(events)
            took = time.time() - sent
        waiter.join(30)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["type"] == "server_error", rest[-3:]
        assert 0.8 < took < 3.5, took  # the answer ran on for --shutdown_timeout, then ended
        assert whole["reply"].status_code == 503 and whole["reply"].json()["error"]["type"] == "server_error"
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
