//! The pipeline's configuration and its fixed bounds.

use std::path::PathBuf;

/// Configuration of one node's embedded pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Holds the `LOCK` file and the log; created if missing.
    pub data_dir: PathBuf,
    /// This node's id: reported in presence and hashed into `msg_id`s.
    pub node_id: String,
    /// Entries kept per inbox (PROTOCOL.md §4: 10000).
    pub retention_messages: usize,
    /// Age after which inbox entries are dropped (PROTOCOL.md §4: 7 days).
    pub retention_ms: u64,
    /// How long a (sender, `id`) pair is remembered (PROTOCOL.md §4: 10 minutes).
    pub dedup_window_ms: u64,
    /// Entries the dedup table holds at most; past it the oldest are forgotten early.
    pub dedup_max_entries: usize,
    /// Entries per catch-up page after `Open`/`CatchUp`.
    pub catchup_page: usize,
    /// Body bytes of one catch-up or sync page (at least one entry is always sent),
    /// so a page fits the gateway's outbound queue of one connection.
    pub page_bytes_max: usize,
}

impl PipelineConfig {
    /// The defaults of PROTOCOL.md for `data_dir` and `node_id`.
    pub fn new(data_dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            node_id: node_id.into(),
            retention_messages: 10_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            dedup_window_ms: 10 * 60 * 1000,
            dedup_max_entries: crate::dedup::MAX_ENTRIES_DEFAULT,
            catchup_page: 256,
            page_bytes_max: 1 << 20,
        }
    }
}

/// Requests taken from the mailbox in one round of the driver.
pub const REQUESTS_PER_ROUND: usize = 4096;

/// The driver stops taking requests while the uncommitted records of the engine
/// hold this many encoded bytes: one group commit writes at most about this much.
pub const BATCH_BYTES_MAX: usize = 4 << 20;

/// The driver stops taking requests while an endpoint has this many events it
/// could not queue yet (its mailbox was full), so memory stays bounded.
pub const BACKLOG_EVENTS_MAX: usize = 16_384;

/// Bytes of DMA memory glommio registers with io_uring. It counts against
/// `RLIMIT_MEMLOCK` (8 MiB by default) for unprivileged users; larger writes fall
/// back to ordinary allocations.
pub const IO_MEMORY_BYTES: usize = 2 << 20;

/// Bytes read per request during recovery.
pub const REPLAY_CHUNK_BYTES: usize = 1 << 20;

/// The log is written in blocks of this size (a multiple of any O_DIRECT alignment we meet).
pub const LOG_BLOCK_BYTES: usize = 4096;
