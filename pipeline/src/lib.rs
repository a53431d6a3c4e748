//! Flare's message pipeline: orchestrator, storage and push.
pub mod api;
