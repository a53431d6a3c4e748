//! The thread-per-core substrate of Flare.
//!
//! A shard is one monoio runtime on one thread, pinned to one core, that owns its
//! connections, timers and buffers outright. Shards never share mutable state: they
//! talk through [`mailbox`]es (one bounded lock-free queue per sender/receiver pair and
//! a wake-up descriptor per receiver). [`launch`] starts the shards, [`listener`] makes
//! the per-shard `SO_REUSEPORT` sockets, [`slab`] hands out generation-checked
//! connection ids, and [`timer`] is the hashed timer wheel that keeps auth deadlines
//! and heartbeats without a timer per connection. Nothing here knows about messaging.

pub mod launch;
pub mod listener;
pub mod mailbox;
pub mod slab;
pub mod timer;
