"""End-to-end tests of the real `flare` binary from another language (pytest).

The binary comes from $FLARE_BIN (default: target/debug/flare, relative to the
current directory or to the repository root). Each test starts its own server on
free loopback ports with a temporary data dir; tokens are minted here (HS256).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websocket

from flare_client import FlareClient, FlareError, mint_token

SECRET = "py-e2e-secret-3f9a"
ADMIN_TOKEN = "py-e2e-admin-7d1e"
NODE_ID = "gw-py"
REPO_ROOT = Path(__file__).resolve().parents[2]


def flare_bin() -> str:
    p = Path(os.environ.get("FLARE_BIN", "target/debug/flare"))
    for cand in (p, REPO_ROOT / p):
        if cand.is_file():
            return str(cand.resolve())
    raise FileNotFoundError(f"flare binary not found at {p} (set FLARE_BIN)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, *extra: str):
        self.ws_port = free_port()
        self.admin_port = free_port()
        self.log_path = tmp / "flare.log"
        data = tmp / "data"
        data.mkdir()
        args = [
            flare_bin(), "serve",
            "--ws", f"127.0.0.1:{self.ws_port}",
            "--admin", f"127.0.0.1:{self.admin_port}",
            "--quic", f"127.0.0.1:{free_port()}",
            "--data", str(data),
            "--shards", "2",
            "--node-id", NODE_ID,
            "--jwt-secret", SECRET,
            "--admin-token", ADMIN_TOKEN,
            "--sends-per-sec", "1000000",
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLARE_")}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flare exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"flare not ready in 40 s:\n{self.log_text()}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/ws"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def login(self, user: str, device: str, last_seq=None) -> tuple[FlareClient, dict]:
        c = FlareClient.connect(self.url)
        ok = c.auth(mint_token(SECRET, user), device=device, last_seq=last_seq)
        return c, ok

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def server(tmp_path, request):
    s = Server(tmp_path)
    yield s
    s.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"----- flare log -----\n{s.log_text()}")


def test_one_to_one_exchange_and_resume(server):
    alice, ok = server.login("alice", "phone")
    assert ok["user"] == "alice" and ok["device"] == "phone" and ok["head_seq"] == 0
    assert ok["node"] == NODE_ID and ok["heartbeat_ms"] == 30000
    bob, ok = server.login("bob", "phone")
    bob.ping()

    acks = []
    for i in range(1, 4):
        r = alice.send(f"m{i}", {"user": "bob"}, f"hello {i}")
        assert r["type"] == "send_ok" and r["id"] == f"m{i}" and r["dup"] is False
        assert isinstance(r["msg_id"], str) and r["msg_id"].isdigit()
        assert isinstance(r["ts"], int)
        acks.append(r)
    # The sender's own inbox gets each message too (send_ok first, then the msg).
    own = alice.recv_msgs(3)
    assert [m["seq"] for m in own] == [1, 2, 3]

    got = bob.recv_msgs(3)
    assert [m["seq"] for m in got] == [1, 2, 3]
    for m, r in zip(got, acks):
        assert m["msg_id"] == r["msg_id"] and m["ts"] == r["ts"]
        assert m["from"] == "alice" and m["from_device"] == "phone"
        assert m["to"] == {"user": "bob"}
    assert [m["body"] for m in got] == ["hello 1", "hello 2", "hello 3"]

    # bob acknowledges 2 and leaves; two more arrive while he is away.
    bob.ack(2)
    bob.ping()
    bob.close()
    for i in range(4, 6):
        alice.send(f"m{i}", {"user": "bob"}, f"hello {i}")

    bob, ok = server.login("bob", "phone")
    assert ok["head_seq"] == 5
    got = bob.recv_msgs(3)
    assert [m["seq"] for m in got] == [3, 4, 5], "resume must start after the ack cursor"
    # Then live.
    r = alice.send("m6", {"user": "bob"}, "live")
    m = bob.recv_msg()
    assert (m["seq"], m["msg_id"], m["body"]) == (6, r["msg_id"], "live")

    # Explicit last_seq on a new device.
    tab, ok = server.login("bob", "tablet", last_seq=4)
    assert [m["seq"] for m in tab.recv_msgs(2)] == [5, 6]
    # A new device without last_seq starts at the head.
    watch, ok = server.login("bob", "watch")
    assert ok["head_seq"] == 6
    alice.send("m7", {"user": "bob"}, "seven")
    assert watch.recv_msg()["seq"] == 7


def test_dedup(server):
    alice, _ = server.login("alice", "phone")
    bob, _ = server.login("bob", "phone")
    bob.ping()
    first = alice.send("same-id", {"user": "bob"}, "only once")
    again = alice.send("same-id", {"user": "bob"}, "only once")
    assert first["dup"] is False and again["dup"] is True
    assert again["msg_id"] == first["msg_id"] and again["ts"] == first["ts"]
    alice.send("next", {"user": "bob"}, "next")
    got = bob.recv_msgs(2)
    assert [(m["seq"], m["body"]) for m in got] == [(1, "only once"), (2, "next")]


def test_sync_paging(server):
    alice, _ = server.login("alice", "phone")
    sent = [alice.send(f"p{i}", {"user": "bob"}, f"body {i}") for i in range(1, 26)]
    bob, ok = server.login("bob", "tablet")
    assert ok["head_seq"] == 25

    msgs, done = bob.sync(0, 10)
    assert [m["seq"] for m in msgs] == list(range(1, 11))
    assert done == {"type": "sync_done", "after": 0, "last": 10, "more": True, "truncated": False}
    msgs, done = bob.sync(10, 10)
    assert [m["seq"] for m in msgs] == list(range(11, 21))
    assert (done["after"], done["last"], done["more"]) == (10, 20, True)
    msgs, done = bob.sync(20, 10)
    assert [m["seq"] for m in msgs] == list(range(21, 26))
    assert (done["after"], done["last"], done["more"], done["truncated"]) == (20, 25, False, False)
    assert [m["msg_id"] for m in bob.sync_all(0)] == [r["msg_id"] for r in sent]

    for bad in (0, 1001):
        with pytest.raises(FlareError) as e:
            bob.sync(0, bad)
        assert e.value.code == "bad_frame"
    bob.ping()  # still open


def test_auth_failed_closes_4001(server):
    c = FlareClient.connect(server.url)
    bad = mint_token("not-the-secret", "alice")
    with pytest.raises(FlareError) as e:
        c.auth(bad)
    assert e.value.code == "auth_failed"
    code, _ = c.expect_close()
    assert code == 4001


def test_bad_frame_keeps_the_session(server):
    c, _ = server.login("alice", "phone")
    c.send_raw("{not json")
    v = c.recv()
    assert v["type"] == "error" and v["code"] == "bad_frame"
    c.ping()
    r = c.send("after", {"user": "alice"}, "still open")
    assert r["type"] == "send_ok"


def test_unknown_subprotocol_is_http_400(server):
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        FlareClient.connect(server.url, subprotocol="chat.v9")
    assert e.value.status_code == 400


def test_unauthenticated_first_frame_closes_4001(server):
    c = FlareClient.connect(server.url)
    c.send_frame({"type": "ping"})
    code, frames = c.expect_close()
    assert any(f["type"] == "error" and f["code"] == "unauthenticated" for f in frames), frames
    assert code == 4001
