//! `connect` (N idle sessions held for a time) and `churn` (sessions that come and go
//! at a fixed rate).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use super::{spawn_heartbeat, Idle, Pool};
use crate::cli::{ChurnArgs, Scenario};
use crate::clock::mono_ns;
use crate::conn::Conn;
use crate::report::{MsgStats, WorkerResult};
use crate::runner::Worker;
use crate::sched::OpenLoop;
use crate::timer::PreciseTimer;

pub async fn run_connect(w: Rc<Worker>) -> WorkerResult {
    let Scenario::Connect(args) = &w.cfg.scenario else {
        unreachable!("run_connect runs the connect scenario")
    };
    let globals: Vec<usize> = w.owned(args.conns).collect();
    let users: Vec<String> = globals.iter().map(|&g| w.cfg.user("c", g)).collect();
    let conns: Rc<Vec<Rc<Conn>>> = Rc::new((0..globals.len()).map(Conn::new).collect());
    let pool = Pool::new(w.clone());
    let handler = Rc::new(Idle {
        pool: pool.clone(),
        msgs: RefCell::new(MsgStats::default()),
        lifetime: None,
    });
    let stop_heartbeat = Rc::new(Cell::new(false));
    spawn_heartbeat(conns.clone(), &w, stop_heartbeat.clone());
    // raw-ws: each user alone in a room of its own, as in its own channel.
    pool.open_all(&handler, &conns, &users, |k| users[k].clone(), &globals)
        .await;

    let t0 = w.ready_and_wait_go().await;
    let end = t0 + w.cfg.common.duration.as_nanos() as u64;
    PreciseTimer::new().sleep_until(end).await;
    let run_end = mono_ns();
    w.done_and_wait_stop().await;
    stop_heartbeat.set(true);
    pool.close_all(&conns).await;

    let stats = pool.stats.borrow().clone();
    let msgs = handler.msgs.borrow().clone();
    WorkerResult {
        conns: stats,
        msgs,
        run_start_ns: Some(t0),
        run_end_ns: Some(run_end),
        ..Default::default()
    }
}

pub async fn run_churn(w: Rc<Worker>, args: &ChurnArgs) -> WorkerResult {
    let pool = Pool::new(w.clone());
    let handler = Rc::new(Idle {
        pool: pool.clone(),
        msgs: RefCell::new(MsgStats::default()),
        lifetime: Some(args.lifetime),
    });
    // Nothing to open before the run: churn's connections are its run.
    let t0 = w.ready_and_wait_go().await;
    let end = t0 + w.cfg.common.duration.as_nanos() as u64;
    let rate = args.rate / w.count as f64;
    if rate > 0.0 {
        let mut sched = OpenLoop::new(t0, rate, end);
        let timer = PreciseTimer::new();
        while let Some(next) = sched.next_due_ns() {
            timer.sleep_until(next).await;
            while let Some(t) = sched.pop_due(mono_ns()) {
                // Global connection numbers interleave the workers: unique user ids,
                // and the source addresses are used round-robin over the whole run.
                let global = t.index as usize * w.count + w.index;
                let conn = Conn::new(global);
                let user = w.cfg.user("n", global);
                pool.spawn(&handler, &conn, &user, &user, global, t.scheduled_ns);
            }
        }
    }
    let run_end = mono_ns();
    // Let the last connections live their lifetime and close.
    let grace = args.lifetime + w.cfg.common.connect_timeout + w.cfg.common.drain_timeout;
    pool.wait_all_ended(run_end + grace.as_nanos() as u64).await;
    w.done_and_wait_stop().await;

    let stats = pool.stats.borrow().clone();
    let msgs = handler.msgs.borrow().clone();
    WorkerResult {
        conns: stats,
        msgs,
        run_start_ns: Some(t0),
        run_end_ns: Some(run_end),
        ..Default::default()
    }
}
