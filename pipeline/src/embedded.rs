//! The embedded pipeline of one node: one glommio executor thread, named
//! `flare-pipeline`, that owns the [`Engine`] and the [`EmbeddedLog`].
//!
//! Each round the driver takes up to [`REQUESTS_PER_ROUND`] requests from the
//! mailbox, feeds them to the engine, starts a flush of the pending records when none
//! is in flight (group commit: whatever arrives during one `write + fdatasync` goes
//! into the next), and pushes the engine's events to the endpoints. An endpoint whose
//! mailbox is full gets its events from a per-endpoint backlog on later rounds; while
//! a backlog is over [`BACKLOG_EVENTS_MAX`], or the pending batch over
//! [`BATCH_BYTES_MAX`], no new requests are taken, so memory stays bounded and the
//! backpressure reaches the gateway as full request queues. When there is nothing to
//! do, the driver waits for the mailbox's wake socket, the flush in flight, a stop,
//! or (with a backlog) a short retry timer.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::mpsc;
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flare_shard::mailbox::{drain_wake, Full, Receiver, Sender};
use glommio::{LocalExecutorBuilder, Placement};

use crate::api::{Endpoint, Event, Request};
use crate::config::{
    PipelineConfig, BACKLOG_EVENTS_MAX, BATCH_BYTES_MAX, IO_MEMORY_BYTES, PREEMPT_MICROS,
    REQUESTS_PER_ROUND,
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
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

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
                    .preempt_timer(Duration::from_micros(PREEMPT_MICROS))
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

/// A non-blocking socket that glommio waits on until it is readable.
struct Readable {
    std: UnixStream,
    stream: glommio::net::UnixStream,
}

impl Readable {
    fn new(std: UnixStream) -> io::Result<Self> {
        let fd = std.try_clone()?.into_raw_fd();
        // SAFETY: `fd` is a fresh duplicate that nothing else owns; the glommio stream
        // takes ownership of it and closes it on drop.
        let stream = unsafe { glommio::net::UnixStream::from_raw_fd(fd) };
        Ok(Self { std, stream })
    }

    /// Resolves when a byte (or EOF) is there to read, without consuming it.
    async fn readable(&self) -> io::Result<usize> {
        let mut byte = [0u8; 1];
        self.stream.peek(&mut byte).await.map_err(io::Error::from)
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

type Flush = Pin<Box<dyn Future<Output = (EmbeddedLog, io::Result<()>)>>>;

struct Driver {
    cfg: PipelineConfig,
    requests: Receiver<Request>,
    wake: UnixStream,
    stop: UnixStream,
    events: Vec<Sender<Event>>,
    /// Holds the data dir's flock until the thread ends.
    _lock: File,
}

/// What ended an idle wait.
enum Woken {
    Flushed((EmbeddedLog, io::Result<()>)),
    Request,
    Stop,
    Timer,
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
            let wake = Readable::new(wake)?;
            let stop = Readable::new(stop)?;
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
            io::Result::Ok((wake, stop, engine, log))
        }
        .await;
        let (wake, stop, mut engine, log) = match started {
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
        let mut idle_log = Some(log);
        let mut flush: Option<Flush> = None;
        let mut wake_wait: Option<Pin<Box<dyn Future<Output = io::Result<usize>> + '_>>> = None;
        let mut stop_wait: Option<Pin<Box<dyn Future<Output = io::Result<usize>> + '_>>> = None;
        let mut timer: Option<glommio::timer::Timer> = None;
        let mut stopping = false;
        loop {
            let mut progress = false;
            // A finished flush: answer, deliver.
            if let Some(f) = flush.as_mut() {
                if let Poll::Ready(done) =
                    std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx))).await
                {
                    flush = None;
                    idle_log = Some(finish_flush(&mut engine, done));
                    progress = true;
                }
            }
            // New requests, unless we hold back.
            if !stopping && !outbox.over_bound() {
                let mut taken = 0;
                while taken < REQUESTS_PER_ROUND && engine.pending_bytes() < BATCH_BYTES_MAX {
                    let Some(req) = requests.try_recv() else {
                        break;
                    };
                    engine.handle(req, now_ms());
                    taken += 1;
                }
                progress |= taken > 0;
            }
            // Group commit: the next batch starts as soon as the last is durable.
            if flush.is_none() {
                if let Some(records) = engine.seal() {
                    let mut log = idle_log
                        .take()
                        .expect("the log is idle when no flush is in flight");
                    log.stage(records);
                    flush = Some(Box::pin(log.flush()));
                    progress = true;
                }
            }
            progress |= outbox.retry();
            for (endpoint, event) in engine.take_outputs() {
                outbox.put(endpoint, event);
                progress = true;
            }
            if stopping && flush.is_none() && !engine.has_uncommitted() {
                break;
            }
            if progress {
                glommio::yield_if_needed().await;
                continue;
            }
            // Idle: announce sleep to the senders, then wait for something to happen.
            let taking = !stopping && !outbox.over_bound();
            if taking && !requests.prepare_wait() {
                continue;
            }
            if outbox.has_backlog() && timer.is_none() {
                timer = Some(glommio::timer::Timer::new(BACKLOG_RETRY));
            }
            if taking && wake_wait.is_none() {
                wake_wait = Some(Box::pin(wake.readable()));
            }
            if !stopping && stop_wait.is_none() {
                stop_wait = Some(Box::pin(stop.readable()));
            }
            let woken = std::future::poll_fn(|cx| {
                if let Some(f) = flush.as_mut() {
                    if let Poll::Ready(done) = f.as_mut().poll(cx) {
                        return Poll::Ready(Woken::Flushed(done));
                    }
                }
                if let Some(w) = stop_wait.as_mut() {
                    if w.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Woken::Stop);
                    }
                }
                if taking {
                    if let Some(w) = wake_wait.as_mut() {
                        if w.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Woken::Request);
                        }
                    }
                }
                if let Some(t) = timer.as_mut() {
                    if Pin::new(t).poll(cx).is_ready() {
                        return Poll::Ready(Woken::Timer);
                    }
                }
                Poll::Pending
            })
            .await;
            match woken {
                Woken::Flushed(done) => {
                    flush = None;
                    idle_log = Some(finish_flush(&mut engine, done));
                }
                Woken::Request => {
                    wake_wait = None;
                    drain_wake(&wake.std);
                }
                Woken::Stop => {
                    stop_wait = None;
                    stopping = true;
                    tracing::info!("pipeline stopping: committing what it accepted");
                }
                Woken::Timer => timer = None,
            }
        }
        // Everything accepted is durable and answered; give the endpoints a last chance.
        outbox.retry();
        if outbox.has_backlog() {
            tracing::warn!(
                events = outbox.backlog_len(),
                "pipeline stopped with events its endpoints did not take"
            );
        }
        drop((wake_wait, stop_wait));
        let log = idle_log.expect("no flush is in flight at the end");
        log.close().await
    }
}

/// Reports a finished flush to the engine; returns the log for the next one.
fn finish_flush(engine: &mut Engine, (log, result): (EmbeddedLog, io::Result<()>)) -> EmbeddedLog {
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
    log
}
