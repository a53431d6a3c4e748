//! `chat`: pairs of users send each other messages at a fixed total rate.
//!
//! Both users of a pair live in the same worker, so one checker sees the sends, the
//! `send_ok`s and the arrivals of every message of the pair. Local connection `2j`
//! and `2j+1` are the users of the worker's pair `j`; local sender `s` sends to
//! `s ^ 1`. Tick `i` of the worker's open-loop schedule is sender `i % senders`'s
//! message number `i / senders`; the message id is that number, and the body
//! carries it with the scheduled time.
//!
//! Against a raw-ws room server each pair shares a room; there is no `send_ok`, so a
//! message written to the socket counts as acknowledged (see `raw`), and there is no
//! inbox `seq` to check.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::{spawn_heartbeat, Pool};
use crate::check::{Checker, InboxSeq, Receipt, SeqSummary};
use crate::cli::ChatArgs;
use crate::clock::mono_ns;
use crate::conn::{Conn, Handler};
use crate::proto::{message_body, parse_body, Encoding, Incoming, Outgoing, To};
use crate::raw;
use crate::report::{MsgStats, WorkerResult};
use crate::runner::{Progress, Worker};
use crate::sched::OpenLoop;
use crate::timer::PreciseTimer;

struct State {
    msgs: MsgStats,
    /// Stream `s`: sender `s`'s messages at its peer `s ^ 1`.
    delivery: Checker,
    /// Stream `s`: sender `s`'s messages back at `s` itself (its own inbox copy).
    echo: Checker,
    inbox: Vec<InboxSeq>,
    inbox_totals: SeqSummary,
    /// (sender, number) → scheduled time, until `send_ok` or `error`.
    pending: HashMap<(usize, u64), u64>,
}

struct Chat {
    pool: Rc<Pool>,
    raw: bool,
    users: Vec<String>,
    state: RefCell<State>,
}

fn count(map: &mut std::collections::BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_default() += 1;
}

impl Handler for Chat {
    fn on_open(&self, conn: &Rc<Conn>, head_seq: u64, started_ns: u64, now_ns: u64) {
        self.pool.opened(started_ns, now_ns);
        self.state.borrow_mut().inbox[conn.index] = InboxSeq::new(head_seq);
    }

    fn on_setup_failed(&self, _conn: &Rc<Conn>, reason: String) {
        self.pool.setup_failed(reason);
    }

    fn on_frame(&self, conn: &Rc<Conn>, frame: Incoming<'_>, now_ns: u64) {
        let progress = self.pool.worker.progress();
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let me = conn.index;
        match frame {
            Incoming::SendOk { id, dup } => {
                let Some(seq) = id.parse::<u64>().ok() else {
                    count(&mut st.msgs.bad_frames, "send_ok_unknown_id");
                    return;
                };
                let Some(sched) = st.pending.remove(&(me, seq)) else {
                    count(&mut st.msgs.bad_frames, "send_ok_unknown_id");
                    return;
                };
                st.msgs.acked += 1;
                Progress::add(&progress.acked, 1);
                if dup {
                    st.msgs.dup_acks += 1;
                }
                st.msgs.send_ok_latency.record(now_ns.saturating_sub(sched));
                st.delivery.acked(me, seq);
                st.echo.acked(me, seq);
            }
            Incoming::Error { code, id } => {
                count(&mut st.msgs.errors, &code);
                Progress::add(&progress.errors, 1);
                if let Some(seq) = id.and_then(|i| i.parse::<u64>().ok()) {
                    st.pending.remove(&(me, seq));
                }
            }
            Incoming::Msg { seq, from, body } => {
                st.msgs.deliveries += 1;
                if !self.raw {
                    st.inbox[me].on_msg(seq, &mut st.inbox_totals);
                }
                let Some((n, sched)) = parse_body(&body) else {
                    count(&mut st.msgs.bad_frames, "msg_body_not_ours");
                    return;
                };
                let peer = me ^ 1;
                if *from == self.users[peer] {
                    match st.delivery.received(peer, n) {
                        Receipt::InOrder | Receipt::Reordered => {
                            st.msgs.deliveries_unique += 1;
                            st.msgs.e2e_latency.record(now_ns.saturating_sub(sched));
                            st.msgs
                                .e2e_series
                                .record(sched, now_ns.saturating_sub(sched));
                            Progress::add(&progress.deliveries_unique, 1);
                        }
                        Receipt::Duplicate | Receipt::Unexpected => {}
                    }
                } else if *from == self.users[me] {
                    if !self.raw {
                        st.echo.received(me, n);
                    }
                } else {
                    count(&mut st.msgs.bad_frames, "msg_from_a_stranger");
                }
            }
            Incoming::AuthOk { .. }
            | Incoming::Pong
            | Incoming::Goaway { .. }
            | Incoming::SyncDone => {}
        }
    }

    fn on_bad_frame(&self, _conn: &Rc<Conn>, reason: &'static str) {
        count(&mut self.state.borrow_mut().msgs.bad_frames, reason);
    }

    fn on_closed(&self, conn: &Rc<Conn>, dropped: Option<String>) {
        if dropped.is_some() {
            // This session receives its peer's messages and its own copies: what it
            // still lacked can no longer arrive (a resume would bring it; we do not
            // resume), and the drop itself is counted as an error.
            let mut st = self.state.borrow_mut();
            st.delivery.abandon(conn.index ^ 1);
            st.echo.abandon(conn.index);
        }
        self.pool.closed(dropped);
    }
}

pub async fn run(w: Rc<Worker>, args: &ChatArgs) -> WorkerResult {
    let cfg = w.cfg.clone();
    let pairs: Vec<usize> = w.owned(args.pairs).collect();
    let globals: Vec<usize> = pairs.iter().flat_map(|&p| [2 * p, 2 * p + 1]).collect();
    let users: Vec<String> = globals.iter().map(|&g| cfg.user("p", g)).collect();
    let n = users.len();
    let conns: Rc<Vec<Rc<Conn>>> = Rc::new((0..n).map(Conn::new).collect());
    let pool = Pool::new(w.clone());
    let chat = Rc::new(Chat {
        pool: pool.clone(),
        raw: pool.raw(),
        users: users.clone(),
        state: RefCell::new(State {
            msgs: MsgStats::default(),
            delivery: Checker::new(n),
            echo: Checker::new(n),
            inbox: vec![InboxSeq::default(); n],
            inbox_totals: SeqSummary::default(),
            pending: HashMap::new(),
        }),
    });
    let stop_heartbeat = Rc::new(Cell::new(false));
    spawn_heartbeat(conns.clone(), &w, stop_heartbeat.clone());
    // raw-ws: the two users of a pair share a room.
    let room = |k: usize| cfg.user("pair", pairs[k / 2]);
    pool.open_all(&chat, &conns, &users, room, &globals).await;

    // The series starts before the run: another worker's first messages can arrive
    // here before this task wakes at t0.
    let t0 = w.ready_and_learn_go().await;
    chat.state
        .borrow_mut()
        .msgs
        .start_series(t0, cfg.common.duration, cfg.common.interval);
    Worker::sleep_until(t0).await;
    let end = t0 + cfg.common.duration.as_nanos() as u64;
    if !pairs.is_empty() && args.pairs > 0 {
        let rate = args.rate * pairs.len() as f64 / args.pairs as f64;
        send_loop(
            &w,
            &chat,
            &conns,
            args,
            cfg.common.encoding,
            OpenLoop::new(t0, rate, end),
        )
        .await;
    }
    let run_end = mono_ns();

    // Drain: every sent message acknowledged or refused, every acknowledged one arrived.
    let deadline = run_end + cfg.common.drain_timeout.as_nanos() as u64;
    let settled = || {
        let st = chat.state.borrow();
        st.pending.is_empty() && st.delivery.outstanding() == 0 && st.echo.outstanding() == 0
    };
    while mono_ns() < deadline && !settled() {
        monoio::time::sleep(Duration::from_millis(2)).await;
    }
    {
        let mut st = chat.state.borrow_mut();
        st.msgs.unacked = st.pending.len() as u64;
    }
    w.done_and_wait_stop().await;
    stop_heartbeat.set(true);
    pool.close_all(&conns).await;

    let st = chat.state.borrow();
    let stats = pool.stats.borrow().clone();
    WorkerResult {
        conns: stats,
        msgs: st.msgs.clone(),
        delivery_check: st.delivery.summary(),
        echo_check: st.echo.summary(),
        inbox_seq: st.inbox_totals,
        run_start_ns: Some(t0),
        run_end_ns: Some(run_end),
        ..Default::default()
    }
}

async fn send_loop(
    w: &Worker,
    chat: &Chat,
    conns: &[Rc<Conn>],
    args: &ChatArgs,
    enc: Encoding,
    mut sched: OpenLoop,
) {
    let senders = conns.len() as u64;
    let progress = w.progress();
    let timer = PreciseTimer::new();
    let mut body = String::new();
    let mut text = String::new();
    while let Some(next) = sched.next_due_ns() {
        timer.sleep_until(next).await;
        while let Some(t) = sched.pop_due(mono_ns()) {
            let s = (t.index % senders) as usize;
            let seq = t.index / senders;
            let peer = s ^ 1;
            Progress::add(&progress.scheduled, 1);
            let mut st = chat.state.borrow_mut();
            st.msgs.scheduled += 1;
            if !conns[s].is_open() || !conns[peer].is_open() {
                count(&mut st.msgs.not_sent, "pair_not_open");
                continue;
            }
            message_body(seq, t.scheduled_ns, args.body_bytes, &mut body);
            st.delivery.sent(s, seq);
            if !chat.raw {
                st.echo.sent(s, seq);
                st.pending.insert((s, seq), t.scheduled_ns);
            }
            drop(st);
            let ok = if chat.raw {
                raw::encode(&chat.users[s], &body, &mut text);
                conns[s].send_text(&text)
            } else {
                let id = seq.to_string();
                let frame = Outgoing::Send {
                    id: &id,
                    to: To::User(&chat.users[peer]),
                    body: &body,
                };
                conns[s].send(enc, &frame)
            };
            let mut st = chat.state.borrow_mut();
            if ok {
                st.msgs.sent += 1;
                st.msgs
                    .send_lag
                    .record(mono_ns().saturating_sub(t.scheduled_ns));
                Progress::add(&progress.sent, 1);
                if chat.raw {
                    // Nothing acknowledges a room message: written is acknowledged.
                    st.msgs.acked += 1;
                    Progress::add(&progress.acked, 1);
                    st.delivery.acked(s, seq);
                }
            } else {
                st.pending.remove(&(s, seq));
                count(&mut st.msgs.not_sent, "send_failed");
            }
        }
    }
}
