"""A small synchronous Flare client, written from PROTOCOL.md alone.

JSON encoding over WebSocket (subprotocol ``flare.v1.json``), on top of the
``websocket-client`` package. It speaks protocol version 1: ``auth``, ``send``,
``ack``, ``sync`` and ``ping`` out; ``auth_ok``, ``send_ok``, ``msg``, ``sync_done``,
``error``, ``pong`` and ``goaway`` in.

Frames that arrive while the client waits for something else (for example live
``msg`` frames while it waits for a ``send_ok``) are kept, in order, and returned by
the next ``recv``. Every wait is bounded by a timeout.

    c = FlareClient.connect("ws://127.0.0.1:8080/ws")
    ok = c.auth(token, device="phone")
    reply = c.send("c-1", {"user": "bob"}, "hi bob")   # the send_ok frame
    m = c.recv_msg()                                     # our own copy, seq = head + 1
    c.ack(m["seq"])
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import deque
from typing import Callable, Optional

import websocket

SUBPROTOCOL_JSON = "flare.v1.json"


class FlareError(Exception):
    """The server answered a request with an ``error`` frame."""

    def __init__(self, frame: dict):
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code = frame.get("code")
        self.id = frame.get("id")


class Closed(Exception):
    """The connection closed. ``code`` is the WebSocket close code (None: no Close frame)."""

    def __init__(self, code: Optional[int], reason: str = "", frames: Optional[list] = None):
        super().__init__(f"connection closed with code {code} {reason!r}")
        self.code = code
        self.reason = reason
        self.frames = frames or []


def mint_token(secret: str, user: str, ttl_secs: int = 3600, device: Optional[str] = None,
               exp: Optional[int] = None, extra: Optional[dict] = None) -> str:
    """An HS256 JWT with claims ``sub``, ``exp`` and optionally ``dev`` (PROTOCOL.md §3)."""

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode("ascii")

    claims: dict = {"sub": user, "exp": exp if exp is not None else int(time.time()) + ttl_secs}
    if device is not None:
        claims["dev"] = device
    if extra:
        claims.update(extra)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(sig)}"


class FlareClient:
    """One WebSocket session with a Flare gateway (JSON encoding)."""

    def __init__(self, ws: websocket.WebSocket, timeout: float):
        self.ws = ws
        self.timeout = timeout
        self.pending: deque = deque()
        self.close_code: Optional[int] = None
        self.auth_ok: Optional[dict] = None

    @classmethod
    def connect(cls, url: str, timeout: float = 15.0, subprotocol: Optional[str] = SUBPROTOCOL_JSON) -> "FlareClient":
        """Opens the WebSocket (``url`` ends in ``/ws``). Raises
        ``websocket.WebSocketBadStatusException`` if the upgrade is refused (e.g. 400
        for an unknown subprotocol)."""
        protocols = [subprotocol] if subprotocol else None
        ws = websocket.create_connection(url, timeout=timeout, subprotocols=protocols)
        return cls(ws, timeout)

    # --- sending ------------------------------------------------------------

    def send_frame(self, frame: dict) -> None:
        self.ws.send(json.dumps(frame, separators=(",", ":")))

    def send_raw(self, text: str) -> None:
        self.ws.send(text)

    def auth(self, token: str, device: Optional[str] = None, last_seq: Optional[int] = None) -> dict:
        """Opens the session. Returns ``auth_ok``; raises ``FlareError`` (with the close
        code in ``.close_code`` of the client) if the server refuses."""
        f: dict = {"type": "auth", "token": token}
        if device is not None:
            f["device"] = device
        if last_seq is not None:
            f["last_seq"] = last_seq
        self.send_frame(f)
        v = self.recv()
        if v["type"] == "error":
            raise FlareError(v)
        if v["type"] != "auth_ok":
            raise AssertionError(f"expected auth_ok, got {v}")
        self.auth_ok = v
        return v

    def send_async(self, id: str, to: dict, body: str) -> None:
        """``send`` without waiting for the answer."""
        self.send_frame({"type": "send", "id": id, "to": to, "body": body})

    def send(self, id: str, to: dict, body: str) -> dict:
        """``send`` and wait for its ``send_ok`` (raises ``FlareError`` on ``error``)."""
        self.send_async(id, to, body)
        return self.wait_answer(id)

    def wait_answer(self, id: str) -> dict:
        v = self.recv_until(lambda f: f["type"] in ("send_ok", "error") and f.get("id") == id)
        if v["type"] == "error":
            raise FlareError(v)
        return v

    def ack(self, seq: int) -> None:
        self.send_frame({"type": "ack", "seq": seq})

    def ping(self) -> None:
        """``ping`` and wait for ``pong`` (frames arriving meanwhile are kept)."""
        self.send_frame({"type": "ping"})
        self.recv_until(lambda f: f["type"] == "pong")

    def sync(self, after: int, limit: int) -> tuple[list, dict]:
        """One page: the ``msg`` frames for ``seq > after`` and the ``sync_done``.
        Raises ``FlareError`` if the server refuses the request."""
        self.send_frame({"type": "sync", "after": after, "limit": limit})
        msgs = []
        others = []
        while True:
            v = self._next()
            if v["type"] == "msg":
                msgs.append(v)
            elif v["type"] == "sync_done":
                break
            elif v["type"] == "error" and v.get("id") is None:
                self.pending.extendleft(reversed(others))
                raise FlareError(v)
            else:
                others.append(v)
        self.pending.extendleft(reversed(others))
        return msgs, v

    def sync_all(self, after: int = 0, limit: int = 1000) -> list:
        out = []
        while True:
            msgs, done = self.sync(after, limit)
            out.extend(msgs)
            if msgs:
                after = msgs[-1]["seq"]
            if not done["more"]:
                return out

    # --- receiving ----------------------------------------------------------

    def _next(self, timeout: Optional[float] = None) -> dict:
        """The next frame from the socket. Raises ``Closed`` or ``websocket.WebSocketTimeoutException``."""
        if self.close_code is not None:
            raise Closed(self.close_code)
        self.ws.settimeout(timeout if timeout is not None else self.timeout)
        try:
            opcode, frame = self.ws.recv_data_frame(False)
        except websocket.WebSocketConnectionClosedException:
            self.close_code = -1
            raise Closed(None, "EOF without a Close frame")
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data or b""
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            self.close_code = code if code is not None else -1
            raise Closed(code, data[2:].decode("utf-8", "replace"))
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(frame.data.decode("utf-8"))
        raise AssertionError(f"unexpected WebSocket opcode {opcode} in a JSON session")

    def recv(self, timeout: Optional[float] = None) -> dict:
        """The next frame (kept ones first)."""
        if self.pending:
            return self.pending.popleft()
        return self._next(timeout)

    def recv_until(self, pred: Callable[[dict], bool], timeout: Optional[float] = None) -> dict:
        """The first frame matching ``pred``; the others are kept, in order."""
        for i, v in enumerate(self.pending):
            if pred(v):
                del self.pending[i]
                return v
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise websocket.WebSocketTimeoutException(f"no matching frame; kept: {list(self.pending)}")
            v = self._next(left)
            if pred(v):
                return v
            self.pending.append(v)

    def recv_msg(self, timeout: Optional[float] = None) -> dict:
        return self.recv_until(lambda f: f["type"] == "msg", timeout)

    def recv_msgs(self, n: int) -> list:
        return [self.recv_msg() for _ in range(n)]

    def expect_close(self, timeout: Optional[float] = None) -> tuple[Optional[int], list]:
        """Reads until the server closes; returns (close code, frames received first)."""
        frames = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise websocket.WebSocketTimeoutException(f"not closed in time; frames {frames}")
            try:
                frames.append(self._next(left))
            except Closed as c:
                return c.code, frames

    def close(self) -> None:
        try:
            self.ws.close(timeout=2)
        except Exception:
            pass
