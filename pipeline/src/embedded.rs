//! The embedded pipeline of one node: one glommio executor thread, named
//! `flare-pipeline`, that owns the [`Engine`] and the [`EmbeddedLog`].
//!
//! Each round the driver takes up to [`REQUESTS_PER_ROUND`] requests from the
//! mailbox, feeds them to the engine and pushes the answers that need no disk (catch-up
//! and sync pages, presence, dups of durable messages). If records are pending, it
//! writes them as one batch and awaits the `fdatasync`; requests that arrive meanwhile
//! wait in the mailbox and form the next batch (group commit). Then come the answers
//! and deliveries the batch released. An endpoint whose mailbox is full gets its
//! events from a per-endpoint backlog on later rounds; while a backlog is over
//! [`BACKLOG_EVENTS_MAX`], or the pending batch over [`BATCH_BYTES_MAX`], no new
//! requests are taken, so memory stays bounded and the backpressure reaches the
//! gateway as full request queues. With nothing to do, the thread sleeps until the
//! mailbox's wake socket or the stop socket is readable (with a backlog: at most
//! [`BACKLOG_RETRY_MS`]).
//!
//! The flush is awaited, not raced against new requests. It is blocking system calls
//! now (see [`crate::log`]); when it was glommio I/O, racing it failed for a glommio
//! reason: while its one task stays runnable, glommio 0.9 looks at completed I/O only
//! when its preemption timer fires, which made commits ~20 ms late under load.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flare_shard::mailbox::{drain_wake, Full, Receiver, Sender};
use glommio::{LocalExecutorBuilder, Placement};

use crate::api::{Endpoint, Event, Request};
use crate::config::{
    PipelineConfig, BACKLOG_EVENTS_MAX, BATCH_BYTES_MAX, IO_MEMORY_BYTES, REQUESTS_PER_ROUND,
};
use crate::engine::Engine;
use crate::log::{EmbeddedLog, Log};

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the log file in the data directory.
pub const LOG_FILE: &str = "log";
/// Name of the pipeline's thread.
pub const THREAD_NAME: &str = "flare-pipeline";

/// How long to wait before retrying events for a full endpoint mailbox.
pub const BACKLOG_RETRY_MS: i32 = 1;

/// The running pipeline thread.
#[derive(Debug)]
pub struct PipelineHandle {
    stop: UnixStream,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl PipelineHandle {
    /// Asks the pipeline to finish: it takes no new requests, makes everything it
    /// accepted durable, pushes the answers, closes the log and exits. Returns once
    /// the thread has ended, with its error if it failed.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // A full buffer or a dead thread both mean it will see the stop (or has ended).
        let _ = io::Write::write(&mut &self.stop, &[1]);
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err(io::Error::other("the pipeline thread panicked")),
        }
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, "pipeline stopped with an error");
        }
    }
}

/// Starts the embedded pipeline on its own thread and returns once the log is
/// recovered and the state rebuilt.
///
/// `events[e]` is the mailbox to endpoint `e`; the last one is the admin server's.
/// Fails (without leaving a thread behind) if the data directory cannot be created
/// or locked, or the log cannot be opened or read.
pub fn spawn_embedded(
    cfg: PipelineConfig,
    mut requests: Receiver<Request>,
    events: Vec<Sender<Event>>,
) -> io::Result<PipelineHandle> {
    if events.is_empty() || events.len() > usize::from(Endpoint::MAX) + 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the pipeline needs one event mailbox per endpoint, the admin server's last",
        ));
    }
    let wake = requests.take_wake_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the request mailbox's wake socket was already taken",
        )
    })?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("creating data dir {}: {e}", cfg.data_dir.display()),
        )
    })?;
    let lock = lock_data_dir(&cfg)?;
    let (stop_tx, stop_rx) = UnixStream::pair()?;
    stop_rx.set_nonblocking(true)?;
    let (ready_tx, ready_rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let thread =
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || -> io::Result<()> {
                let executor = LocalExecutorBuilder::new(Placement::Unbound)
                    .name(THREAD_NAME)
                    .io_memory(IO_MEMORY_BYTES)
                    .make()
                    .map_err(|e| {
                        io::Error::other(format!("starting the pipeline's glommio executor: {e}"))
                    });
                let executor = match executor {
                    Ok(ex) => ex,
                    Err(e) => {
                        let _ = ready_tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                let driver = Driver {
                    cfg,
                    requests,
                    wake,
                    stop: stop_rx,
                    events,
                    _lock: lock,
                };
                executor.run(driver.run(ready_tx))
            })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(PipelineHandle {
            stop: stop_tx,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other(
                "the pipeline thread ended during recovery",
            ))
        }
    }
}

/// Takes an exclusive `flock` on `LOCK` in the data dir; held while the file is open.
fn lock_data_dir(cfg: &PipelineConfig) -> io::Result<File> {
    let path = cfg.data_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let msg = if e.kind() == io::ErrorKind::WouldBlock {
            format!(
                "data dir {} is in use by another process (locked)",
                cfg.data_dir.display()
            )
        } else {
            format!("locking {}: {e}", path.display())
        };
        return Err(io::Error::new(e.kind(), msg));
    }
    Ok(file)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits until the wake or the stop socket is readable, or `timeout_ms` passed
/// (-1: no timeout). Returns whether the stop socket is readable.
///
/// This blocks the executor thread, on purpose: it is called only when no I/O is in
/// flight and no task but the driver's exists, so there is nothing else to run. An
/// async receive would go through glommio's latency ring, whose link into the main
/// ring's sleep lost wake-ups on Linux 6.18 in our tests (the pipeline slept with a
/// full mailbox); poll(2) cannot.
fn wait_readable(wake: &UnixStream, stop: &UnixStream, timeout_ms: i32) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call,
        // and both descriptors stay open (borrowed from the sockets).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n >= 0 {
            return Ok(fds[1].revents != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Events not yet queued to their endpoint, because its mailbox was full.
struct Outbox {
    senders: Vec<Sender<Event>>,
    backlog: Vec<std::collections::VecDeque<Event>>,
}

impl Outbox {
    fn new(senders: Vec<Sender<Event>>) -> Self {
        let backlog = senders.iter().map(|_| Default::default()).collect();
        Self { senders, backlog }
    }

    /// Queues `event` for `endpoint`, behind any backlog so order holds.
    fn put(&mut self, endpoint: Endpoint, event: Event) {
        let e = usize::from(endpoint);
        let Some(sender) = self.senders.get(e) else {
            tracing::error!(
                endpoint,
                "event for an endpoint that does not exist, dropped"
            );
            return;
        };
        if !self.backlog[e].is_empty() {
            self.backlog[e].push_back(event);
            return;
        }
        if let Err(Full(event)) = sender.send(event) {
            self.backlog[e].push_back(event);
        }
    }

    /// Retries the backlogs; returns whether anything moved.
    fn retry(&mut self) -> bool {
        let mut moved = false;
        for (sender, backlog) in self.senders.iter().zip(&mut self.backlog) {
            while let Some(event) = backlog.pop_front() {
                match sender.send(event) {
                    Ok(()) => moved = true,
                    Err(Full(event)) => {
                        backlog.push_front(event);
                        break;
                    }
                }
            }
        }
        moved
    }

    fn has_backlog(&self) -> bool {
        self.backlog.iter().any(|b| !b.is_empty())
    }

    fn over_bound(&self) -> bool {
        self.backlog.iter().any(|b| b.len() > BACKLOG_EVENTS_MAX)
    }

    fn backlog_len(&self) -> usize {
        self.backlog.iter().map(|b| b.len()).sum()
    }
}

struct Driver {
    cfg: PipelineConfig,
    requests: Receiver<Request>,
    wake: UnixStream,
    stop: UnixStream,
    events: Vec<Sender<Event>>,
    /// Holds the data dir's flock until the thread ends.
    _lock: File,
}

impl Driver {
    async fn run(self, ready: mpsc::SyncSender<io::Result<()>>) -> io::Result<()> {
        let Driver {
            cfg,
            mut requests,
            wake,
            stop,
            events,
            _lock,
        } = self;
        let started = async {
            let admin = (events.len() - 1) as Endpoint;
            let mut engine = Engine::new(&cfg, admin);
            let mut log = EmbeddedLog::open(&cfg.data_dir.join(LOG_FILE)).await?;
            let now = now_ms();
            let recovered = log.replay(&mut |rec| engine.replay(rec, now)).await?;
            engine.set_log_bytes(recovered.bytes);
            tracing::info!(
                records = recovered.records,
                bytes = recovered.bytes,
                torn_tail = ?recovered.torn_tail,
                dir = %cfg.data_dir.display(),
                "pipeline log recovered"
            );
            io::Result::Ok((engine, log))
        }
        .await;
        let (mut engine, mut log) = match started {
            Ok(parts) => {
                let _ = ready.send(Ok(()));
                parts
            }
            Err(e) => {
                let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                return Err(e);
            }
        };
        drop(ready);

        let mut outbox = Outbox::new(events);
        let mut stopping = false;
        loop {
            // New requests, unless we hold back. Requests that arrive while the previous
            // batch is being written wait in the mailbox and form the next batch.
            let mut taken = 0;
            if !stopping && !outbox.over_bound() {
                while taken < REQUESTS_PER_ROUND && engine.pending_bytes() < BATCH_BYTES_MAX {
                    let Some(req) = requests.try_recv() else {
                        break;
                    };
                    engine.handle(req, now_ms());
                    taken += 1;
                }
            }
            // Read-only answers go out before we wait for the disk.
            let mut moved = outbox.retry();
            for (endpoint, event) in engine.take_outputs() {
                outbox.put(endpoint, event);
                moved = true;
            }
            // Group commit: one write + fdatasync for everything pending.
            if let Some(records) = engine.seal() {
                log.stage(records);
                let started = Instant::now();
                let (back, result) = log.flush().await;
                engine.record_flush(started.elapsed());
                log = back;
                finish_flush(&mut engine, &log, result);
                for (endpoint, event) in engine.take_outputs() {
                    outbox.put(endpoint, event);
                }
                continue;
            }
            if stopping {
                break;
            }
            if taken > 0 || moved {
                continue;
            }
            // Idle: announce sleep to the senders, then wait for a request or a stop
            // (or, with a backlog, a moment to retry it).
            let taking = !outbox.over_bound();
            if taking && !requests.prepare_wait() {
                continue;
            }
            let timeout_ms = if outbox.has_backlog() {
                BACKLOG_RETRY_MS
            } else {
                -1
            };
            if wait_readable(&wake, &stop, timeout_ms)? {
                stopping = true;
                tracing::info!("pipeline stopping: committing what it accepted");
            }
            drain_wake(&wake);
        }
        // Everything accepted is durable and answered; give the endpoints a last chance.
        outbox.retry();
        if outbox.has_backlog() {
            tracing::warn!(
                events = outbox.backlog_len(),
                "pipeline stopped with events its endpoints did not take"
            );
        }
        log.close().await
    }
}

/// Reports a finished flush to the engine.
fn finish_flush(engine: &mut Engine, log: &EmbeddedLog, result: io::Result<()>) {
    match result {
        Ok(()) => {
            engine.set_log_bytes(log.durable_bytes());
            engine.commit_done(now_ms());
        }
        Err(e) => {
            tracing::error!(error = %e, "pipeline log write failed; the batch is refused");
            engine.commit_failed(&e.to_string());
        }
    }
}
