//! Micro-benchmarks of the pipeline's engine, without the log's I/O: the work of the
//! `flare-pipeline` thread per group commit.
//!
//! - `group_fanout`: a batch of messages to a group of [`MEMBERS`] online members
//!   (each message is an entry in every member's inbox and a delivery to every
//!   member's connection). Throughput is in deliveries.
//! - `direct`: a batch of one-to-one messages between online pairs, as `flare-loadgen
//!   chat` sends them (dedup, `msg_id`, two inbox entries, three frames to route).
//!   Throughput is in messages.
//! - `dedup_accept`: what accepting a new send costs the dedup table once it holds
//!   [`DEDUP_HELD`] entries, far more than the caches (a minute at 70k msgs/s): the
//!   key, a lookup that misses, the entry. The table is at its bound, so each entry
//!   also makes it forget its oldest, as a long-running busy node's does.
//!
//! `cargo bench -p flare-bench --bench pipeline`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flare_codec::frame::Target;
use flare_pipeline::api::{AdminOp, ConnRef, Endpoint, Event, Request};
use flare_pipeline::dedup::{Accepted, DedupTable};
use flare_pipeline::engine::Engine;
use flare_pipeline::PipelineConfig;

const ADMIN: Endpoint = 2;
const MEMBERS: u64 = 1000;
/// Messages per group commit: about what `flare-loadgen fanout` gets near its maximum.
const GROUP_BATCH: u64 = 32;
const PAIRS: u64 = 200;
/// Messages per commit of the chat batch: about what 100k msgs/s gets.
const DIRECT_BATCH: u64 = 64;
const T0: u64 = 1_800_000_000_000;
const DEDUP_HELD: u64 = 4_000_000;
/// Sends per iteration of `dedup_accept`.
const DEDUP_BATCH: u64 = 1000;

fn user(i: u64) -> String {
    format!("user-{i:06}")
}

/// Seals and "commits" what is pending; returns how many live deliveries it released.
fn commit(e: &mut Engine, now: u64) -> usize {
    if e.seal().is_some() {
        e.commit_done(now);
    }
    e.take_outputs()
        .map(|(_, ev)| match ev {
            Event::Deliver { items, .. } => items.len(),
            _ => 0,
        })
        .sum()
}

/// An engine with `users` online, user `i` on connection `i` of endpoint `i % 2`.
fn engine_with_online(users: u64, now: u64) -> Engine {
    let mut e = Engine::new(&PipelineConfig::new("", "bench"), ADMIN);
    for i in 0..users {
        e.handle(
            Request::Open {
                conn: ConnRef {
                    endpoint: (i % 2) as Endpoint,
                    conn: i,
                },
                user: user(i),
                device: "phone".into(),
                last_seq: None,
            },
            now,
        );
    }
    commit(&mut e, now);
    e
}

fn group_fanout(c: &mut Criterion) {
    let mut now = T0;
    let mut e = engine_with_online(MEMBERS, now);
    e.handle(
        Request::Admin {
            token: 1,
            op: AdminOp::PutGroup {
                group: "g".into(),
                members: (0..MEMBERS).map(user).collect(),
            },
        },
        now,
    );
    commit(&mut e, now);
    let mut next_id = 0u64;
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(GROUP_BATCH * MEMBERS));
    group.bench_function("group_fanout_1000_members_batch_32", |b| {
        b.iter(|| {
            now += 1;
            for _ in 0..GROUP_BATCH {
                next_id += 1;
                e.handle(
                    Request::Send {
                        conn: ConnRef {
                            endpoint: 0,
                            conn: 0,
                        },
                        id: next_id.to_string(),
                        to: Target::Group("g".into()),
                        body: "a message of about forty bytes, like chat".into(),
                    },
                    now,
                );
            }
            let delivered = commit(&mut e, now);
            assert_eq!(delivered as u64, GROUP_BATCH * MEMBERS);
            black_box(delivered)
        })
    });
    group.finish();
}

fn direct(c: &mut Criterion) {
    let mut now = T0;
    let mut e = engine_with_online(2 * PAIRS, now);
    let mut next = 0u64;
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(DIRECT_BATCH));
    group.bench_function("direct_messages_batch_64", |b| {
        b.iter(|| {
            now += 1;
            for _ in 0..DIRECT_BATCH {
                next += 1;
                let from = next % (2 * PAIRS);
                e.handle(
                    Request::Send {
                        conn: ConnRef {
                            endpoint: (from % 2) as Endpoint,
                            conn: from,
                        },
                        id: (next / (2 * PAIRS)).to_string(),
                        to: Target::User(user(from ^ 1)),
                        body: "a message of about forty bytes, like chat".into(),
                    },
                    now,
                );
            }
            // The recipient's copy and the sender's own.
            let delivered = commit(&mut e, now);
            assert_eq!(delivered as u64, 2 * DIRECT_BATCH);
            black_box(delivered)
        })
    });
    group.finish();
}

fn dedup_accept(c: &mut Criterion) {
    let mut table = DedupTable::new(DEDUP_HELD as usize);
    let mut n = 0u64;
    let accept = |table: &mut DedupTable, n: &mut u64| {
        *n += 1;
        let user = user(*n % 100_000);
        let key = table.key(&user, &n.to_string());
        assert!(table.get(key, 0).is_none(), "every send is new");
        let ts = T0 + *n / 100;
        table.put(
            key,
            Accepted {
                msg_id: *n,
                ts,
                batch: *n / 64,
            },
        );
    };
    while n < DEDUP_HELD {
        accept(&mut table, &mut n);
    }
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(DEDUP_BATCH));
    group.bench_function("dedup_accept_4m_held", |b| {
        b.iter(|| {
            for _ in 0..DEDUP_BATCH {
                accept(&mut table, &mut n);
            }
            black_box(table.len())
        })
    });
    group.finish();
}

criterion_group!(benches, group_fanout, direct, dedup_accept);
criterion_main!(benches);
