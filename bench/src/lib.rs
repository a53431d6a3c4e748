//! Criterion micro-benchmarks of Flare's hot paths live in `benches/`; run them with `cargo bench -p flare-bench`.
