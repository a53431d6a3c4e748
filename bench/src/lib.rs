//! Criterion micro-benchmarks of Flare's hot paths live in `benches/` (`codec`: WebSocket
//! frames, JSON vs rkyv, timer wheel; `mesh`: inter-thread mailboxes; `pipeline`: the
//! engine's work per group commit); run them with `cargo bench -p flare-bench`.
//! `bench/compare` runs Flare beside peer servers.
