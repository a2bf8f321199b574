"""The HTTP guards of `prologue serve`: what a client may hold of the server, enforced below the
routes. Starlette and uvicorn are imported only when a server is built (`server_config`).

- `Guard` (ASGI): a request head over `MAX_HEAD_BYTES` is 431; a `Host` that is not an IP literal
  or an allowed name is 403 (DNS rebinding, on every bind address); an `Origin` whose host:port is
  not the `Host` is 403; at most `Limits.max_requests` POST requests at once: at the limit, the
  request whose body has been arriving longest (at least `SLOW_BODY_S`) is answered 408 and closed
  to make room, else the new one gets 503 (slow bodies never lock prompt clients out). GET
  routes answer at once from memory, so they are not counted: `/healthz` answers while the API is full.
- `ConnectionGuard`, mixed into uvicorn's h11 protocol by `guarded_protocol`: a connection must deliver a complete
  request head within `Limits.head_timeout_s` of opening (or of its previous answer), however it
  trickles; a client that stops reading its answers is cut off after `Limits.write_timeout_s`
  (uvicorn would wait for it forever, holding the request and its answer); at most
  `Limits.max_connections` connections, and when a new one would exceed that the one waiting
  longest for its request head is closed, so idle sockets never lock clients out.

docs/serve.md ("Resource limits") states each number and why.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import typing

from ..runtime.errors import short_repr

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # the names every server answers to
ANY_HOST = "*"  # `--allow-host '*'`: any Host (DNS rebinding then works against this server)
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's own bound on a head arriving in pieces)
HEAD_TIMEOUT_S = 10.0  # a request head must arrive this long after the connection opened (or its last answer)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)
REQUESTS_OVER_QUEUE = 32  # POST requests in flight beyond --max-queue: bodies arriving, parsing, running
IDLE_CONNECTIONS = 128  # connections beyond the requests in flight (keep-alive, heads arriving)
SLOW_BODY_S = 1.0  # at the POST limit, a body still arriving after this long gives its slot to a new request


def raw_answer(status: str, message: str, *headers: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for the protocol level (no request parsed)."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", *headers, "connection: close",
            f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


BUSY = raw_answer("503 Service Unavailable", "every connection is busy; retry in a second", "retry-after: 1")
HEAD_TIMED_OUT = raw_answer("408 Request Timeout", "the request head did not arrive in time")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_requests: int  # POST requests at once (bodies arriving, parsing, queued, running)
    max_connections: int  # open connections; beyond, the one waiting longest for its head is closed
    head_timeout_s: float = HEAD_TIMEOUT_S
    write_timeout_s: float = 30.0  # a client that reads none of its answer for this long is cut off
    keep_alive_s: int = KEEP_ALIVE_S


def host_name(host: str) -> str:
    """The name part of a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`), lowercase, no final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") <= 1 else host


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware in front of the app: head size, Host, Origin, POST requests in flight."""

    def __init__(self, app, allowed_hosts: typing.Sequence[str] = LOOPBACK_HOSTS,
                 max_requests: typing.Optional[int] = None):
        self.app, self.max_requests, self.active = app, max_requests, 0
        self.flights: typing.Set[Flight] = set()
        self.any_host = ANY_HOST in allowed_hosts
        self.allowed = {host_name(h) for h in allowed_hosts if h != ANY_HOST}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.problem(scope)
        if refused:
            return await send_json(send, *refused)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.max_requests is not None and self.active >= self.max_requests and not await self.make_room():
            return await send_json(send, 503, f"this server has {self.max_requests} requests in flight; retry later",
                                   [(b"retry-after", b"1")])
        flight = Flight(receive, send)
        self.active += 1
        self.flights.add(flight)
        try:
            await self.app(scope, flight.receive, flight.send)
        finally:
            self.flights.discard(flight)
            if not flight.evicted:
                self.active -= 1

    async def make_room(self) -> bool:
        """At the limit: answer 408 to the request whose body has been arriving longest, if it has
        been arriving for SLOW_BODY_S, and take its slot (a slow body must not hold a slot that a
        prompt request needs: ~100 trickled bodies used to lock the API for the body timeout)."""
        now = asyncio.get_running_loop().time()
        slow = [f for f in self.flights if f.arriving() and now - f.since >= SLOW_BODY_S]
        if not slow:
            return False
        victim = min(slow, key=lambda f: f.since)
        self.active -= 1
        await victim.evict()
        return True

    def problem(self, scope) -> typing.Optional[typing.Tuple[int, str]]:
        headers = scope["headers"]
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in headers)
        if size > MAX_HEAD_BYTES:
            return 431, f"the request head is larger than {MAX_HEAD_BYTES} bytes"
        fields = dict(headers)
        host = fields.get(b"host", b"").decode("latin-1")
        name = host_name(host)
        if not self.any_host and not is_ip_literal(name) and name not in self.allowed:
            return 403, (f"host {short_repr(host, 60)} is not served here (this server answers IP addresses and "
                         f"{', '.join(sorted(self.allowed))}; prologue serve --allow-host NAME adds a name)")
        origin = fields.get(b"origin")
        if origin is not None and origin.decode("latin-1").lower().partition("://")[2] != host.lower():
            return 403, f"cross-origin request from {short_repr(origin.decode('latin-1'), 60)} refused"
        return None


class Flight:
    """A POST request in flight, seen through its `receive` and `send`: whether its body is still
    arriving, and `evict()`, which answers it 408 and closes its connection. uvicorn's cycle ends its
    pending `receive` with a disconnect once the answer is complete (h11_impl.py `send` sets
    `message_event`), so the app stops reading; what the app sends after that is dropped."""

    def __init__(self, receive, send):
        self._receive, self._send = receive, send
        self.since = asyncio.get_running_loop().time()
        self.body_done = self.answering = self.evicted = False

    def arriving(self) -> bool:
        return not (self.body_done or self.answering or self.evicted)

    async def receive(self):
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message) -> None:
        if self.evicted:
            return
        self.answering = True
        await self._send(message)

    async def evict(self) -> None:
        self.evicted = True
        await send_json(self._send, 408, f"the request body arrived too slowly (still incomplete after {SLOW_BODY_S:g} s "
                        "while the server was full); send it at once", [(b"connection", b"close")])


async def send_json(send, status: int, message: str, headers: typing.Sequence = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ConnectionGuard:
    """The guards of a connection, mixed into uvicorn's `H11Protocol` by `guarded_protocol` (which
    sets `limits`): a deadline for every request head, a deadline for a client that stops reading,
    and room made for a new connection at the limit."""

    limits: Limits

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's counts idle connections too: `Guard` counts requests
        self.head_timer, self.head_bytes, self.head_since, self.write_timer = None, 0, 0.0, None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.await_head()
        if len(self.connections) > self.limits.max_connections:
            self.make_room()

    def connection_lost(self, exc) -> None:
        self.stop_head_timer()
        self.resume_writing()
        super().connection_lost(exc)

    def pause_writing(self) -> None:  # the client does not read: its answers pile up here
        super().pause_writing()
        if self.write_timer is None:
            self.write_timer = self.loop.call_later(self.limits.write_timeout_s, self.transport.abort)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.write_timer is not None:
            self.write_timer.cancel()
            self.write_timer = None

    def data_received(self, data: bytes) -> None:
        waiting, cycle = self.head_timer is not None, self.cycle
        self.head_bytes += len(data) if waiting else 0
        super().data_received(data)
        if waiting and self.cycle is not cycle:  # the head arrived: a request runs
            self.stop_head_timer()

    def on_response_complete(self) -> None:
        cycle = self.cycle
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is cycle:  # no pipelined request started
            self.await_head()

    def await_head(self) -> None:
        self.stop_head_timer()
        self.head_bytes, self.head_since = 0, self.loop.time()
        self.head_timer = self.loop.call_later(self.limits.head_timeout_s, self.head_timed_out)

    def stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if not self.transport.is_closing():
            if self.head_bytes and not self.transport.get_write_buffer_size():
                self.transport.write(HEAD_TIMED_OUT)  # a head begun and never finished: say why
            self.drop()

    def drop(self) -> None:
        """Close, discarding answers the client has not read (a plain close would wait for them)."""
        if self.transport.get_write_buffer_size() > len(HEAD_TIMED_OUT):
            self.transport.abort()
        else:
            self.transport.close()

    def make_room(self) -> None:
        """Close the connection waiting longest for its request head; none: refuse this one."""
        waiting = [c for c in self.connections if c is not self and getattr(c, "head_timer", None) is not None
                   and not c.transport.is_closing()]
        if waiting:
            min(waiting, key=lambda c: c.head_since).drop()
        else:
            self.stop_head_timer()
            self.transport.write(BUSY)
            self.transport.close()


# What `ConnectionGuard` builds on in uvicorn's `H11Protocol` (uvicorn/protocols/http/h11_impl.py, the same
# at 0.30.0, our lowest, and 0.55.0): these methods, and `connections`, `cycle`, `loop`, `transport`,
# `limit_concurrency` set in its __init__ / connection_made.
H11_HOOKS = ("connection_made", "connection_lost", "data_received", "on_response_complete", "pause_writing",
             "resume_writing")


def guarded_protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol class with `ConnectionGuard` and these `limits`."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    missing = [name for name in H11_HOOKS if not callable(getattr(H11Protocol, name, None))]
    if missing:  # a uvicorn that changed its protocol class: refuse to serve unguarded
        raise RuntimeError(f"uvicorn {uvicorn.__version__}'s H11Protocol lacks {', '.join(missing)}, which "
                           "prologue serve's connection guard needs; install uvicorn>=0.30 of the 0.x line")
    return type("GuardedH11Protocol", (ConnectionGuard, H11Protocol), {"limits": limits})


def server_config(app, limits: Limits, **kwargs):
    """The uvicorn.Config of a guarded server (`kwargs`: host, port, log_level, ...)."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(limits), ws="none", lifespan="on", access_log=False,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=limits.keep_alive_s,
                          **kwargs)
