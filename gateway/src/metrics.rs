//! Shard-local counters, read by the admin server for `/metrics`. Each shard owns
//! one cache-line-aligned block and is its only writer.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
#[repr(align(128))]
pub struct ShardMetrics {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub sessions_open: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub sends: AtomicU64,
    pub errors_sent: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub accept_errors: AtomicU64,
}

/// Each counter has one writer, its shard's thread, and readers elsewhere (the admin
/// API): a plain load and store, not a locked read-modify-write, is enough for that, and
/// costs a fraction of one on the per-delivery path.
impl ShardMetrics {
    pub fn inc(c: &AtomicU64) {
        Self::add(c, 1);
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }

    pub fn dec(c: &AtomicU64) {
        c.store(c.load(Relaxed).wrapping_sub(1), Relaxed);
    }

    /// (name, help, kind, value) for every counter.
    pub fn series(&self) -> [(&'static str, &'static str, &'static str, u64); 11] {
        [
            (
                "flare_connections_open",
                "TCP connections held",
                "gauge",
                self.connections_open.load(Relaxed),
            ),
            (
                "flare_connections_accepted_total",
                "TCP connections accepted",
                "counter",
                self.connections_accepted.load(Relaxed),
            ),
            (
                "flare_sessions_open",
                "authenticated sessions",
                "gauge",
                self.sessions_open.load(Relaxed),
            ),
            (
                "flare_frames_in_total",
                "WebSocket messages received",
                "counter",
                self.frames_in.load(Relaxed),
            ),
            (
                "flare_frames_out_total",
                "protocol frames queued to clients",
                "counter",
                self.frames_out.load(Relaxed),
            ),
            (
                "flare_bytes_in_total",
                "bytes read from clients",
                "counter",
                self.bytes_in.load(Relaxed),
            ),
            (
                "flare_bytes_out_total",
                "bytes written to clients",
                "counter",
                self.bytes_out.load(Relaxed),
            ),
            (
                "flare_sends_total",
                "client send frames accepted for the pipeline",
                "counter",
                self.sends.load(Relaxed),
            ),
            (
                "flare_errors_sent_total",
                "error frames sent to clients",
                "counter",
                self.errors_sent.load(Relaxed),
            ),
            (
                "flare_slow_consumer_closes_total",
                "connections closed with 4008",
                "counter",
                self.slow_consumer_closes.load(Relaxed),
            ),
            (
                "flare_accept_errors_total",
                "failed accepts (e.g. EMFILE)",
                "counter",
                self.accept_errors.load(Relaxed),
            ),
        ]
    }
}
