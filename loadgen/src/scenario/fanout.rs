//! `fanout`: one group of M members (created by the coordinator through the admin
//! API before the workers start), the first P members publish to it at a fixed total
//! rate, and every member (the publisher included) receives every message.
//!
//! Members are spread over every worker and process, so a member cannot see the
//! publisher's `send_ok`s: each receiver checks duplicates and order per publisher,
//! and the coordinator compares the distinct deliveries with acked x M at the end.
//!
//! Against a raw-ws room server the group is one room that every member joins, and a
//! message written to the socket counts as acknowledged (see `raw`). With
//! `--publish-url` publishers POST their messages over HTTP instead (`http_pub`), and
//! a 2xx answer acknowledges one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use super::{spawn_heartbeat, Pool};
use crate::check::{Checker, InboxSeq, Receipt, SeqSummary};
use crate::cli::parse_http_url;
use crate::cli::FanoutArgs;
use crate::clock::mono_ns;
use crate::conn::{Conn, Handler};
use crate::http_pub::{Answer, HttpPublisher};
use crate::proto::{message_body, parse_body, Incoming, Outgoing, To};
use crate::raw;
use crate::report::{MsgStats, WorkerResult};
use crate::runner::{Progress, RunConfig, Worker};
use crate::sched::OpenLoop;
use crate::timer::PreciseTimer;

/// The group of this run.
pub fn group_name(cfg: &RunConfig) -> String {
    format!("{}-{}-g", cfg.common.user_prefix, cfg.run_id)
}

/// Every member's user id, in global order (the first `publishers` publish).
pub fn member_ids(cfg: &RunConfig, members: usize) -> Vec<String> {
    (0..members).map(|j| cfg.user("m", j)).collect()
}

struct State {
    msgs: MsgStats,
    /// Stream `local member * publishers + publisher`: receive-only.
    received: Checker,
    inbox: Vec<InboxSeq>,
    inbox_totals: SeqSummary,
    /// (local connection, number) → scheduled time, until `send_ok` or `error`.
    pending: HashMap<(usize, u64), u64>,
}

struct Fanout {
    pool: Rc<Pool>,
    raw: bool,
    /// `<prefix>-<run>-m`: a member id is this and its global number.
    member_prefix: String,
    publishers: usize,
    state: RefCell<State>,
}

fn count(map: &mut std::collections::BTreeMap<String, u64>, key: &str) {
    *map.entry(key.to_string()).or_default() += 1;
}

impl Handler for Fanout {
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
                let sched = id
                    .parse::<u64>()
                    .ok()
                    .and_then(|seq| st.pending.remove(&(me, seq)));
                let Some(sched) = sched else {
                    count(&mut st.msgs.bad_frames, "send_ok_unknown_id");
                    return;
                };
                st.msgs.acked += 1;
                Progress::add(&progress.acked, 1);
                if dup {
                    st.msgs.dup_acks += 1;
                }
                st.msgs.send_ok_latency.record(now_ns.saturating_sub(sched));
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
                let publisher = from
                    .strip_prefix(self.member_prefix.as_str())
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&p| p < self.publishers);
                let (Some(p), Some((n, sched))) = (publisher, parse_body(&body)) else {
                    count(&mut st.msgs.bad_frames, "msg_not_from_a_publisher");
                    return;
                };
                match st.received.received(me * self.publishers + p, n) {
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

    fn on_closed(&self, _conn: &Rc<Conn>, dropped: Option<String>) {
        self.pool.closed(dropped);
    }
}

pub async fn run(w: Rc<Worker>, args: &FanoutArgs) -> WorkerResult {
    let cfg = w.cfg.clone();
    let publishers = args.publishers.min(args.members);
    let globals: Vec<usize> = w.owned(args.members).collect();
    let users: Vec<String> = globals.iter().map(|&g| cfg.user("m", g)).collect();
    let n = users.len();
    let conns: Rc<Vec<Rc<Conn>>> = Rc::new((0..n).map(Conn::new).collect());
    let pool = Pool::new(w.clone());
    let fan = Rc::new(Fanout {
        pool: pool.clone(),
        raw: pool.raw(),
        member_prefix: format!("{}-{}-m", cfg.common.user_prefix, cfg.run_id),
        publishers: publishers.max(1),
        state: RefCell::new(State {
            msgs: MsgStats::default(),
            received: Checker::receive_only(n * publishers.max(1)),
            inbox: vec![InboxSeq::default(); n],
            inbox_totals: SeqSummary::default(),
            pending: HashMap::new(),
        }),
    });
    let stop_heartbeat = Rc::new(Cell::new(false));
    spawn_heartbeat(conns.clone(), &w, stop_heartbeat.clone());
    let group = group_name(&cfg);
    pool.open_all(&fan, &conns, &users, |_| group.clone(), &globals)
        .await;

    // HTTP publishers, one per local publisher, connected before the run starts.
    let http = match (&args.publish_url, fan.raw) {
        (Some(url), true) => Some(
            http_publishers(
                &fan,
                &w,
                url,
                globals.iter().filter(|&&g| g < publishers).count(),
            )
            .await,
        ),
        _ => None,
    };

    // The series starts before the run: another worker's first messages can arrive
    // here before this task wakes at t0.
    let t0 = w.ready_and_learn_go().await;
    fan.state
        .borrow_mut()
        .msgs
        .start_series(t0, cfg.common.duration, cfg.common.interval);
    Worker::sleep_until(t0).await;
    let end = t0 + cfg.common.duration.as_nanos() as u64;
    // Local publishers: local connections whose global member number is < publishers.
    let local_pubs: Vec<usize> = (0..n).filter(|&k| globals[k] < publishers).collect();
    if !local_pubs.is_empty() {
        let rate = args.rate * local_pubs.len() as f64 / publishers as f64;
        let mut sched = OpenLoop::new(t0, rate, end);
        let enc = cfg.common.encoding;
        let progress = w.progress();
        let timer = PreciseTimer::new();
        let mut body = String::new();
        let mut text = String::new();
        let npubs = local_pubs.len() as u64;
        while let Some(next) = sched.next_due_ns() {
            timer.sleep_until(next).await;
            while let Some(t) = sched.pop_due(mono_ns()) {
                let slot = (t.index % npubs) as usize;
                let k = local_pubs[slot];
                let seq = t.index / npubs;
                Progress::add(&progress.scheduled, 1);
                let mut st = fan.state.borrow_mut();
                st.msgs.scheduled += 1;
                if !conns[k].is_open() {
                    count(&mut st.msgs.not_sent, "publisher_not_open");
                    continue;
                }
                if !fan.raw {
                    st.pending.insert((k, seq), t.scheduled_ns);
                }
                drop(st);
                message_body(seq, t.scheduled_ns, args.body_bytes, &mut body);
                let ok = if let Some(http) = &http {
                    raw::encode(&users[k], &body, &mut text);
                    match &http[slot] {
                        Some((p, _)) => p.publish(&group, &text, t.scheduled_ns),
                        None => false,
                    }
                } else if fan.raw {
                    raw::encode(&users[k], &body, &mut text);
                    conns[k].send_text(&text)
                } else {
                    let id = seq.to_string();
                    let frame = Outgoing::Send {
                        id: &id,
                        to: To::Group(&group),
                        body: &body,
                    };
                    conns[k].send(enc, &frame)
                };
                let mut st = fan.state.borrow_mut();
                if ok {
                    st.msgs.sent += 1;
                    st.msgs
                        .send_lag
                        .record(mono_ns().saturating_sub(t.scheduled_ns));
                    Progress::add(&progress.sent, 1);
                    if fan.raw && http.is_none() {
                        // Nothing acknowledges a room message: written is acknowledged.
                        st.msgs.acked += 1;
                        Progress::add(&progress.acked, 1);
                    }
                } else {
                    st.pending.remove(&(k, seq));
                    count(&mut st.msgs.not_sent, "send_failed");
                }
            }
        }
    }
    let run_end = mono_ns();
    // Local drain: every sent message acknowledged or refused. Deliveries are waited
    // for by the coordinator, which sees every worker's acks.
    let deadline = run_end + cfg.common.drain_timeout.as_nanos() as u64;
    let total = |http: &Option<Vec<_>>, count: fn(&HttpPublisher) -> usize| -> usize {
        http.iter()
            .flatten()
            .flatten()
            .map(|(p, _): &(Rc<HttpPublisher>, _)| count(p))
            .sum()
    };
    while mono_ns() < deadline
        && (!fan.state.borrow().pending.is_empty() || total(&http, HttpPublisher::awaited) > 0)
    {
        monoio::time::sleep(Duration::from_millis(2)).await;
    }
    {
        let mut st = fan.state.borrow_mut();
        st.msgs.unacked = (st.pending.len() + total(&http, HttpPublisher::unanswered)) as u64;
    }
    for (p, task) in http.into_iter().flatten().flatten() {
        p.close();
        // A publisher still waiting for answers after the drain ends with its socket.
        if p.unanswered() == 0 {
            task.await;
        }
    }
    w.done_and_wait_stop().await;
    stop_heartbeat.set(true);
    pool.close_all(&conns).await;

    let st = fan.state.borrow();
    let stats = pool.stats.borrow().clone();
    let mut received = st.received.summary();
    received.acked = st.msgs.acked;
    WorkerResult {
        conns: stats,
        msgs: st.msgs.clone(),
        delivery_check: received,
        inbox_seq: st.inbox_totals,
        run_start_ns: Some(t0),
        run_end_ns: Some(run_end),
        ..Default::default()
    }
}

/// Connects one HTTP publisher per local publisher (`None` where connecting failed,
/// counted as a setup failure) and starts its task, which reports answers to `fan`.
async fn http_publishers(
    fan: &Rc<Fanout>,
    w: &Rc<Worker>,
    url: &str,
    n: usize,
) -> Vec<Option<(Rc<HttpPublisher>, monoio::task::JoinHandle<()>)>> {
    // Checked by the coordinator before any worker started.
    let url = parse_http_url(url).expect("--publish-url was validated");
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match HttpPublisher::connect(&url).await {
            Ok((p, stream)) => {
                let (fan, w, task_p) = (fan.clone(), w.clone(), p.clone());
                let task = monoio::spawn(async move {
                    let broke = task_p
                        .run(stream, |a: Answer| {
                            let progress = w.progress();
                            let mut st = fan.state.borrow_mut();
                            if (200..300).contains(&a.status) {
                                st.msgs.acked += 1;
                                Progress::add(&progress.acked, 1);
                                st.msgs
                                    .send_ok_latency
                                    .record(mono_ns().saturating_sub(a.scheduled_ns));
                            } else {
                                count(&mut st.msgs.errors, &format!("http_{}", a.status));
                                Progress::add(&progress.errors, 1);
                            }
                        })
                        .await;
                    if let Some(reason) = broke {
                        let mut stats = fan.pool.stats.borrow_mut();
                        *stats
                            .dropped
                            .entry(format!("publisher_{reason}"))
                            .or_default() += 1;
                    }
                });
                out.push(Some((p, task)));
            }
            Err(e) => {
                let reason = format!("publisher_{}", crate::conn::io_reason(&e));
                *fan.pool
                    .stats
                    .borrow_mut()
                    .failed
                    .entry(reason)
                    .or_default() += 1;
                out.push(None);
            }
        }
    }
    out
}
