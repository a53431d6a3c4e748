//! `flare-loadgen`: a load generator for Flare that a performance engineer can trust.
//!
//! The model: a run is split over `processes x threads` workers; each worker thread
//! runs its own monoio runtime (io_uring, epoll where io_uring is unavailable) and owns
//! a share of the scenario's connections, like the gateway's shards own theirs
//! ([`runner`]). Message rates are open-loop ([`sched`]): every request has a scheduled
//! time, latency counts from it, so a stall cannot hide ("coordinated omission").
//! Latencies go into HdrHistograms ([`hist`]) that merge exactly across threads and
//! processes. Every chat message carries its sender's number, and a checker
//! ([`check`]) proves that every acknowledged message arrived exactly once, in order.
//!
//! The client side of the protocol is written here ([`ws`], [`proto`]) and shares no
//! code path with the gateway (DESIGN.md §2), except the rkyv schema types of
//! `flare-codec`, which *are* the normative schema of that encoding. A connection
//! holds no buffer while idle ([`conn`]), so one process can hold ~20k of them.
//!
//! Scenarios ([`scenario`]): `connect` (idle sessions, connect rate, server memory per
//! connection), `chat` (pairs at a fixed rate: latency, throughput, integrity),
//! `fanout` (a group, publishers at a fixed rate: deliveries per second and their
//! latency), `churn` (sessions that come and go). [`report`] builds the summary
//! and the JSON file. With `--target raw-ws` the same scenarios drive plain WebSocket
//! broadcast servers that do not speak Flare's protocol ([`raw`]): the peers that
//! `bench/compare` measures Flare against.

pub mod admin;
pub mod check;
pub mod cli;
pub mod clock;
pub mod conn;
pub mod coordinator;
pub mod hist;
pub mod http_pub;
pub mod proto;
pub mod raw;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod sched;
pub mod sysmem;
pub mod timer;
pub mod token;
pub mod ws;
