//! Flare's message pipeline: orchestrator, storage and push.
//!
//! The gateway talks to the pipeline through mailboxes of [`api::Request`]s and
//! [`api::Event`]s. [`engine::Engine`] makes every decision without I/O: pre-send
//! hooks (group membership, block lists), dedup on (sender, `id`), `msg_id`s, inbox
//! `seq`s, ack cursors, retention, sessions and their catch-up, presence and kicks. It
//! turns requests into log [`record::Record`]s and holds the answers that promise
//! durability until the driver reports the batch durable. Inbox `seq`s are assigned
//! when a record is applied, in log order, so replaying the log at start rebuilds the
//! same state ([`state::MemState`]).
//!
//! [`embedded::spawn_embedded`] runs the default, one-process deployment: a glommio
//! executor thread that feeds the engine and writes the log ([`log::EmbeddedLog`]) to
//! an O_DIRECT file in the data directory with group commit and `fdatasync`.
//!
//! Not done yet: the log is one file that only grows (no segments, no compaction, no
//! snapshot of the state: recovery replays everything, and retention only bounds
//! memory); the cluster backends (Kafka log, Redis state) and the notification topic
//! for offline users; the content-filter hook.

pub mod api;
pub mod config;
pub mod dedup;
pub mod embedded;
pub mod engine;
pub mod ids;
pub mod intern;
pub mod log;
pub mod record;
mod sharded;
pub mod state;

pub use config::PipelineConfig;

/// The hash map of the pipeline's hot paths: std's map with aHash, seeded at random per
/// process like std's SipHash, so keys a client picks cannot be aimed at one bucket.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
pub use embedded::{spawn_embedded, PipelineHandle};
