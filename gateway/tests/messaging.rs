//! Messaging end to end (PROTOCOL.md §4, §5): 1:1 delivery to every device across
//! shards, dedup, `sync` paging, groups and block lists, per-sender order.

mod common;

use std::collections::{HashMap, HashSet};
use std::thread;

use common::*;
use serde_json::{json, Value};

/// Checks one inbox `msg` frame field by field.
#[allow(clippy::too_many_arguments)]
fn assert_msg(
    m: &Value,
    seq_: u64,
    ok: &Value,
    from: &str,
    from_device: &str,
    to: Value,
    body: &str,
    who: &str,
) {
    assert_eq!(m["type"], "msg", "[{who}] expected msg, got {m}");
    assert_eq!(m["seq"], seq_, "[{who}] seq: {m}");
    assert_eq!(
        msg_id(m),
        msg_id(ok),
        "[{who}] msg_id differs from send_ok's: {m} vs {ok}"
    );
    assert_eq!(m["from"], from, "[{who}] from: {m}");
    assert_eq!(m["from_device"], from_device, "[{who}] from_device: {m}");
    assert_eq!(m["to"], to, "[{who}] to: {m}");
    assert_eq!(m["body"], body, "[{who}] body: {m}");
    assert_eq!(
        m["ts"], ok["ts"],
        "[{who}] ts differs from send_ok's: {m} vs {ok}"
    );
}

fn assert_send_ok(ok: &Value, id: &str, dup: bool, t0: u64) {
    assert_eq!(ok["type"], "send_ok", "expected send_ok for {id}: {ok}");
    assert_eq!(ok["id"], id, "send_ok.id: {ok}");
    msg_id(ok);
    assert_eq!(ok["dup"], dup, "send_ok.dup: {ok}");
    let ts = ok["ts"]
        .as_u64()
        .unwrap_or_else(|| panic!("send_ok.ts must be a u64 (ms since epoch): {ok}"));
    // Same clock as ours: a sanity bound on the unit (ms), not a timing assertion.
    assert!(
        ts + 60_000 >= t0 && ts <= now_ms() + 60_000,
        "send_ok.ts {ts} is not ms since the epoch near {t0}"
    );
}

/// PROTOCOL §4: every inbox entry goes to every device of the recipient and of the
/// sender (sending device included), users on different shards.
#[test]
fn one_to_one_reaches_every_device_of_both_users_across_shards() {
    let s = Server::start();
    let t0 = now_ms();
    // Each user has one device on each shard, and the two "phone"s are on different shards.
    let (mut a_phone, ok) = s.login_on_shard("alice", "phone", 0, None);
    assert_eq!(ok["user"], "alice", "auth_ok.user: {ok}");
    assert_eq!(ok["device"], "phone", "auth_ok.device: {ok}");
    assert_eq!(ok["node"], NODE_ID, "auth_ok.node: {ok}");
    assert_eq!(
        ok["head_seq"], 0,
        "auth_ok.head_seq of an empty inbox: {ok}"
    );
    assert_eq!(
        ok["heartbeat_ms"], 30000,
        "auth_ok.heartbeat_ms default: {ok}"
    );
    let (mut b_phone, _) = s.login_on_shard("bob", "phone", 1, None);
    let (mut a_laptop, _) = s.login_on_shard("alice", "laptop", 1, None);
    let (mut b_laptop, _) = s.login_on_shard("bob", "laptop", 0, None);
    // Make sure all four sessions are fully registered before the first send.
    for c in [&mut a_phone, &mut b_phone, &mut a_laptop, &mut b_laptop] {
        c.ping_pong();
    }

    // alice/phone → bob
    a_phone.send_to_user("c-1", "bob", "hi bob");
    let ok1 = a_phone.recv();
    assert_send_ok(&ok1, "c-1", false, t0);
    let m = a_phone.recv();
    assert_msg(
        &m,
        1,
        &ok1,
        "alice",
        "phone",
        json!({"user": "bob"}),
        "hi bob",
        "alice/phone (sender)",
    );
    for (c, who) in [
        (&mut a_laptop, "alice/laptop"),
        (&mut b_phone, "bob/phone"),
        (&mut b_laptop, "bob/laptop"),
    ] {
        let m = c.recv();
        assert_msg(
            &m,
            1,
            &ok1,
            "alice",
            "phone",
            json!({"user": "bob"}),
            "hi bob",
            who,
        );
    }

    // bob/laptop → alice: seq 2 in both inboxes.
    b_laptop.send_to_user("c-1", "alice", "hi alice");
    let ok2 = b_laptop.recv();
    assert_send_ok(&ok2, "c-1", false, t0);
    assert_ne!(
        msg_id(&ok1),
        msg_id(&ok2),
        "two messages got the same msg_id"
    );
    let m = b_laptop.recv();
    assert_msg(
        &m,
        2,
        &ok2,
        "bob",
        "laptop",
        json!({"user": "alice"}),
        "hi alice",
        "bob/laptop (sender)",
    );
    for (c, who) in [
        (&mut a_phone, "alice/phone"),
        (&mut a_laptop, "alice/laptop"),
        (&mut b_phone, "bob/phone"),
    ] {
        let m = c.recv();
        assert_msg(
            &m,
            2,
            &ok2,
            "bob",
            "laptop",
            json!({"user": "alice"}),
            "hi alice",
            who,
        );
    }

    // alice/laptop → bob: seq 3.
    a_laptop.send_to_user("c-2", "bob", "third");
    let ok3 = a_laptop.recv();
    assert_send_ok(&ok3, "c-2", false, t0);
    let m = a_laptop.recv();
    assert_msg(
        &m,
        3,
        &ok3,
        "alice",
        "laptop",
        json!({"user": "bob"}),
        "third",
        "alice/laptop (sender)",
    );
    for (c, who) in [
        (&mut a_phone, "alice/phone"),
        (&mut b_phone, "bob/phone"),
        (&mut b_laptop, "bob/laptop"),
    ] {
        let m = c.recv();
        assert_msg(
            &m,
            3,
            &ok3,
            "alice",
            "laptop",
            json!({"user": "bob"}),
            "third",
            who,
        );
    }

    // Nothing else was delivered (no duplicate).
    for c in [&mut a_phone, &mut b_phone, &mut a_laptop, &mut b_laptop] {
        c.ping_pong();
        assert!(
            c.stashed().is_empty(),
            "[{}] unexpected frames: {:?}",
            c.name,
            c.stashed()
        );
    }
}

/// A message to oneself is one inbox entry, seen once per device.
#[test]
fn message_to_self_is_one_inbox_entry() {
    let s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    let (mut a2, _) = s.login("alice", "tablet", None);
    a2.ping_pong();
    let ok = a.send_ok("self-1", "alice", "note to self");
    let m = a.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &m,
        1,
        &ok,
        "alice",
        "phone",
        json!({"user": "alice"}),
        "note to self",
        "alice/phone",
    );
    let m = a2.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &m,
        1,
        &ok,
        "alice",
        "phone",
        json!({"user": "alice"}),
        "note to self",
        "alice/tablet",
    );
    let ok2 = a.send_ok("self-2", "alice", "second");
    let m = a.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &m,
        2,
        &ok2,
        "alice",
        "phone",
        json!({"user": "alice"}),
        "second",
        "alice/phone",
    );
}

/// PROTOCOL §4 idempotency: same (sender, id) → original msg_id and ts, dup:true, one inbox entry.
#[test]
fn dedup_same_id_is_stored_once() {
    let s = Server::start();
    let t0 = now_ms();
    let (mut a, _) = s.login("alice", "phone", None);
    let (mut b, _) = s.login("bob", "phone", None);
    b.ping_pong();

    let ok1 = a.send_ok("d-1", "bob", "once");
    assert_send_ok(&ok1, "d-1", false, t0);
    let ok2 = a.send_ok("d-1", "bob", "once");
    assert_send_ok(&ok2, "d-1", true, t0);
    assert_eq!(
        ok2["msg_id"], ok1["msg_id"],
        "dup send_ok must carry the original msg_id"
    );
    assert_eq!(
        ok2["ts"], ok1["ts"],
        "dup send_ok must carry the original ts"
    );
    // The pair is (sender user, id): a different body, or another device of the same user, is still a dup.
    let ok3 = a.send_ok("d-1", "bob", "a different body");
    assert_send_ok(&ok3, "d-1", true, t0);
    assert_eq!(ok3["msg_id"], ok1["msg_id"]);
    let (mut a2, _) = s.login("alice", "laptop", None);
    let ok4 = a2.send_ok("d-1", "bob", "once");
    assert_send_ok(&ok4, "d-1", true, t0);
    assert_eq!(ok4["msg_id"], ok1["msg_id"]);
    // Another sender with the same id is a different message.
    let okb = b.send_ok("d-1", "alice", "bob's d-1");
    assert_send_ok(&okb, "d-1", false, t0);
    assert_ne!(okb["msg_id"], ok1["msg_id"]);

    let ok5 = a.send_ok("d-2", "bob", "after");
    // bob's inbox: once (1), bob's own d-1 (2), after (3): the dups were not stored.
    let ms = b.recv_msgs(3);
    assert_eq!(seqs(&ms), vec![1, 2, 3], "bob's inbox: {ms:?}");
    assert_eq!(
        bodies(&ms),
        vec!["once", "bob's d-1", "after"],
        "bob's inbox: {ms:?}"
    );
    assert_eq!(ms[0]["msg_id"], ok1["msg_id"]);
    assert_eq!(ms[2]["msg_id"], ok5["msg_id"]);
    b.ping_pong();
    assert!(
        b.stashed().is_empty(),
        "bob got extra frames: {:?}",
        b.stashed()
    );

    // Same through sync on a fresh device.
    let (mut b2, ok) = s.login("bob", "tablet", None);
    assert_eq!(ok["head_seq"], 3, "{ok}");
    let all = b2.sync_all(0);
    assert_eq!(seqs(&all), vec![1, 2, 3]);
    assert_eq!(bodies(&all), vec!["once", "bob's d-1", "after"]);
}

/// PROTOCOL §5 `sync`: pages of `limit`, `sync_done{after,last,more,truncated}`; limit 1..=1000.
#[test]
fn sync_pages_through_the_inbox() {
    let s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    let mut oks = Vec::new();
    for i in 1..=25 {
        oks.push(a.send_ok(&format!("p-{i}"), "bob", &format!("body {i}")));
    }
    // A device seen for the first time starts at the head: nothing is pushed to it.
    let (mut b, ok) = s.login("bob", "tablet", None);
    assert_eq!(ok["head_seq"], 25, "auth_ok.head_seq: {ok}");

    let page = |b: &mut Client, after: u64, limit: u32, want: Vec<u64>, more: bool| {
        let (msgs, done) = b.sync_page(after, limit);
        assert_eq!(seqs(&msgs), want, "sync after={after} limit={limit}: seqs");
        for m in &msgs {
            let i = seq(m) as usize;
            assert_eq!(m["body"], format!("body {i}"), "sync: {m}");
            assert_eq!(m["msg_id"], oks[i - 1]["msg_id"], "sync: {m}");
            assert_eq!(m["from"], "alice");
            assert_eq!(m["from_device"], "phone");
            assert_eq!(m["to"], json!({"user": "bob"}));
        }
        assert_eq!(done["type"], "sync_done");
        assert_eq!(done["after"], after, "sync_done.after: {done}");
        if let Some(last) = want.last() {
            assert_eq!(done["last"], *last, "sync_done.last: {done}");
        }
        assert_eq!(done["more"], more, "sync_done.more: {done}");
        assert_eq!(done["truncated"], false, "sync_done.truncated: {done}");
    };
    page(&mut b, 0, 10, (1..=10).collect(), true);
    page(&mut b, 10, 10, (11..=20).collect(), true);
    page(&mut b, 20, 10, (21..=25).collect(), false);
    page(&mut b, 25, 10, vec![], false);
    page(&mut b, 100, 10, vec![], false);
    page(&mut b, 5, 1000, (6..=25).collect(), false);
    page(&mut b, 0, 1, (1..=1).collect(), true);
    page(&mut b, 24, 1, (25..=25).collect(), false);

    for bad in [0u32, 1001] {
        b.send_json(json!({"type": "sync", "after": 0, "limit": bad}));
        let e = b.recv();
        assert_error(&e, "bad_frame", None);
        b.ping_pong();
    }
    // The connection is still fine.
    page(&mut b, 0, 25, (1..=25).collect(), false);
    // The sender's own inbox has the same 25 entries (first the live copies, then by sync).
    assert_eq!(seqs(&a.recv_msgs(25)), (1..=25).collect::<Vec<_>>());
    let mine = a.sync_all(0);
    assert_eq!(seqs(&mine), (1..=25).collect::<Vec<_>>());
}

/// Groups (admin API) fan out to every member with each member's own seq; a
/// non-member gets `forbidden` naming the send, and stays connected.
#[test]
fn group_fan_out_and_membership() {
    let s = Server::start();
    s.put_group("g1", &["alice", "bob", "carol"]);
    let r = s.admin("GET", "/v1/groups/g1", None);
    assert_eq!(r.status, 200, "{r:?}");
    let mut members: Vec<String> = serde_json::from_value(r.json()["members"].clone()).unwrap();
    members.sort();
    assert_eq!(members, ["alice", "bob", "carol"]);
    assert_eq!(r.json()["group"], "g1");

    let (mut a, _) = s.login_on_shard("alice", "phone", 0, None);
    let (mut b, _) = s.login_on_shard("bob", "phone", 1, None);
    let (mut c, _) = s.login("carol", "phone", None);
    let (mut m, _) = s.login("mallory", "phone", None);
    // Give the members different inbox heads: carol → bob 1:1 first.
    c.send_ok("pre", "bob", "pre");
    assert_eq!(seqs(&b.recv_msgs(1)), vec![1]);
    assert_eq!(seqs(&c.recv_msgs(1)), vec![1]);

    a.send_to_group("g-1", "g1", "hello group");
    let ok = a.answer_to("g-1");
    assert_eq!(ok["type"], "send_ok", "{ok}");
    assert_eq!(ok["dup"], false);
    for (cl, want_seq, who) in [
        (&mut a, 1, "alice"),
        (&mut b, 2, "bob"),
        (&mut c, 2, "carol"),
    ] {
        let msg = cl.recv_until("msg", |v| v["type"] == "msg");
        assert_msg(
            &msg,
            want_seq,
            &ok,
            "alice",
            "phone",
            json!({"group": "g1"}),
            "hello group",
            who,
        );
    }

    // Non-member.
    m.send_to_group("m-1", "g1", "let me in");
    let e = m.answer_to("m-1");
    assert_error(&e, "forbidden", Some("m-1"));
    m.ping_pong();
    // Still connected and working: mallory → alice 1:1 is alice's next message.
    let okm = m.send_ok("m-2", "alice", "hi alice");
    let msg = a.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &msg,
        2,
        &okm,
        "mallory",
        "phone",
        json!({"user": "alice"}),
        "hi alice",
        "alice",
    );
    // mallory's own inbox has no trace of the refused send.
    assert_eq!(seqs(&m.recv_msgs(1)), vec![1]);

    // Membership change: add mallory, remove carol.
    let r = s.admin(
        "POST",
        "/v1/groups/g1/members",
        Some(json!({"add": ["mallory"], "remove": ["carol"]})),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = s.admin("GET", "/v1/groups/g1", None);
    let mut members: Vec<String> = serde_json::from_value(r.json()["members"].clone()).unwrap();
    members.sort();
    assert_eq!(members, ["alice", "bob", "mallory"]);
    let okg = m.send_ok_group("m-3", "g1", "now a member");
    for (cl, want_seq, who) in [
        (&mut a, 3, "alice"),
        (&mut b, 3, "bob"),
        (&mut m, 2, "mallory"),
    ] {
        let msg = cl.recv_until("msg", |v| v["type"] == "msg");
        assert_msg(
            &msg,
            want_seq,
            &okg,
            "mallory",
            "phone",
            json!({"group": "g1"}),
            "now a member",
            who,
        );
    }
    c.send_to_group("c-9", "g1", "still in?");
    assert_error(&c.answer_to("c-9"), "forbidden", Some("c-9"));
    // carol did not get mallory's group message: her next message is this marker.
    let okx = a.send_ok("x-1", "carol", "marker");
    let msg = c.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &msg,
        3,
        &okx,
        "alice",
        "phone",
        json!({"user": "carol"}),
        "marker",
        "carol",
    );
}

/// `PUT /v1/users/{u}/blocked`: messages from those users to u get `forbidden`.
#[test]
fn block_list_refuses_with_forbidden() {
    let s = Server::start();
    let (mut b, _) = s.login("bob", "phone", None);
    let (mut m, _) = s.login("mallory", "phone", None);
    let (mut a, _) = s.login("alice", "phone", None);
    s.set_blocked("bob", &["mallory"]);

    m.send_to_user("m-1", "bob", "spam");
    assert_error(&m.answer_to("m-1"), "forbidden", Some("m-1"));
    m.ping_pong();
    // Others are not affected, mallory can still write to others.
    m.send_ok("m-2", "alice", "hi alice");
    a.send_ok("a-1", "bob", "hi bob");
    let msg = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(
        msg["from"], "alice",
        "bob's first message must be alice's: {msg}"
    );
    assert_eq!(msg["seq"], 1);
    // Unblock.
    s.set_blocked("bob", &[]);
    let ok = m.send_ok("m-3", "bob", "sorry");
    let msg = b.recv_until("msg", |v| v["type"] == "msg");
    assert_msg(
        &msg,
        2,
        &ok,
        "mallory",
        "phone",
        json!({"user": "bob"}),
        "sorry",
        "bob",
    );
}

/// PROTOCOL §4 order: 20 concurrent senders × 50 messages to one recipient. The
/// recipient's inbox is 1..=1000 gap-free, each sender's messages in send order, on
/// a live connection and through `sync`; each sender's own inbox is 1..=50 in order.
#[test]
fn concurrent_senders_keep_per_sender_order_and_gap_free_seqs() {
    const SENDERS: usize = 20;
    const EACH: usize = 50;
    let s = Server::start();
    let (mut live, ok) = s.login("rcpt", "live", None);
    assert_eq!(ok["head_seq"], 0);
    live.ping_pong();

    let ws = s.ws;
    let handles: Vec<_> = (0..SENDERS)
        .map(|i| {
            thread::spawn(move || {
                let user = format!("s{i}");
                let mut c = Client::connect(ws, None).expect("connect");
                c.name = format!("{user}/d");
                let ok = c.auth(&token(&user), Some("d"), None);
                c.name = format!("{user}/d session {}", ok["session"]);
                // Pipelined: all 50 sends, then the answers.
                for k in 0..EACH {
                    c.send_to_user(&format!("{user}-{k}"), "rcpt", &format!("{user}:{k}"));
                }
                let mut ids = Vec::new();
                for k in 0..EACH {
                    let a = c.answer_to(&format!("{user}-{k}"));
                    assert_eq!(a["type"], "send_ok", "[{user}] send {k}: {a}");
                    assert_eq!(a["dup"], false);
                    ids.push(msg_id(&a));
                }
                let own = c.recv_msgs(EACH);
                assert_eq!(
                    seqs(&own),
                    (1..=EACH as u64).collect::<Vec<_>>(),
                    "[{user}] own inbox seqs"
                );
                let want: Vec<String> = (0..EACH).map(|k| format!("{user}:{k}")).collect();
                assert_eq!(bodies(&own), want, "[{user}] own inbox order");
                assert_eq!(
                    own.iter().map(msg_id).collect::<Vec<_>>(),
                    ids,
                    "[{user}] own inbox msg_ids"
                );
                c.close();
                (user, ids)
            })
        })
        .collect();
    let mut sent: HashMap<String, Vec<u64>> = HashMap::new();
    let mut failures = Vec::new();
    for h in handles {
        match h.join() {
            Ok((user, ids)) => {
                sent.insert(user, ids);
            }
            Err(e) => failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
            ),
        }
    }
    assert!(failures.is_empty(), "sender threads failed: {failures:#?}");

    let n = SENDERS * EACH;
    let check = |inbox: &[Value], how: &str| {
        assert_eq!(
            seqs(inbox),
            (1..=n as u64).collect::<Vec<_>>(),
            "{how}: seqs must be 1..={n} in order"
        );
        let mut per_sender: HashMap<String, Vec<u64>> = HashMap::new();
        let mut seen = HashSet::new();
        for m in inbox {
            assert!(seen.insert(msg_id(m)), "{how}: msg_id twice: {m}");
            let from = m["from"].as_str().unwrap().to_string();
            let body = m["body"].as_str().unwrap();
            let (u, k) = body.split_once(':').unwrap();
            assert_eq!(u, from, "{how}: {m}");
            let list = per_sender.entry(from).or_default();
            assert_eq!(
                k.parse::<usize>().unwrap(),
                list.len(),
                "{how}: {u}'s messages out of send order at {m}"
            );
            list.push(msg_id(m));
        }
        for (u, ids) in &sent {
            assert_eq!(
                per_sender.get(u),
                Some(ids),
                "{how}: {u}'s msg_ids differ from its send_oks"
            );
        }
    };
    let got = live.recv_msgs(n);
    check(&got, "live connection");
    let (mut sync, ok) = s.login("rcpt", "sync", None);
    assert_eq!(ok["head_seq"], n as u64);
    let all = sync.sync_all(0);
    check(&all, "sync");
    for (a, b) in got.iter().zip(&all) {
        assert_eq!(a, b, "live and sync disagree");
    }
}

trait GroupSend {
    fn send_ok_group(&mut self, id: &str, group: &str, body: &str) -> Value;
}

impl GroupSend for Client {
    fn send_ok_group(&mut self, id: &str, group: &str, body: &str) -> Value {
        self.send_to_group(id, group, body);
        let a = self.answer_to(id);
        assert_eq!(a["type"], "send_ok", "[{}] group send {id}: {a}", self.name);
        a
    }
}

/// A backlog larger than `outbound_bytes_max` (default 4 MiB) is still delivered to a
/// client that reads as fast as it can, by resume and by one `sync` page of 1000:
/// 4008 is for slow consumers (PROTOCOL §7), not for the server's own bursts, and
/// "every device eventually receives every inbox entry inside retention" (DESIGN §8).
#[test]
fn large_backlog_is_delivered_to_a_fast_reader_by_resume_and_sync() {
    const N: usize = 100; // 100 × 60 KB = 6 MB > outbound_bytes_max (4 MiB)
    let s = Server::with_args(&["--outbound-bytes-max", "4194304"]);
    let (mut a, _) = s.login("alice", "phone", None);
    let body = "z".repeat(60_000);
    for i in 0..N {
        a.send_ok(&format!("big{i}"), "bob", &body);
        a.recv_until("own copy", |v| v["type"] == "msg");
    }
    // Resume from 0: the client reads as fast as it can.
    let (mut b, ok) = s.login("bob", "phone", Some(0));
    assert_eq!(ok["head_seq"], N as u64);
    let mut got = Vec::new();
    while got.len() < N {
        match b.next_event(RECV_TIMEOUT) {
            Event::Frame(v) if v["type"] == "msg" => got.push(seq(&v)),
            Event::Frame(_) => {}
            other => panic!(
                "resume of a {N} × 60 KB backlog: after {} messages got {other:?}",
                got.len()
            ),
        }
    }
    assert_eq!(got, (1..=N as u64).collect::<Vec<_>>());
    // Sync pages of up to 1000: the server may cut a page by bytes (`more: true`),
    // and paging on from `last` must give every entry once, in order, no 4008.
    let (mut t, _) = s.login("bob", "tablet", None);
    let mut got = Vec::new();
    let mut after = 0u64;
    loop {
        t.send_json(json!({"type": "sync", "after": after, "limit": 1000}));
        let more = loop {
            match t.next_event(RECV_TIMEOUT) {
                Event::Frame(v) if v["type"] == "msg" => got.push(seq(&v)),
                Event::Frame(v) if v["type"] == "sync_done" => {
                    after = v["last"].as_u64().expect("sync_done.last");
                    break v["more"] == true;
                }
                Event::Frame(_) => {}
                other => panic!(
                    "sync of a {N} × 60 KB inbox: after {} messages got {other:?}",
                    got.len()
                ),
            }
        };
        if !more {
            break;
        }
    }
    assert_eq!(got, (1..=N as u64).collect::<Vec<_>>());
}

/// §4 retention: with `--retention-messages 10`, asking for older messages yields
/// `sync_done{truncated:true}`; what is kept is the last 10, gap-free.
#[test]
fn sync_older_than_retention_is_truncated() {
    let s = Server::with_args(&["--retention-messages", "10"]);
    let (mut a, _) = s.login("alice", "phone", None);
    for i in 1..=25 {
        a.send_ok(&format!("t{i}"), "bob", &format!("body {i}"));
    }
    let (mut b, ok) = s.login("bob", "tablet", None);
    assert_eq!(ok["head_seq"], 25, "{ok}");
    let (msgs, done) = b.sync_page(0, 100);
    assert_eq!(
        done["truncated"], true,
        "sync after 0 with only seqs 16..=25 retained: {done}"
    );
    assert_eq!(done["after"], 0, "{done}");
    // Whatever this page carries is retained messages, ascending, gap-free.
    let got = seqs(&msgs);
    assert!(
        got.iter().all(|s| (16..=25).contains(s)),
        "messages outside retention: {got:?}"
    );
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    // From the retention edge on, nothing is truncated.
    let (msgs, done) = b.sync_page(15, 100);
    assert_eq!(seqs(&msgs), (16..=25).collect::<Vec<_>>());
    assert_eq!(done["truncated"], false, "{done}");
    assert_eq!(done["last"], 25, "{done}");
    assert_eq!(done["more"], false, "{done}");
}
