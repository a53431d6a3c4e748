//! Processes and threads of a run, and the phases they go through together.
//!
//! A run has `processes x threads` workers, numbered globally; worker `w` owns the
//! scenario's items (connections, pairs, members) whose index is `w` modulo the worker
//! count. Each worker thread runs one monoio runtime (io_uring, or epoll where
//! io_uring is unavailable), like the gateway's shards.
//!
//! Phases: every worker opens its sessions and reports *ready*; the coordinator (the
//! parent process) samples the server's memory, then sends *go* with one start time
//! for all; workers run for `--duration`, drain, report *run done*, and wait for
//! *stop*; then they close their sessions and hand back a [`WorkerResult`].
//!
//! With one process the coordinator talks to its threads through atomics. With more,
//! it re-executes this binary as worker processes (`--worker-process N`): each prints
//! one JSON line per progress tick and a last line with its result on stdout, and
//! reads `go <ns>` and `stop` lines on stdin.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::IpAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::{Common, Scenario};
use crate::clock::mono_ns;
use crate::conn::Target;
use crate::report::WorkerResult;
use crate::sysmem;

/// Everything a worker needs to know about the run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub common: Common,
    pub scenario: Scenario,
    pub target: Target,
    pub secret: Vec<u8>,
    pub run_id: String,
    pub threads: usize,
    pub processes: usize,
    /// Expiry of every minted token (seconds since the epoch).
    pub token_exp: u64,
}

impl RunConfig {
    pub fn workers(&self) -> usize {
        self.threads * self.processes
    }

    /// The user id of item `i` of kind `kind` (`c` connect, `p` chat, `m` fanout
    /// member, `n` churn).
    pub fn user(&self, kind: &str, i: usize) -> String {
        format!("{}-{}-{kind}{i}", self.common.user_prefix, self.run_id)
    }

    /// The source address of global connection number `i`, round-robin.
    pub fn source_for(&self, i: usize) -> Option<IpAddr> {
        let s = &self.common.source_addrs;
        (!s.is_empty()).then(|| s[i % s.len()])
    }

    pub fn token(&self, user: &str) -> String {
        crate::token::mint(&self.secret, user, Some("lg"), self.token_exp)
    }
}

/// Live counters of one worker thread, for the progress line and the coordinator.
/// One per thread, each on its own cache lines: a fan-out worker counts millions of
/// deliveries a second, and one set shared by the threads would move its cache line
/// between cores on every count.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Progress {
    pub attempted: AtomicU64,
    pub established: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    pub closed: AtomicU64,
    pub scheduled: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub deliveries_unique: AtomicU64,
    /// Workers that finished opening their sessions.
    pub ready: AtomicU64,
    /// Workers that finished their run phase and their own drain.
    pub run_done: AtomicU64,
}

/// A copy of [`Progress`]; snapshots of processes add up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub dropped: u64,
    pub closed: u64,
    pub scheduled: u64,
    pub sent: u64,
    pub acked: u64,
    pub errors: u64,
    pub deliveries_unique: u64,
    pub ready: u64,
    pub run_done: u64,
}

impl Progress {
    /// Adds `n` to one of a worker's counters. Only its own thread writes them, so a
    /// load and a store do, without the locked read-modify-write of `fetch_add`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            attempted: g(&self.attempted),
            established: g(&self.established),
            failed: g(&self.failed),
            dropped: g(&self.dropped),
            closed: g(&self.closed),
            scheduled: g(&self.scheduled),
            sent: g(&self.sent),
            acked: g(&self.acked),
            errors: g(&self.errors),
            deliveries_unique: g(&self.deliveries_unique),
            ready: g(&self.ready),
            run_done: g(&self.run_done),
        }
    }
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.attempted += o.attempted;
        self.established += o.established;
        self.failed += o.failed;
        self.dropped += o.dropped;
        self.closed += o.closed;
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        self.acked += o.acked;
        self.errors += o.errors;
        self.deliveries_unique += o.deliveries_unique;
        self.ready += o.ready;
        self.run_done += o.run_done;
    }

    pub fn open(&self) -> u64 {
        self.established
            .saturating_sub(self.dropped)
            .saturating_sub(self.closed)
    }
}

/// What the threads of one process share.
#[derive(Debug)]
pub struct Shared {
    /// One per worker thread of the process, in thread order.
    progress: Vec<Progress>,
    /// CLOCK_MONOTONIC ns at which the run phase starts; 0 until the coordinator says.
    pub go_at_ns: AtomicU64,
    pub stop: AtomicBool,
}

impl Shared {
    fn new(threads: usize) -> Shared {
        Shared {
            progress: (0..threads).map(|_| Progress::default()).collect(),
            go_at_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        }
    }

    /// The process's counters: its threads' summed.
    fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for p in &self.progress {
            s.add(&p.snapshot());
        }
        s
    }
}

/// One worker's identity, inside its thread.
pub struct Worker {
    pub cfg: Arc<RunConfig>,
    pub shared: Arc<Shared>,
    /// Global worker number and count.
    pub index: usize,
    pub count: usize,
}

/// How often a worker looks at the coordinator's signals.
const SIGNAL_POLL: Duration = Duration::from_millis(5);

impl Worker {
    /// Global indices `0..n` that this worker owns.
    pub fn owned(&self, n: usize) -> impl Iterator<Item = usize> + '_ {
        (self.index..n).step_by(self.count)
    }

    /// This worker's own counters. Global worker `index` is thread
    /// `index % threads` of its process (see [`ProcessRun::start`]).
    pub fn progress(&self) -> &Progress {
        let own = &self.shared.progress;
        &own[self.index % own.len()]
    }

    /// Reports ready and waits for *go*; returns the run's start time.
    pub async fn ready_and_wait_go(&self) -> u64 {
        let t = self.ready_and_learn_go().await;
        Worker::sleep_until(t).await;
        t
    }

    /// Reports ready and returns the run's start time as soon as the coordinator has
    /// set it, which it does 200 ms ahead: time to make what must exist before the
    /// first message arrives. Other workers start at that time whether or not this one
    /// is waiting; [`Worker::sleep_until`] waits for it.
    pub async fn ready_and_learn_go(&self) -> u64 {
        Progress::add(&self.progress().ready, 1);
        loop {
            let t = self.shared.go_at_ns.load(Ordering::Acquire);
            if t != 0 {
                return t;
            }
            monoio::time::sleep(SIGNAL_POLL).await;
        }
    }

    /// Sleeps until `t` (CLOCK_MONOTONIC ns), at once if it passed.
    pub async fn sleep_until(t: u64) {
        let now = mono_ns();
        if t > now {
            monoio::time::sleep(Duration::from_nanos(t - now)).await;
        }
    }

    /// Reports the run phase done and waits for *stop*.
    pub async fn done_and_wait_stop(&self) {
        Progress::add(&self.progress().run_done, 1);
        while !self.shared.stop.load(Ordering::Acquire) {
            monoio::time::sleep(SIGNAL_POLL).await;
        }
    }
}

/// The worker threads of this process.
pub struct ProcessRun {
    pub shared: Arc<Shared>,
    handles: Vec<JoinHandle<Result<WorkerResult, String>>>,
    threads: usize,
    rss_at_start_kib: u64,
    rss_at_ready_kib: Option<u64>,
}

impl ProcessRun {
    /// Starts this process's threads: global workers `process * threads ..`.
    pub fn start(cfg: Arc<RunConfig>, process: usize) -> Result<ProcessRun, String> {
        let rss_at_start_kib = sysmem::self_rss_kib();
        let shared = Arc::new(Shared::new(cfg.threads));
        let mut handles = Vec::new();
        for t in 0..cfg.threads {
            let index = process * cfg.threads + t;
            let worker = Worker {
                cfg: cfg.clone(),
                shared: shared.clone(),
                index,
                count: cfg.workers(),
            };
            let h = std::thread::Builder::new()
                .name(format!("lg-worker-{index}"))
                .spawn(move || {
                    let mut rt = worker_runtime().map_err(|e| {
                        format!("worker {index}: cannot start a monoio runtime: {e}")
                    })?;
                    Ok(rt.block_on(crate::scenario::run(worker)))
                })
                .map_err(|e| format!("cannot spawn a worker thread: {e}"))?;
            handles.push(h);
        }
        Ok(ProcessRun {
            shared,
            handles,
            threads: cfg.threads,
            rss_at_start_kib,
            rss_at_ready_kib: None,
        })
    }

    /// The process's counters; samples its own RSS once every thread is ready.
    pub fn snapshot(&mut self) -> Result<Snapshot, String> {
        let s = self.shared.snapshot();
        if self.rss_at_ready_kib.is_none() && s.ready >= self.threads as u64 {
            self.rss_at_ready_kib = Some(sysmem::self_rss_kib());
        }
        let unfinished = s.ready < self.threads as u64 || s.run_done < self.threads as u64;
        if unfinished && self.handles.iter().any(|h| h.is_finished()) {
            return Err("a worker thread ended before the run did".into());
        }
        Ok(s)
    }

    pub fn go(&self, t0: u64) {
        self.shared.go_at_ns.store(t0, Ordering::Release);
    }

    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }

    /// Joins the threads and merges their results.
    pub fn finish(self) -> Result<WorkerResult, String> {
        let mut parts = Vec::new();
        for h in self.handles {
            match h.join() {
                Ok(Ok(r)) => parts.push(r),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err("a worker thread panicked".into()),
            }
        }
        let mut total = WorkerResult::merged(&parts);
        total.loadgen_rss_kib = self
            .rss_at_ready_kib
            .unwrap_or(0)
            .saturating_sub(self.rss_at_start_kib);
        Ok(total)
    }
}

/// A line a worker process prints on stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ChildLine {
    Progress { snapshot: Snapshot },
    Result { result: Box<WorkerResult> },
    Failed { error: String },
}

const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// A worker's monoio runtime. Its ring is set up with `COOP_TASKRUN` (Linux 5.19; refused
/// with EINVAL before, and then left out): a completion arriving while the worker runs
/// waits for the worker's next system call instead of interrupting it, as the gateway's
/// shards do. A worker sees completions only when it next looks at its ring, so this
/// changes what the interrupts cost (on a virtual machine, an exit to the hypervisor
/// each), not when a receipt is timed.
fn worker_runtime() -> std::io::Result<
    monoio::FusionRuntime<
        monoio::time::TimeDriver<monoio::IoUringDriver>,
        monoio::time::TimeDriver<monoio::LegacyDriver>,
    >,
> {
    let build = |urb| {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .with_entries(1024)
            .uring_builder(urb)
            .enable_timer()
            .build()
    };
    let mut coop = io_uring::IoUring::builder();
    coop.setup_coop_taskrun();
    match build(coop) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => build(io_uring::IoUring::builder()),
        built => built,
    }
}

/// The main loop of a worker process (`--worker-process N`).
pub fn child_main(cfg: Arc<RunConfig>, process: usize) -> Result<(), String> {
    let mut run = ProcessRun::start(cfg, process)?;
    let shared = run.shared.clone();
    std::thread::Builder::new()
        .name("lg-stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("go"), Some(t)) => {
                        if let Ok(t) = t.parse::<u64>() {
                            shared.go_at_ns.store(t, Ordering::Release);
                        }
                    }
                    (Some("stop"), _) => shared.stop.store(true, Ordering::Release),
                    _ => {}
                }
            }
            // The parent went away: stop rather than run forever.
            shared.stop.store(true, Ordering::Release);
            if shared.go_at_ns.load(Ordering::Acquire) == 0 {
                shared.go_at_ns.store(mono_ns(), Ordering::Release);
            }
        })
        .map_err(|e| e.to_string())?;
    let out = std::io::stdout();
    let print = |line: &ChildLine| {
        let mut o = out.lock();
        let _ = serde_json::to_writer(&mut o, line);
        let _ = o.write_all(b"\n");
        let _ = o.flush();
    };
    let threads = run.threads as u64;
    loop {
        let s = match run.snapshot() {
            Ok(s) => s,
            Err(e) => {
                print(&ChildLine::Failed { error: e.clone() });
                return Err(e);
            }
        };
        print(&ChildLine::Progress { snapshot: s });
        if s.run_done >= threads && run.shared.stop.load(Ordering::Acquire) {
            break;
        }
        std::thread::sleep(PROGRESS_TICK);
    }
    match run.finish() {
        Ok(result) => {
            print(&ChildLine::Result {
                result: Box::new(result),
            });
            Ok(())
        }
        Err(e) => {
            print(&ChildLine::Failed { error: e.clone() });
            Err(e)
        }
    }
}

#[derive(Default)]
struct ChildState {
    snapshot: Snapshot,
    result: Option<WorkerResult>,
    error: Option<String>,
    eof: bool,
}

pub struct ChildHandle {
    child: Child,
    stdin: Option<ChildStdin>,
    state: Arc<Mutex<ChildState>>,
    reader: Option<JoinHandle<()>>,
}

/// The workers of the run, seen from the coordinator.
pub enum Fleet {
    Local(ProcessRun),
    Children(Vec<ChildHandle>),
}

impl Fleet {
    /// This process's threads, or `processes` re-executions of this binary.
    pub fn start(cfg: Arc<RunConfig>) -> Result<Fleet, String> {
        if cfg.processes <= 1 {
            return Ok(Fleet::Local(ProcessRun::start(cfg, 0)?));
        }
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find this executable: {e}"))?;
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let mut children = Vec::new();
        for p in 0..cfg.processes {
            let mut cmd = Command::new(&exe);
            cmd.args(&args)
                .arg("--worker-process")
                .arg(p.to_string())
                .arg("--run-id")
                .arg(&cfg.run_id)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start worker process {p}: {e}"))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            let stdin = child.stdin.take();
            let state = Arc::new(Mutex::new(ChildState::default()));
            let st = state.clone();
            let reader = std::thread::Builder::new()
                .name(format!("lg-child-{p}"))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        let mut s = st.lock().expect("child state lock");
                        match serde_json::from_str::<ChildLine>(&line) {
                            Ok(ChildLine::Progress { snapshot }) => s.snapshot = snapshot,
                            Ok(ChildLine::Result { result }) => s.result = Some(*result),
                            Ok(ChildLine::Failed { error }) => s.error = Some(error),
                            Err(e) => {
                                s.error =
                                    Some(format!("unreadable line from worker process {p}: {e}"))
                            }
                        }
                    }
                    st.lock().expect("child state lock").eof = true;
                })
                .map_err(|e| e.to_string())?;
            children.push(ChildHandle {
                child,
                stdin,
                state,
                reader: Some(reader),
            });
        }
        Ok(Fleet::Children(children))
    }

    pub fn snapshot(&mut self) -> Result<Snapshot, String> {
        match self {
            Fleet::Local(run) => run.snapshot(),
            Fleet::Children(children) => {
                let mut total = Snapshot::default();
                for (p, c) in children.iter().enumerate() {
                    let s = c.state.lock().expect("child state lock");
                    if let Some(e) = &s.error {
                        return Err(format!("worker process {p}: {e}"));
                    }
                    if s.eof && s.result.is_none() {
                        return Err(format!("worker process {p} exited without a result"));
                    }
                    total.add(&s.snapshot);
                }
                Ok(total)
            }
        }
    }

    fn tell(children: &mut [ChildHandle], line: &str) {
        for c in children {
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = stdin.write_all(line.as_bytes());
                let _ = stdin.flush();
            }
        }
    }

    pub fn go(&mut self, t0: u64) {
        match self {
            Fleet::Local(run) => run.go(t0),
            Fleet::Children(children) => Self::tell(children, &format!("go {t0}\n")),
        }
    }

    pub fn stop(&mut self) {
        match self {
            Fleet::Local(run) => run.stop(),
            Fleet::Children(children) => Self::tell(children, "stop\n"),
        }
    }

    /// Waits for every worker's result and merges them.
    pub fn finish(self) -> Result<WorkerResult, String> {
        match self {
            Fleet::Local(run) => run.finish(),
            Fleet::Children(children) => {
                let mut parts = Vec::new();
                for (p, mut c) in children.into_iter().enumerate() {
                    drop(c.stdin.take());
                    if let Some(r) = c.reader.take() {
                        let _ = r.join();
                    }
                    let status = c.child.wait().map_err(|e| e.to_string())?;
                    let mut s = c.state.lock().expect("child state lock");
                    match s.result.take() {
                        Some(r) => parts.push(r),
                        None => {
                            return Err(format!(
                                "worker process {p} ({status}) gave no result{}",
                                s.error
                                    .as_ref()
                                    .map(|e| format!(": {e}"))
                                    .unwrap_or_default()
                            ))
                        }
                    }
                }
                Ok(WorkerResult::merged(&parts))
            }
        }
    }

    /// Ends every worker process at once (after an error).
    pub fn abort(self) {
        match self {
            Fleet::Local(run) => {
                run.go(mono_ns());
                run.stop();
            }
            Fleet::Children(children) => {
                for mut c in children {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                }
            }
        }
    }
}

/// The live progress line on stderr (only on a terminal).
pub struct ProgressLine {
    enabled: bool,
    start: Instant,
    shown: bool,
}

impl ProgressLine {
    pub fn new(quiet: bool) -> ProgressLine {
        ProgressLine {
            enabled: !quiet && std::io::stderr().is_terminal(),
            start: Instant::now(),
            shown: false,
        }
    }

    pub fn show(&mut self, phase: &str, s: &Snapshot) {
        if !self.enabled {
            return;
        }
        let line = format!(
            "[{:6.1}s] {phase:<10} conns {} open / {} attempted, {} failed, {} dropped | sched {} sent {} acked {} err {} deliv {}",
            self.start.elapsed().as_secs_f64(),
            s.open(),
            s.attempted,
            s.failed,
            s.dropped,
            s.scheduled,
            s.sent,
            s.acked,
            s.errors,
            s.deliveries_unique
        );
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K{line}");
        let _ = e.flush();
        self.shown = true;
    }

    pub fn clear(&mut self) {
        if self.shown {
            let mut e = std::io::stderr().lock();
            let _ = write!(e, "\r\x1b[2K");
            let _ = e.flush();
            self.shown = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_sums_the_counters_of_its_threads() {
        let shared = Shared::new(2);
        Progress::add(&shared.progress[0].acked, 3);
        Progress::add(&shared.progress[1].acked, 4);
        Progress::add(&shared.progress[1].ready, 1);
        let s = shared.snapshot();
        assert_eq!((s.acked, s.ready, s.sent), (7, 1, 0));
        let (a, b) = (&shared.progress[0], &shared.progress[1]);
        let apart = (b as *const Progress as usize) - (a as *const Progress as usize);
        assert!(
            apart >= 128,
            "each thread's counters have their own cache lines"
        );
    }
}
