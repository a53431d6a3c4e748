//! The engine's rules, stepped with a simulated clock and a simulated log.

use super::*;
use crate::api::Entry;

const T0: u64 = 1_800_000_000_000;
const ADMIN: Endpoint = 9;

fn cfg() -> PipelineConfig {
    let mut c = PipelineConfig::new("", "node-a");
    c.catchup_page = 3;
    c
}

fn conn(endpoint: Endpoint, conn: u64) -> ConnRef {
    ConnRef { endpoint, conn }
}

fn user(u: &str) -> Target {
    Target::User(u.into())
}

fn group(g: &str) -> Target {
    Target::Group(g.into())
}

fn seqs(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.seq).collect()
}

type Out = Vec<(Endpoint, Event)>;

/// An engine, a clock, and the records a perfect log made durable.
struct Sim {
    e: Engine,
    now: u64,
    log: Vec<Record>,
}

impl Sim {
    fn new(cfg: PipelineConfig) -> Self {
        Self {
            e: Engine::new(&cfg, ADMIN),
            now: T0,
            log: Vec::new(),
        }
    }

    fn req(&mut self, r: Request) -> Out {
        self.e.handle(r, self.now);
        self.e.take_outputs().collect()
    }

    /// Seals, "writes", commits; returns what the commit released.
    fn commit(&mut self) -> Out {
        if let Some(records) = self.e.seal() {
            self.log.extend_from_slice(records);
            self.e.commit_done(self.now);
        }
        self.e.take_outputs().collect()
    }

    fn open(
        &mut self,
        c: ConnRef,
        u: &str,
        device: &str,
        last_seq: Option<u64>,
    ) -> (u64, Vec<u64>, bool) {
        let out = self.req(Request::Open {
            conn: c,
            user: u.into(),
            device: device.into(),
            last_seq,
        });
        let opened = out.into_iter().find_map(|(ep, ev)| match ev {
            Event::Opened {
                conn,
                head_seq,
                entries,
                caught_up,
                ..
            } if conn == c => {
                assert_eq!(ep, c.endpoint);
                Some((head_seq, seqs(&entries), caught_up))
            }
            _ => None,
        });
        opened.expect("Opened answers Open")
    }

    fn send(&mut self, c: ConnRef, id: &str, to: Target) -> Out {
        self.req(Request::Send {
            conn: c,
            id: id.into(),
            to,
            body: format!("body of {id}"),
        })
    }

    fn admin(&mut self, token: u64, op: AdminOp) -> Out {
        self.req(Request::Admin { token, op })
    }

    fn post(&mut self, token: u64, from: &str, to: Target, id: Option<&str>) -> Out {
        self.admin(
            token,
            AdminOp::PostMessage {
                from: from.into(),
                to,
                body: "system says".into(),
                id: id.map(Into::into),
            },
        )
    }

    fn put_group(&mut self, g: &str, members: &[&str]) {
        self.admin(
            1,
            AdminOp::PutGroup {
                group: g.into(),
                members: members.iter().map(|m| m.to_string()).collect(),
            },
        );
        self.commit();
    }

    fn stats(&mut self) -> Stats {
        match self.admin(77, AdminOp::Stats).pop() {
            Some((
                ADMIN,
                Event::Admin {
                    token: 77,
                    reply: AdminReply::Stats(s),
                },
            )) => s,
            other => panic!("expected stats, got {other:?}"),
        }
    }
}

/// Seqs delivered live to `c` in `out`.
fn delivered(out: &Out, c: ConnRef) -> Vec<u64> {
    out.iter()
        .filter(|(ep, _)| *ep == c.endpoint)
        .flat_map(|(_, ev)| match ev {
            Event::Deliver { msgs, items } => items
                .iter()
                .filter(|l| l.conn == c.conn)
                .map(|l| {
                    assert!(l.msg < msgs.len(), "an item names a message of its event");
                    l.seq
                })
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// `(id, msg_id, ts, dup)` of every SendOk in `out`.
fn send_oks(out: &Out) -> Vec<(String, u64, u64, bool)> {
    out.iter()
        .filter_map(|(_, ev)| match ev {
            Event::SendOk {
                id,
                msg_id,
                ts,
                dup,
                ..
            } => Some((id.clone(), *msg_id, *ts, *dup)),
            _ => None,
        })
        .collect()
}

fn failed_code(out: &Out) -> Option<ErrorCode> {
    out.iter().find_map(|(_, ev)| match ev {
        Event::SendFailed { code, .. } => Some(*code),
        Event::Admin {
            reply: AdminReply::Refused { code, .. },
            ..
        } => Some(*code),
        _ => None,
    })
}

#[test]
fn one_to_one_gives_both_inboxes_the_next_seq_once_durable() {
    let mut s = Sim::new(cfg());
    let (a, b) = (conn(0, 1), conn(1, 2));
    assert_eq!(s.open(a, "alice", "phone", None), (0, vec![], true));
    assert_eq!(s.open(b, "bob", "phone", None), (0, vec![], true));
    s.commit();

    assert!(
        s.send(a, "m1", user("bob")).is_empty(),
        "nothing before the commit"
    );
    let out = s.commit();
    // SendOk first, then one Deliver per endpoint.
    assert!(matches!(&out[0], (0, Event::SendOk { id, dup: false, .. }) if id == "m1"));
    assert_eq!(out.len(), 3);
    assert_eq!(delivered(&out, b), vec![1]);
    assert_eq!(
        delivered(&out, a),
        vec![1],
        "the sender's own copy reaches the sending device"
    );

    s.send(b, "r1", user("alice"));
    s.send(a, "note", user("alice"));
    let out = s.commit();
    assert_eq!(
        delivered(&out, a),
        vec![2, 3],
        "a message to oneself is one entry"
    );
    assert_eq!(delivered(&out, b), vec![2]);
    assert_eq!(
        out.iter()
            .filter(|(ep, ev)| *ep == 0 && matches!(ev, Event::Deliver { .. }))
            .count(),
        1,
        "one Deliver per endpoint per commit"
    );
    assert_eq!(s.e.state().head("alice"), 3);
    assert_eq!(s.e.state().head("bob"), 2);

    // The entries carry the message as accepted.
    let page = s.e.state().page("bob", 0, 10);
    let m = &page.entries[0].msg;
    assert_eq!(
        (&*m.from, &*m.from_device, &m.to, m.ts),
        ("alice", "phone", &user("bob"), T0)
    );
    let oks = send_oks(&s.send(a, "m1", user("bob")));
    assert_eq!(oks[0].1, m.msg_id, "a dup names the original msg_id");
}

#[test]
fn a_send_without_a_session_is_unavailable() {
    let mut s = Sim::new(cfg());
    let out = s.send(conn(0, 5), "x", user("bob"));
    assert_eq!(failed_code(&out), Some(ErrorCode::Unavailable));
    assert!(s.e.seal().is_none());
}

#[test]
fn group_messages_fan_out_to_every_member_and_device() {
    let mut s = Sim::new(cfg());
    let (a1, a2, b) = (conn(0, 1), conn(1, 2), conn(1, 3));
    s.open(a1, "a", "phone", None);
    s.open(a2, "a", "laptop", None);
    s.open(b, "b", "phone", None);
    s.put_group("g", &["a", "b", "c"]);
    s.send(a1, "hello", group("g"));
    let out = s.commit();
    assert_eq!(delivered(&out, a1), vec![1]);
    assert_eq!(delivered(&out, a2), vec![1]);
    assert_eq!(delivered(&out, b), vec![1]);
    let ep1: Vec<_> = out
        .iter()
        .filter(|(ep, ev)| *ep == 1 && matches!(ev, Event::Deliver { .. }))
        .collect();
    assert_eq!(
        ep1.len(),
        1,
        "both connections of endpoint 1 in one Deliver"
    );
    let (_, Event::Deliver { msgs, items }) = ep1[0] else {
        unreachable!("filtered on Deliver")
    };
    assert_eq!(msgs.len(), 1, "the group message is in the event once");
    assert!(items.iter().all(|l| l.msg == 0));
    assert_eq!(
        s.e.state().head("c"),
        1,
        "offline members get the entry in their inbox"
    );
    // Every inbox holds the same message.
    let id = |u: &str| s.e.state().page(u, 0, 1).entries[0].msg.msg_id;
    assert_eq!(id("a"), id("c"));
    assert_eq!(id("b"), id("c"));
    // The group's next message is the next seq everywhere, the sender included.
    s.send(b, "again", group("g"));
    let out = s.commit();
    assert_eq!(delivered(&out, a1), vec![2]);
    assert_eq!(delivered(&out, b), vec![2]);
}

#[test]
fn pre_send_hooks_refuse_unknown_groups_non_members_and_blocked_senders() {
    let mut s = Sim::new(cfg());
    let (a, c) = (conn(0, 1), conn(0, 3));
    s.open(a, "alice", "phone", None);
    s.open(c, "carol", "phone", None);
    s.commit();
    assert_eq!(
        failed_code(&s.send(a, "1", group("nope"))),
        Some(ErrorCode::Forbidden)
    );
    s.put_group("g", &["bob", "carol"]);
    assert_eq!(
        failed_code(&s.send(a, "2", group("g"))),
        Some(ErrorCode::Forbidden)
    );

    // The block takes effect for decisions at once, and is answered Done once durable.
    let out = s.admin(
        5,
        AdminOp::PutBlocked {
            user: "bob".into(),
            users: vec!["alice".into()],
        },
    );
    assert!(out.is_empty());
    assert_eq!(
        failed_code(&s.send(a, "3", user("bob"))),
        Some(ErrorCode::Forbidden)
    );
    let out = s.commit();
    assert!(matches!(
        &out[..],
        [(
            ADMIN,
            Event::Admin {
                token: 5,
                reply: AdminReply::Done
            }
        )]
    ));
    assert_eq!(
        failed_code(&s.send(a, "4", user("bob"))),
        Some(ErrorCode::Forbidden)
    );
    assert_eq!(
        failed_code(&s.post(6, "alice", user("bob"), None)),
        Some(ErrorCode::Forbidden)
    );
    assert!(
        s.send(c, "5", user("bob")).is_empty(),
        "others still reach bob"
    );
    assert_eq!(send_oks(&s.commit()).len(), 1);
    assert_eq!(s.e.state().head("bob"), 1);
    assert_eq!(s.e.state().head("alice"), 0, "refused sends leave no entry");

    // A refused id is not remembered: once allowed, the same id goes through.
    s.admin(
        7,
        AdminOp::PutBlocked {
            user: "bob".into(),
            users: vec![],
        },
    );
    s.commit();
    s.send(a, "3", user("bob"));
    assert!(!send_oks(&s.commit())[0].3);
}

#[test]
fn dedup_answers_the_original_ids_even_from_the_same_batch() {
    let mut c = cfg();
    c.dedup_window_ms = 60_000;
    let mut s = Sim::new(c);
    let a = conn(0, 1);
    s.open(a, "alice", "phone", None);
    s.commit();

    s.send(a, "x", user("bob"));
    let first = send_oks(&s.commit());
    let (_, msg_id, ts, dup) = first[0].clone();
    assert!(!dup);

    s.now += 1000;
    let again = send_oks(&s.send(a, "x", user("bob")));
    assert_eq!(
        again,
        vec![("x".to_string(), msg_id, ts, true)],
        "answered at once: already durable"
    );
    assert!(s.e.seal().is_none(), "a dup is not stored again");

    // Same batch: both answers wait for the commit.
    assert!(s.send(a, "y", user("bob")).is_empty());
    assert!(s.send(a, "y", user("bob")).is_empty());
    let oks = send_oks(&s.commit());
    assert_eq!(oks.len(), 2);
    assert_eq!((oks[0].1, oks[0].2, oks[0].3), (oks[1].1, oks[1].2, false));
    assert!(oks[1].3);

    // Original in flight, dup arrives meanwhile: answered with the in-flight batch.
    s.send(a, "z", user("bob"));
    assert!(s.e.seal().is_some());
    assert!(s.send(a, "z", user("bob")).is_empty());
    s.e.commit_done(s.now);
    let oks = send_oks(&s.e.take_outputs().collect());
    assert_eq!(oks.len(), 2);
    assert_eq!(oks[0].1, oks[1].1);
    assert!(oks[1].3);
    assert!(s.e.seal().is_none(), "the dup added no record");
    assert_eq!(s.e.state().head("bob"), 3);

    // Another sender may use the same id.
    let b = conn(0, 2);
    s.open(b, "bob", "phone", None);
    s.send(b, "x", user("alice"));
    assert!(!send_oks(&s.commit())[0].3);

    // Out of the window: a new message.
    s.now += 60_001;
    s.send(a, "x", user("bob"));
    let oks = send_oks(&s.commit());
    assert!(!oks[0].3);
    assert_ne!(oks[0].1, msg_id);

    // Admin posts: deduplicated only with an id.
    s.post(1, "system", user("bob"), None);
    s.post(2, "system", user("bob"), None);
    s.post(3, "system", user("bob"), Some("p"));
    s.post(4, "system", user("bob"), Some("p"));
    let out = s.commit();
    let posted: Vec<(u64, u64, bool)> = out
        .iter()
        .filter_map(|(ep, ev)| match ev {
            Event::Admin {
                token,
                reply: AdminReply::Posted { msg_id, dup, .. },
            } => {
                assert_eq!(*ep, ADMIN);
                Some((*token, *msg_id, *dup))
            }
            _ => None,
        })
        .collect();
    assert_eq!(posted.len(), 4);
    assert_ne!(posted[0].1, posted[1].1);
    assert_eq!(posted[2].1, posted[3].1);
    assert_eq!((posted[2].2, posted[3].2), (false, true));
    assert_eq!(s.stats().messages_dup, 4);
}

/// Everything `c` saw, in order: catch-up pages and live deliveries.
fn seen_by(out: &Out, c: ConnRef) -> (Vec<u64>, Option<bool>) {
    let mut seen = Vec::new();
    let mut caught_up = None;
    for (ep, ev) in out {
        if *ep != c.endpoint {
            continue;
        }
        match ev {
            Event::Opened {
                conn,
                entries,
                caught_up: cu,
                ..
            }
            | Event::CatchUpPage {
                conn,
                entries,
                caught_up: cu,
            } if *conn == c => {
                seen.extend(seqs(entries));
                caught_up = Some(*cu);
            }
            Event::Deliver { items, .. } => {
                seen.extend(items.iter().filter(|l| l.conn == c.conn).map(|l| l.seq))
            }
            _ => {}
        }
    }
    (seen, caught_up)
}

#[test]
fn catch_up_with_live_messages_has_no_gap_and_no_duplicate() {
    // Pages of 4 entries against up to 3 new entries per page: catch-up converges.
    let mut c = cfg();
    c.catchup_page = 4;
    for live_per_page in 0..3 {
        let mut s = Sim::new(c.clone());
        let (a, b) = (conn(0, 1), conn(1, 2));
        s.open(a, "alice", "phone", None);
        for i in 0..10 {
            s.send(a, &format!("old{i}"), user("bob"));
        }
        s.commit();
        let mut seen = Vec::new();
        let mut all: Out = Vec::new();
        all.extend(s.req(Request::Open {
            conn: b,
            user: "bob".into(),
            device: "phone".into(),
            last_seq: Some(0),
        }));
        let mut n = 0;
        for round in 0.. {
            assert!(round < 100, "catch-up does not converge");
            let (page, caught_up) = seen_by(&all, b);
            seen.extend(page);
            all.clear();
            // Live traffic while the page is being written, some committed, some in flight.
            for _ in 0..live_per_page {
                n += 1;
                s.send(a, &format!("live{n}"), user("bob"));
                all.extend(s.commit());
            }
            s.send(a, &format!("inflight{n}"), user("bob"));
            n += 1;
            s.e.seal();
            if caught_up == Some(true) {
                s.e.commit_done(s.now);
                all.extend(s.e.take_outputs());
                let (rest, _) = seen_by(&all, b);
                seen.extend(rest);
                break;
            }
            let after = *seen.last().unwrap_or(&0);
            all.extend(s.req(Request::CatchUp { conn: b, after }));
            s.e.commit_done(s.now);
            all.extend(s.e.take_outputs());
        }
        // One more live message after catch-up.
        s.send(a, "tail", user("bob"));
        let (rest, _) = seen_by(&s.commit(), b);
        seen.extend(rest);
        let head = s.e.state().head("bob");
        assert_eq!(
            seen,
            (1..=head).collect::<Vec<_>>(),
            "live_per_page={live_per_page}"
        );
    }
}

#[test]
fn a_new_device_starts_at_the_head_and_is_remembered() {
    let mut s = Sim::new(cfg());
    let a = conn(0, 1);
    s.open(a, "alice", "phone", None);
    for i in 0..5 {
        s.send(a, &i.to_string(), user("bob"));
    }
    s.commit();
    let t = conn(1, 7);
    assert_eq!(
        s.open(t, "bob", "tablet", None),
        (5, vec![], true),
        "only new messages"
    );
    assert!(
        s.e.seal().is_some_and(|r| r.contains(&Record::Cursor {
            user: "bob".into(),
            device: "tablet".into(),
            seq: 5
        })),
        "the device is seen durably"
    );
    s.e.commit_done(s.now);
    s.req(Request::Closed { conn: t });
    s.send(a, "5", user("bob"));
    s.send(a, "6", user("bob"));
    s.commit();
    let t2 = conn(1, 8);
    assert_eq!(
        s.open(t2, "bob", "tablet", None),
        (7, vec![6, 7], true),
        "resumes from its cursor"
    );
}

#[test]
fn resume_by_ack_cursor_and_by_last_seq() {
    let mut s = Sim::new(cfg());
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    s.open(b, "bob", "phone", None);
    for i in 0..5 {
        s.send(a, &i.to_string(), user("bob"));
    }
    assert_eq!(delivered(&s.commit(), b), vec![1, 2, 3, 4, 5]);
    s.req(Request::Ack { conn: b, seq: 3 });
    s.req(Request::Ack { conn: b, seq: 2 });
    assert_eq!(
        s.e.state().cursor("bob", "phone"),
        Some(3),
        "never backwards"
    );
    s.commit();
    s.req(Request::Closed { conn: b });

    let b2 = conn(1, 3);
    assert_eq!(s.open(b2, "bob", "phone", None), (5, vec![4, 5], true));
    let b3 = conn(1, 4);
    assert_eq!(
        s.open(b3, "bob", "phone", Some(1)),
        (5, vec![2, 3, 4], false),
        "last_seq wins over the cursor"
    );
    assert_eq!(
        s.open(conn(1, 5), "bob", "phone", Some(99)),
        (5, vec![], true),
        "after clamps to the head"
    );

    s.req(Request::Ack {
        conn: conn(1, 5),
        seq: 1000,
    });
    assert_eq!(
        s.e.state().cursor("bob", "phone"),
        Some(5),
        "clamped to the head"
    );
    let recs = s.e.seal().expect("acks are logged").to_vec();
    assert_eq!(
        recs,
        vec![Record::Cursor {
            user: "bob".into(),
            device: "phone".into(),
            seq: 5
        }]
    );
}

#[test]
fn sync_pages_and_reports_truncation() {
    let mut c = cfg();
    c.retention_messages = 5;
    let mut s = Sim::new(c);
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    for i in 0..8 {
        s.send(a, &i.to_string(), user("bob"));
    }
    s.commit();
    s.open(b, "bob", "phone", Some(8));
    let sync = |s: &mut Sim, after, limit| match s
        .req(Request::Sync {
            conn: b,
            after,
            limit,
        })
        .pop()
    {
        Some((
            1,
            Event::SyncPage {
                entries,
                after: a,
                last,
                more,
                truncated,
                ..
            },
        )) => {
            assert_eq!(a, after);
            (seqs(&entries), last, more, truncated)
        }
        other => panic!("expected a sync page, got {other:?}"),
    };
    assert_eq!(
        sync(&mut s, 0, 2),
        (vec![4, 5], 5, true, true),
        "seqs 1..=3 fell out of retention"
    );
    assert_eq!(sync(&mut s, 3, 2), (vec![4, 5], 5, true, false));
    assert_eq!(sync(&mut s, 5, 10), (vec![6, 7, 8], 8, false, false));
    assert_eq!(sync(&mut s, 8, 10), (vec![], 8, false, false));
    assert_eq!(sync(&mut s, 20, 10), (vec![], 20, false, false));
}

#[test]
fn retention_by_count_and_by_age_keeps_seqs_going() {
    let mut c = cfg();
    c.retention_messages = 3;
    c.retention_ms = 1000;
    let mut s = Sim::new(c);
    let a = conn(0, 1);
    s.open(a, "alice", "phone", None);
    for i in 0..5 {
        s.send(a, &i.to_string(), user("bob"));
    }
    s.commit();
    assert_eq!(seqs(&s.e.state().page("bob", 0, 10).entries), vec![3, 4, 5]);
    s.now += 600;
    s.send(a, "5", user("bob"));
    s.commit();
    s.now += 600;
    // Entries 3..=5 are now older than 1000 ms; 6 is not.
    let b = conn(1, 2);
    assert_eq!(s.open(b, "bob", "phone", Some(0)), (6, vec![6], true));
    // Expiry is lazy: alice's inbox, untouched since, still holds 4..=6.
    assert_eq!(s.stats().inbox_entries, 4);
    s.send(a, "6", user("bob"));
    assert_eq!(delivered(&s.commit(), b), vec![7]);
}

#[test]
fn a_newer_session_replaces_the_older_one() {
    let mut s = Sim::new(cfg());
    let (a, old, new) = (conn(0, 1), conn(1, 2), conn(2, 3));
    s.open(a, "alice", "phone", None);
    s.open(old, "bob", "phone", None);
    let out = s.req(Request::Open {
        conn: new,
        user: "bob".into(),
        device: "phone".into(),
        last_seq: None,
    });
    assert!(out
        .iter()
        .any(|(ep, ev)| *ep == 1 && matches!(ev, Event::Replaced { conn: 2 })));
    s.req(Request::Closed { conn: old });
    s.send(a, "m", user("bob"));
    let out = s.commit();
    assert_eq!(
        delivered(&out, new),
        vec![1],
        "the old session's Closed did not remove the new one"
    );
    assert!(delivered(&out, old).is_empty());
    match s.admin(4, AdminOp::Presence { user: "bob".into() }).pop() {
        Some((
            _,
            Event::Admin {
                reply: AdminReply::Presence { devices, .. },
                ..
            },
        )) => assert_eq!(devices.len(), 1),
        other => panic!("{other:?}"),
    }
}

#[test]
fn kick_and_presence() {
    let mut s = Sim::new(cfg());
    let (a, phone, laptop) = (conn(0, 1), conn(1, 2), conn(2, 3));
    s.open(a, "alice", "phone", None);
    s.open(phone, "bob", "phone", None);
    s.now += 5;
    s.open(laptop, "bob", "laptop", None);
    let presence = |s: &mut Sim| match s.admin(3, AdminOp::Presence { user: "bob".into() }).pop() {
        Some((
            ADMIN,
            Event::Admin {
                token: 3,
                reply: AdminReply::Presence { user, devices },
            },
        )) => {
            assert_eq!(user, "bob");
            let mut d: Vec<_> = devices
                .into_iter()
                .map(|d| (d.device, d.node, d.since))
                .collect();
            d.sort();
            d
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        presence(&mut s),
        vec![
            ("laptop".into(), "node-a".into(), T0 + 5),
            ("phone".into(), "node-a".into(), T0)
        ]
    );
    let out = s.admin(
        8,
        AdminOp::Kick {
            user: "bob".into(),
            device: Some("laptop".into()),
        },
    );
    assert!(out
        .iter()
        .any(|(ep, ev)| *ep == 2 && matches!(ev, Event::Kicked { conn: 3 })));
    assert!(out.iter().any(|(ep, ev)| *ep == ADMIN
        && matches!(
            ev,
            Event::Admin {
                token: 8,
                reply: AdminReply::Done
            }
        )));
    assert!(!out
        .iter()
        .any(|(_, ev)| matches!(ev, Event::Kicked { conn: 2 })));
    assert_eq!(presence(&mut s).len(), 1);
    let out = s.admin(
        9,
        AdminOp::Kick {
            user: "bob".into(),
            device: None,
        },
    );
    assert!(out
        .iter()
        .any(|(ep, ev)| *ep == 1 && matches!(ev, Event::Kicked { conn: 2 })));
    assert_eq!(presence(&mut s), vec![]);
    s.send(a, "m", user("bob"));
    let out = s.commit();
    assert!(delivered(&out, phone).is_empty() && delivered(&out, laptop).is_empty());
    assert_eq!(s.stats().sessions, 1);
}

#[test]
fn a_failed_commit_refuses_everything_uncommitted_and_applies_none_of_it() {
    let mut s = Sim::new(cfg());
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    s.open(b, "bob", "phone", None);
    s.commit();
    s.send(a, "1", user("bob"));
    assert!(s.e.seal().is_some());
    s.send(a, "2", user("bob"));
    s.send(a, "1", user("bob")); // a dup of the in-flight one
    s.admin(
        5,
        AdminOp::PutGroup {
            group: "g".into(),
            members: vec!["alice".into()],
        },
    );
    s.e.commit_failed("disk on fire");
    let out: Out = s.e.take_outputs().collect();
    let codes: Vec<_> = out
        .iter()
        .map(|(_, ev)| match ev {
            Event::SendFailed { code, .. } => *code,
            Event::Admin {
                reply: AdminReply::Refused { code, .. },
                ..
            } => *code,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(codes, vec![ErrorCode::Unavailable; 4]);
    assert_eq!(s.e.state().head("bob"), 0);
    assert!(s.e.state().group("g").is_none());
    assert!(!s.e.has_uncommitted());
    assert!(!s.stats().log_healthy);
    // The client retries with the same id: a new message, not a dup of a failed one.
    s.send(a, "1", user("bob"));
    let out = s.commit();
    assert!(!send_oks(&out)[0].3);
    assert_eq!(delivered(&out, b), vec![1]);
    assert!(s.stats().log_healthy);
}

#[test]
fn group_admin_ops_are_durable_before_done() {
    let mut s = Sim::new(cfg());
    let get = |s: &mut Sim, g: &str| match s.admin(2, AdminOp::GetGroup { group: g.into() }).pop() {
        Some((
            ADMIN,
            Event::Admin {
                reply: AdminReply::Group { group, members },
                ..
            },
        )) => {
            assert_eq!(group, g);
            members
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        s.admin(
            1,
            AdminOp::ModifyGroup {
                group: "g".into(),
                add: vec!["b".into(), "a".into()],
                remove: vec![],
            },
        )
        .len(),
        0
    );
    assert_eq!(get(&mut s, "g"), None, "not durable yet");
    let out = s.commit();
    assert!(matches!(
        &out[..],
        [(
            ADMIN,
            Event::Admin {
                token: 1,
                reply: AdminReply::Done
            }
        )]
    ));
    assert_eq!(get(&mut s, "g"), Some(vec!["a".into(), "b".into()]));
    s.admin(
        1,
        AdminOp::ModifyGroup {
            group: "g".into(),
            add: vec!["c".into()],
            remove: vec!["a".into()],
        },
    );
    s.commit();
    assert_eq!(get(&mut s, "g"), Some(vec!["b".into(), "c".into()]));
    s.admin(
        1,
        AdminOp::PutGroup {
            group: "g".into(),
            members: vec!["z".into()],
        },
    );
    s.commit();
    assert_eq!(get(&mut s, "g"), Some(vec!["z".into()]));
    assert_eq!(get(&mut s, "other"), None);
}

#[test]
fn replay_rebuilds_the_same_state_and_ids_continue() {
    let mut c = cfg();
    c.retention_messages = 4;
    let mut s = Sim::new(c.clone());
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    s.open(b, "bob", "phone", None);
    s.put_group("g", &["alice", "bob", "carol"]);
    for i in 0..7 {
        s.send(a, &format!("d{i}"), user("bob"));
        s.send(b, &format!("g{i}"), group("g"));
        if i % 3 == 0 {
            s.commit();
        }
        s.now += 1;
    }
    s.req(Request::Ack { conn: b, seq: 9 });
    s.admin(
        1,
        AdminOp::PutBlocked {
            user: "carol".into(),
            users: vec!["alice".into()],
        },
    );
    s.commit();
    let last_id =
        s.e.state()
            .page("bob", 0, 100)
            .entries
            .last()
            .unwrap()
            .msg
            .msg_id;

    let c2 = c.clone();
    let mut r = Sim::new(c);
    r.now = s.now;
    for rec in s.log.clone() {
        r.e.replay(rec, r.now);
    }
    assert!(r.e.take_outputs().next().is_none(), "replay answers nobody");
    assert_eq!(r.stats().dedup_entries, 14, "every send of the window");
    for u in ["alice", "bob", "carol"] {
        assert_eq!(r.e.state().head(u), s.e.state().head(u), "{u}");
        let ours: Vec<_> =
            s.e.state()
                .page(u, 0, 100)
                .entries
                .iter()
                .map(|e| (e.seq, e.msg.clone()))
                .collect();
        let theirs: Vec<_> =
            r.e.state()
                .page(u, 0, 100)
                .entries
                .iter()
                .map(|e| (e.seq, e.msg.clone()))
                .collect();
        assert_eq!(ours, theirs, "{u}");
    }
    assert_eq!(r.e.state().cursor("bob", "phone"), Some(9));
    assert_eq!(r.e.state().group("g"), s.e.state().group("g"));
    assert!(r.e.state().blocks("carol", "alice"));
    // Sessions are not durable: the recovered node has none; reconnect and resend.
    let a2 = conn(0, 11);
    r.open(a2, "alice", "phone", None);
    let dup = send_oks(&r.send(a2, "d6", user("bob")));
    assert!(dup[0].3, "the dedup table came back");
    assert_eq!(
        dup[0].1,
        s.e.state()
            .page("alice", 0, 100)
            .entries
            .iter()
            .find(|e| e.msg.body == "body of d6")
            .unwrap()
            .msg
            .msg_id
    );
    r.send(a2, "new", user("bob"));
    let fresh = send_oks(&r.commit());
    assert!(fresh[0].1 > last_id, "msg ids continue above the log's");
    assert_eq!(r.e.state().head("bob"), s.e.state().head("bob") + 1);

    // Replayed after the window, the sends are not remembered at all.
    let mut late = Sim::new(c2);
    late.now = s.now + late.e.dedup_window_ms;
    for rec in s.log.clone() {
        late.e.replay(rec, late.now);
    }
    assert_eq!(late.stats().dedup_entries, 0);
    assert_eq!(late.e.state().head("bob"), s.e.state().head("bob"));
}

#[test]
fn messages_share_the_nodes_copies_of_sender_and_device_ids() {
    let mut s = Sim::new(cfg());
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    s.open(b, "bob", "phone", None);
    for i in 0..3 {
        s.send(a, &format!("m{i}"), user("bob"));
    }
    s.commit();
    let alice = s.e.state().known_user("alice").expect("alice has an inbox");
    let live = s.e.state().page("bob", 0, 10).entries;
    assert_eq!(live.len(), 3);
    assert!(live.iter().all(|e| Arc::ptr_eq(&e.msg.from, &alice)));
    assert!(live
        .windows(2)
        .all(|w| Arc::ptr_eq(&w[0].msg.from_device, &w[1].msg.from_device)));

    // Replayed from bytes, as from the log file: each record is decoded afresh.
    let mut r = Sim::new(cfg());
    for rec in &s.log {
        let mut bytes = Vec::new();
        rec.encode(&mut bytes);
        r.e.replay(Record::decode(&bytes).expect("decodes"), r.now);
    }
    let alice = r.e.state().known_user("alice").expect("alice has an inbox");
    let replayed = r.e.state().page("bob", 0, 10).entries;
    assert_eq!(replayed.len(), 3);
    assert_eq!(&*replayed[0].msg.from, "alice");
    // The first message made alice's inbox (she has no session after a restart); the
    // later ones share her id, and all of them the interned device id.
    assert!(replayed[1..]
        .iter()
        .all(|e| Arc::ptr_eq(&e.msg.from, &alice)));
    assert!(replayed
        .windows(2)
        .all(|w| Arc::ptr_eq(&w[0].msg.from_device, &w[1].msg.from_device)));
}

#[test]
fn stats_count_what_happened() {
    let mut s = Sim::new(cfg());
    let a = conn(0, 1);
    s.open(a, "alice", "phone", None);
    s.send(a, "1", user("bob"));
    s.send(a, "2", user("carol"));
    s.commit();
    s.send(a, "2", user("carol"));
    let st = s.stats();
    assert_eq!(
        (
            st.messages_accepted,
            st.messages_dup,
            st.log_commits,
            st.sessions,
            st.users,
            st.inbox_entries
        ),
        (2, 1, 1, 1, 3, 4)
    );
    assert!(st.log_healthy);
    s.e.set_log_bytes(4242);
    assert_eq!(s.stats().log_bytes, 4242);
}

/// A full dedup table forgets its oldest sends first: a retry of one of them is
/// stored again, a retry of a later one is still a duplicate, and both counts show.
#[test]
fn a_full_dedup_table_forgets_the_oldest_sends() {
    let max = crate::dedup::MAX_ENTRIES_MIN;
    let mut c = cfg();
    c.dedup_max_entries = max;
    let mut s = Sim::new(c);
    let a = conn(0, 1);
    s.open(a, "alice", "phone", None);
    for i in 0..=max {
        s.send(a, &i.to_string(), user("bob"));
        if i % 4096 == 0 {
            s.commit();
        }
    }
    s.commit();
    let st = s.stats();
    assert_eq!((st.dedup_entries, st.dedup_evicted), (max as u64, 1));
    assert_eq!(st.messages_accepted, max as u64 + 1);

    let oks = send_oks(&s.send(a, "1", user("bob")));
    assert!(oks[0].3, "a later send is still caught, answered at once");
    s.send(a, "0", user("bob"));
    let oks = send_oks(&s.commit());
    assert!(
        !oks[0].3,
        "the oldest was forgotten, so its retry is stored again"
    );
    let st = s.stats();
    assert_eq!((st.messages_accepted, st.messages_dup), (max as u64 + 2, 1));
    assert_eq!((st.dedup_entries, st.dedup_evicted), (max as u64, 2));
}

#[test]
fn the_admin_api_may_post_to_a_group_it_is_not_a_member_of() {
    let mut s = Sim::new(cfg());
    assert_eq!(
        failed_code(&s.post(1, "system", group("nope"), None)),
        Some(ErrorCode::Forbidden),
        "a group must exist"
    );
    s.put_group("g", &["bob", "carol"]);
    assert!(s.post(2, "system", group("g"), None).is_empty());
    let out = s.commit();
    assert!(
        out.iter().any(|(ep, ev)| *ep == ADMIN
            && matches!(
                ev,
                Event::Admin {
                    token: 2,
                    reply: AdminReply::Posted { dup: false, .. }
                }
            )),
        "{out:?}"
    );
    assert_eq!(s.e.state().head("bob"), 1);
    assert_eq!(s.e.state().head("carol"), 1);
    assert_eq!(
        s.e.state().head("system"),
        0,
        "a non-member sender gets no group entry"
    );
}

#[test]
fn pages_are_cut_at_the_byte_budget_but_never_empty() {
    let mut c = cfg();
    c.catchup_page = 100;
    c.page_bytes_max = 600;
    let mut s = Sim::new(c);
    let (a, b) = (conn(0, 1), conn(1, 2));
    s.open(a, "alice", "phone", None);
    s.open(b, "bob", "phone", Some(0));
    s.commit();
    s.req(Request::Closed { conn: b });
    for i in 0..5 {
        s.send(a, &format!("m{i}"), user("bob"));
    }
    s.commit();
    // Each entry counts its body plus 256 bytes: two fit in 600.
    let (_, page, caught_up) = s.open(b, "bob", "phone", Some(0));
    assert_eq!((page, caught_up), (vec![1, 2], false));
    let out = s.req(Request::Sync {
        conn: b,
        after: 0,
        limit: 1000,
    });
    let (entries, more) = out
        .iter()
        .find_map(|(_, ev)| match ev {
            Event::SyncPage { entries, more, .. } => Some((seqs(entries), *more)),
            _ => None,
        })
        .expect("a sync page");
    assert_eq!((entries, more), (vec![1, 2], true));
    let mut tiny = cfg();
    tiny.page_bytes_max = 1;
    let mut s = Sim::new(tiny);
    s.open(a, "alice", "phone", None);
    s.commit();
    s.send(a, "x", user("alice"));
    s.commit();
    let out = s.req(Request::Sync {
        conn: a,
        after: 0,
        limit: 10,
    });
    assert!(out
        .iter()
        .any(|(_, ev)| matches!(ev, Event::SyncPage { entries, .. } if entries.len() == 1)));
}

/// DESIGN.md §6: an idle session costs the pipeline its `Session` and its user's
/// `Online` entry (and the user's inbox, see the state's tests). Today's sizes: raise
/// a bound only with the README's memory measurement redone.
#[test]
fn session_records_are_small() {
    assert!(std::mem::size_of::<Session>() <= 32);
    assert!(std::mem::size_of::<Online>() <= 24);
    assert!(std::mem::size_of::<OnlineConn>() <= 16);
}

#[test]
fn online_keeps_one_session_inline_and_many_in_order() {
    let listed = |c: ConnRef| OnlineConn {
        conn: c.conn,
        endpoint: c.endpoint,
        live: false,
    };
    let refs = |online: &Online| -> Vec<ConnRef> {
        online.conns().iter().map(OnlineConn::conn_ref).collect()
    };
    let (a, b, c) = (conn(0, 1), conn(0, 2), conn(1, 3));
    let mut online = Online::One(listed(a));
    online.push(listed(b));
    online.push(listed(c));
    assert_eq!(refs(&online), [a, b, c]);
    online.get_mut(b).expect("b is listed").live = true;
    let live: Vec<bool> = online.conns().iter().map(|o| o.live).collect();
    assert_eq!(live, [false, true, false], "only b went live");
    assert!(!online.remove(b));
    assert_eq!(refs(&online), [a, c]);
    assert!(online.get_mut(b).is_none(), "b is gone");
    assert!(!online.remove(a));
    assert!(matches!(online, Online::One(x) if x.conn_ref() == c));
    assert!(
        online.get(a).is_none() && online.get_mut(a).is_none(),
        "one entry, not a"
    );
    assert!(online.get(c).is_some_and(|o| !o.live));
    assert!(
        !online.remove(a),
        "removing an absent session changes nothing"
    );
    assert!(online.remove(c), "the last session is gone");
}
