//! Durability end to end (PROTOCOL.md §4, DESIGN.md §8): a message that got `send_ok`
//! survives `kill -9` of the process; seqs stay gap-free; a resend with the same `id`
//! never creates a second message; numbering continues after the restart.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const WINDOW: usize = 16;
const MAX_SENDS: u64 = 200_000;

struct StreamResult {
    /// (k, msg_id) of every send that got `send_ok`.
    acked: Vec<(u64, u64)>,
    /// Number of sends written to the socket (ids k0..k{sent-1}).
    sent: u64,
    errors: Vec<Value>,
    ended_by: String,
}

/// Streams sends `k{n}` (body `b{n}`, n from `first` on) from `c` to `to`, at most
/// WINDOW outstanding, until the connection breaks.
fn stream_sends(mut c: Client, to: &str, acked_count: Arc<AtomicU64>, first: u64) -> StreamResult {
    let mut acked = Vec::new();
    let mut errors = Vec::new();
    let mut outstanding: VecDeque<u64> = VecDeque::new();
    let mut next = first;
    let deadline = Instant::now() + Duration::from_secs(300);
    let ended_by = 'outer: loop {
        while outstanding.len() < WINDOW && next < first + MAX_SENDS {
            let f = serde_json::json!({"type": "send", "id": format!("k{next}"), "to": {"user": to}, "body": format!("b{next}")});
            if let Err(e) = c.try_send_json(&f) {
                break 'outer format!("send error: {e}");
            }
            outstanding.push_back(next);
            next += 1;
        }
        if Instant::now() > deadline {
            break "time bound".to_string();
        }
        match c.next_event(RECV_TIMEOUT) {
            Event::Frame(v) if v["type"] == "send_ok" => {
                let k: u64 = v["id"].as_str().unwrap()[1..].parse().unwrap();
                assert_eq!(v["dup"], false, "{v}");
                outstanding.retain(|x| *x != k);
                acked.push((k, msg_id(&v)));
                acked_count.fetch_add(1, Ordering::SeqCst);
            }
            Event::Frame(v) if v["type"] == "error" => {
                if let Some(k) = v["id"].as_str().and_then(|s| s[1..].parse::<u64>().ok()) {
                    outstanding.retain(|x| *x != k);
                }
                errors.push(v);
            }
            Event::Frame(_) => {} // own inbox copies
            Event::Timeout => break "stalled: no frame in RECV_TIMEOUT".to_string(),
            other => break format!("{other:?}"),
        }
    };
    StreamResult {
        acked,
        sent: next,
        errors,
        ended_by,
    }
}

/// Collects live `msg` frames until the connection ends.
fn collect_live(mut c: Client) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        match c.next_event(Duration::from_secs(120)) {
            Event::Frame(v) if v["type"] == "msg" => got.push(v),
            Event::Frame(_) => {}
            _ => return got,
        }
    }
}

fn k_of(m: &Value) -> u64 {
    m["body"]
        .as_str()
        .and_then(|b| b.strip_prefix('b'))
        .and_then(|k| k.parse().ok())
        .unwrap_or_else(|| panic!("{m}"))
}

/// Checks an inbox read after the crash against what the sender was told.
fn check_inbox(inbox: &[Value], r: &StreamResult, who: &str) {
    let n = inbox.len() as u64;
    assert_eq!(
        seqs(inbox),
        (1..=n).collect::<Vec<_>>(),
        "{who}: seqs after the restart must be gap-free from 1"
    );
    let ks: Vec<u64> = inbox.iter().map(k_of).collect();
    for w in ks.windows(2) {
        assert!(
            w[0] < w[1],
            "{who}: sends out of order or duplicated in the inbox: k{} then k{}",
            w[0],
            w[1]
        );
    }
    let by_k: HashMap<u64, u64> = inbox.iter().map(|m| (k_of(m), msg_id(m))).collect();
    let lost: Vec<u64> = r
        .acked
        .iter()
        .filter(|(k, _)| !by_k.contains_key(k))
        .map(|(k, _)| *k)
        .collect();
    assert!(
        lost.is_empty(),
        "{who}: {} messages that got send_ok are lost after kill -9: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    for (k, id) in &r.acked {
        assert_eq!(
            by_k[k], *id,
            "{who}: k{k} has another msg_id than its send_ok"
        );
    }
    if let Some(max) = ks.last() {
        assert!(*max < r.sent, "{who}: k{max} in the inbox was never sent");
    }
}

#[test]
fn kill9_mid_stream_loses_no_acknowledged_message() {
    let mut s = Server::start();
    let (mut bob_live, _) = s.login("bob", "phone", None);
    bob_live.ping_pong();
    let (alice, _) = s.login("alice", "phone", None);
    let count = Arc::new(AtomicU64::new(0));
    let c2 = count.clone();
    let sender = thread::spawn(move || stream_sends(alice, "bob", c2, 0));
    let receiver = thread::spawn(move || collect_live(bob_live));

    let deadline = Instant::now() + Duration::from_secs(120);
    while count.load(Ordering::SeqCst) < 300 {
        assert!(
            Instant::now() < deadline,
            "only {} send_ok in 120 s",
            count.load(Ordering::SeqCst)
        );
        assert!(!sender.is_finished(), "the sender stopped before the kill");
        thread::sleep(Duration::from_millis(5));
    }
    s.kill9();
    let r = sender.join().expect("sender thread");
    let live = receiver.join().expect("receiver thread");
    let unexpected: Vec<&Value> = r
        .errors
        .iter()
        .filter(|e| e["code"] != "unavailable")
        .collect();
    assert!(
        unexpected.is_empty(),
        "errors while streaming: {unexpected:?}"
    );
    eprintln!(
        "sent {}, acked {}, bob got {} live, sender ended by {}",
        r.sent,
        r.acked.len(),
        live.len(),
        r.ended_by
    );

    s.restart();
    let (mut audit_b, ok) = s.login("bob", "audit", None);
    let inbox_b = audit_b.sync_all(0);
    assert_eq!(
        ok["head_seq"],
        inbox_b.len() as u64,
        "bob's head_seq after the restart: {ok}"
    );
    check_inbox(&inbox_b, &r, "bob");
    // Whatever was delivered live before the crash is still there, at the same seq.
    for m in &live {
        let s_ = seq(m) as usize;
        assert!(
            s_ >= 1 && s_ <= inbox_b.len(),
            "bob got seq {s_} live, inbox has {} after the restart",
            inbox_b.len()
        );
        assert_eq!(
            inbox_b[s_ - 1]["msg_id"],
            m["msg_id"],
            "seq {s_} changed across the restart"
        );
    }
    let (mut audit_a, _) = s.login("alice", "audit", None);
    let inbox_a = audit_a.sync_all(0);
    check_inbox(&inbox_a, &r, "alice (sender's own inbox)");

    // Resending the last acknowledged id: dup, same msg_id (the dedup window outlives the crash).
    let (mut a, _) = s.login("alice", "phone", None);
    let (last_k, last_id) = *r.acked.iter().max_by_key(|(k, _)| *k).unwrap();
    let again = a.send_ok(&format!("k{last_k}"), "bob", &format!("b{last_k}"));
    assert_eq!(
        again["dup"], true,
        "resend of an acknowledged id after kill -9: {again}"
    );
    assert_eq!(
        msg_id(&again),
        last_id,
        "resend after kill -9: another msg_id"
    );
    // Resending every id that was sent but not acknowledged: each ends up stored exactly once.
    let acked_ks: HashSet<u64> = r.acked.iter().map(|(k, _)| *k).collect();
    let unacked: Vec<u64> = (0..r.sent).filter(|k| !acked_ks.contains(k)).collect();
    for k in &unacked {
        a.send_ok(&format!("k{k}"), "bob", &format!("b{k}"));
    }
    let fresh = a.send_ok("after-crash", "bob", "after the crash");
    // A fresh device (no live messages arrive on it) reads the final inbox.
    drop(audit_b);
    let (mut audit_b2, _) = s.login("bob", "audit2", None);
    let all = audit_b2.sync_all(0);
    let n = all.len() as u64;
    assert_eq!(
        seqs(&all),
        (1..=n).collect::<Vec<_>>(),
        "seqs after the resends"
    );
    let last = all.last().unwrap();
    assert_eq!(last["body"], "after the crash");
    assert_eq!(last["msg_id"], fresh["msg_id"]);
    let mut seen = HashSet::new();
    for m in &all[..all.len() - 1] {
        assert!(
            seen.insert(k_of(m)),
            "k{} stored twice after resends",
            k_of(m)
        );
    }
    for k in 0..r.sent {
        assert!(seen.contains(&k), "k{k} missing after resend");
    }
    let ids: HashSet<u64> = all.iter().map(msg_id).collect();
    assert_eq!(
        ids.len(),
        all.len(),
        "msg_ids must stay unique across the restart"
    );
}

/// A clean restart (SIGTERM, exit 0) keeps the inboxes; numbering continues.
#[test]
fn graceful_restart_keeps_inbox_and_numbering() {
    let mut s = Server::start();
    let (mut a, _) = s.login("alice", "phone", None);
    let ids: Vec<Value> = (1..=20)
        .map(|i| a.send_ok(&format!("g{i}"), "bob", &format!("b{i}")))
        .collect();
    a.close();
    let st = s
        .terminate(Duration::from_secs(60))
        .expect("no exit within 60 s of SIGTERM");
    assert_eq!(st.code(), Some(0), "{st:?}");
    s.restart();
    let (mut b, ok) = s.login("bob", "phone", None);
    assert_eq!(ok["head_seq"], 20, "{ok}");
    let all = b.sync_all(0);
    assert_eq!(seqs(&all), (1..=20).collect::<Vec<_>>());
    for (m, ok) in all.iter().zip(&ids) {
        assert_eq!(m["msg_id"], ok["msg_id"]);
    }
    let (mut a, ok) = s.login("alice", "phone", None);
    assert_eq!(ok["head_seq"], 20, "{ok}");
    a.send_ok("g21", "bob", "b21");
    let m = b.recv_until("msg", |v| v["type"] == "msg");
    assert_eq!(seq(&m), 21, "{m}");
}

/// Three rounds of stream → kill -9 → restart on the same data dir (recovery of a
/// recovered log): every acknowledged message of every round is there, gap-free.
#[test]
fn repeated_kill9_keeps_every_acknowledged_message() {
    let mut s = Server::start();
    let mut all = StreamResult {
        acked: Vec::new(),
        sent: 0,
        errors: Vec::new(),
        ended_by: String::new(),
    };
    for round in 0..3u64 {
        let (alice, _) = s.login("alice", "phone", None);
        let count = Arc::new(AtomicU64::new(0));
        let c2 = count.clone();
        let first = round * 1_000_000;
        let sender = thread::spawn(move || stream_sends(alice, "bob", c2, first));
        let deadline = Instant::now() + Duration::from_secs(120);
        while count.load(Ordering::SeqCst) < 100 + 50 * round {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {} send_ok in 120 s",
                count.load(Ordering::SeqCst)
            );
            assert!(
                !sender.is_finished(),
                "round {round}: the sender stopped before the kill"
            );
            thread::sleep(Duration::from_millis(2));
        }
        s.kill9();
        let r = sender.join().expect("sender thread");
        let unexpected: Vec<&Value> = r
            .errors
            .iter()
            .filter(|e| e["code"] != "unavailable")
            .collect();
        assert!(
            unexpected.is_empty(),
            "round {round}: errors while streaming: {unexpected:?}"
        );
        all.acked.extend(r.acked);
        all.sent = r.sent;
        s.restart();
        let (mut audit, ok) = s.login("bob", &format!("audit{round}"), None);
        let inbox = audit.sync_all(0);
        assert_eq!(ok["head_seq"], inbox.len() as u64, "round {round}: {ok}");
        check_inbox(&inbox, &all, &format!("bob after round {round}"));
    }
}
