//! Flare's wire protocol, sans-IO.
pub mod frame;
