//! The scenarios, each a worker's part of a run (see `runner` for the phases), and
//! what they share: the [`Pool`] that opens, counts and closes a worker's sessions.

mod chat;
mod connect;
mod fanout;

pub use fanout::{group_name, member_ids};

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

use crate::cli::{Scenario, TargetKind};
use crate::clock::mono_ns;
use crate::conn::{self, Conn, Handler, Login, Notify, State, Target};
use crate::proto::Incoming;
use crate::report::{ConnStats, MsgStats, WorkerResult};
use crate::runner::{Progress, Worker};
use crate::sched::OpenLoop;
use crate::timer::PreciseTimer;

/// Runs this worker's part of the scenario to its result.
pub async fn run(worker: Worker) -> WorkerResult {
    let w = Rc::new(worker);
    let scenario = w.cfg.scenario.clone();
    let mut r = match &scenario {
        Scenario::Connect(_) => connect::run_connect(w.clone()).await,
        Scenario::Churn(a) => connect::run_churn(w.clone(), a).await,
        Scenario::Chat(a) => chat::run(w.clone(), a).await,
        Scenario::Fanout(a) => fanout::run(w.clone(), a).await,
    };
    r.workers = 1;
    r
}

/// A worker's sessions: opens them (open-loop at the ramp rate, bounded concurrency),
/// counts their outcomes, and closes them.
pub struct Pool {
    pub worker: Rc<Worker>,
    target: Rc<Target>,
    pub stats: RefCell<ConnStats>,
    inflight: Cell<usize>,
    live: Cell<usize>,
    changed: Notify,
}

impl Pool {
    pub fn new(worker: Rc<Worker>) -> Rc<Pool> {
        let target = Rc::new(worker.cfg.target.clone());
        Rc::new(Pool {
            worker,
            target,
            stats: RefCell::new(ConnStats::default()),
            inflight: Cell::new(0),
            live: Cell::new(0),
            changed: Notify::default(),
        })
    }

    fn progress(&self) -> &Progress {
        self.worker.progress()
    }

    /// Whether the target is a raw-ws room server (no acks, no inbox `seq`).
    pub fn raw(&self) -> bool {
        self.target.kind == TargetKind::RawWs
    }

    /// Starts connection `conn` as user `user` (raw-ws: in room `room`), global
    /// connection number `global` (which picks the source address), scheduled at
    /// `scheduled_ns`.
    pub fn spawn<H: Handler + 'static>(
        &self,
        handler: &Rc<H>,
        conn: &Rc<Conn>,
        user: &str,
        room: &str,
        global: usize,
        scheduled_ns: u64,
    ) {
        {
            let mut s = self.stats.borrow_mut();
            s.attempted += 1;
            s.first_attempt_ns = Some(
                s.first_attempt_ns
                    .map_or(scheduled_ns, |f| f.min(scheduled_ns)),
            );
        }
        Progress::add(&self.progress().attempted, 1);
        self.inflight.set(self.inflight.get() + 1);
        self.live.set(self.live.get() + 1);
        let cfg = &self.worker.cfg;
        let login = match self.target.kind {
            TargetKind::Flare => Login::Token(cfg.token(user)),
            TargetKind::RawWs => Login::Room(room.to_string()),
        };
        monoio::spawn(conn::drive(
            conn.clone(),
            handler.clone(),
            self.target.clone(),
            cfg.source_for(global),
            login,
            scheduled_ns,
        ));
    }

    pub fn opened(&self, started_ns: u64, now_ns: u64) {
        {
            let mut s = self.stats.borrow_mut();
            s.established += 1;
            s.connect_latency.record(now_ns.saturating_sub(started_ns));
            s.last_established_ns = Some(s.last_established_ns.map_or(now_ns, |l| l.max(now_ns)));
        }
        Progress::add(&self.progress().established, 1);
        self.inflight.set(self.inflight.get() - 1);
        self.changed.notify();
    }

    pub fn setup_failed(&self, reason: String) {
        *self.stats.borrow_mut().failed.entry(reason).or_default() += 1;
        Progress::add(&self.progress().failed, 1);
        self.inflight.set(self.inflight.get() - 1);
        self.live.set(self.live.get() - 1);
        self.changed.notify();
    }

    pub fn closed(&self, dropped: Option<String>) {
        match dropped {
            Some(reason) => {
                *self.stats.borrow_mut().dropped.entry(reason).or_default() += 1;
                Progress::add(&self.progress().dropped, 1);
            }
            None => {
                self.stats.borrow_mut().closed += 1;
                Progress::add(&self.progress().closed, 1);
            }
        }
        self.live.set(self.live.get() - 1);
        self.changed.notify();
    }

    /// Opens `conns[k]` as `users[k]` in raw-ws room `room(k)` (global numbers
    /// `globals[k]`) at this worker's share of `--ramp-rate`, at most
    /// `--connect-concurrency` at once, and returns when every attempt has an outcome.
    pub async fn open_all<H: Handler + 'static>(
        &self,
        handler: &Rc<H>,
        conns: &[Rc<Conn>],
        users: &[String],
        room: impl Fn(usize) -> String,
        globals: &[usize],
    ) {
        let common = &self.worker.cfg.common;
        let rate = common.ramp_rate / self.worker.count as f64;
        let concurrency = common.connect_concurrency.max(1);
        let timer = PreciseTimer::new();
        let mut sched = (rate > 0.0).then(|| OpenLoop::new(mono_ns(), rate, u64::MAX));
        for (k, conn) in conns.iter().enumerate() {
            let scheduled = match sched.as_mut() {
                Some(s) => loop {
                    if let Some(t) = s.pop_due(mono_ns()) {
                        break t.scheduled_ns;
                    }
                    if let Some(next) = s.next_due_ns() {
                        timer.sleep_until(next).await;
                    }
                },
                None => mono_ns(),
            };
            while self.inflight.get() >= concurrency {
                self.changed.notified().await;
            }
            self.spawn(handler, conn, &users[k], &room(k), globals[k], scheduled);
        }
        while self.inflight.get() > 0 {
            self.changed.notified().await;
        }
    }

    /// Waits until no connection is in progress or open, or until `deadline_ns`.
    pub async fn wait_all_ended(&self, deadline_ns: u64) {
        while self.live.get() > 0 {
            let now = mono_ns();
            if now >= deadline_ns {
                return;
            }
            monoio::select! {
                _ = self.changed.notified() => {}
                _ = monoio::time::sleep(Duration::from_nanos(deadline_ns - now)) => return,
            }
        }
    }

    /// Closes every open session and waits (bounded) for the closes to finish.
    pub async fn close_all(&self, conns: &[Rc<Conn>]) {
        for c in conns {
            if c.state() != State::Ended {
                c.close();
            }
        }
        // Each connection bounds its own close wait; this is a second fence.
        self.wait_all_ended(mono_ns() + 10_000_000_000).await;
    }
}

/// Sends a protocol `ping` on every idle open session, so the server's heartbeat
/// timeout never closes a held connection. Runs until `stop` is set.
pub fn spawn_heartbeat(conns: Rc<Vec<Rc<Conn>>>, worker: &Worker, stop: Rc<Cell<bool>>) {
    let enc = worker.cfg.common.encoding;
    monoio::spawn(async move {
        while !stop.get() {
            monoio::time::sleep(Duration::from_millis(500)).await;
            let now = mono_ns();
            for c in conns.iter() {
                c.ping_if_idle(enc, now);
            }
        }
    });
}

/// Counts what idle sessions receive: they send nothing but pings, so any `error` or
/// `msg` is noted. With a lifetime, each session closes itself that long after
/// `auth_ok` (churn).
pub struct Idle {
    pub pool: Rc<Pool>,
    pub msgs: RefCell<MsgStats>,
    pub lifetime: Option<Duration>,
}

impl Handler for Idle {
    fn on_open(&self, conn: &Rc<Conn>, _head_seq: u64, started_ns: u64, now_ns: u64) {
        self.pool.opened(started_ns, now_ns);
        if let Some(l) = self.lifetime {
            let c = conn.clone();
            monoio::spawn(async move {
                monoio::time::sleep(l).await;
                c.close();
            });
        }
    }

    fn on_setup_failed(&self, _conn: &Rc<Conn>, reason: String) {
        self.pool.setup_failed(reason);
    }

    fn on_frame(&self, _conn: &Rc<Conn>, frame: Incoming<'_>, _now_ns: u64) {
        let mut m = self.msgs.borrow_mut();
        match frame {
            Incoming::Error { code, .. } => {
                *m.errors.entry(code.into_owned()).or_default() += 1;
                Progress::add(&self.pool.progress().errors, 1);
            }
            Incoming::Msg { .. } => m.deliveries += 1,
            _ => {}
        }
    }

    fn on_bad_frame(&self, _conn: &Rc<Conn>, reason: &'static str) {
        *self
            .msgs
            .borrow_mut()
            .bad_frames
            .entry(reason.into())
            .or_default() += 1;
    }

    fn on_closed(&self, _conn: &Rc<Conn>, dropped: Option<String>) {
        self.pool.closed(dropped);
    }
}
