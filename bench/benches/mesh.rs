//! Micro-benchmarks of the inter-thread mesh (`flare_shard::mailbox`): the cost of one
//! hand-off on the same thread (queue push and pop, no wake-up), and the throughput of
//! one sender thread to one receiver thread that sleeps on its wake socket whenever
//! its queue is empty, as a shard does.
//!
//! `cargo bench -p flare-bench --bench mesh`

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flare_shard::mailbox::{drain_wake, mailbox, Receiver};

/// Values per cross-thread measurement.
const BURST: u64 = 100_000;
/// Queue depth of each (sender, receiver) pair.
const DEPTH: usize = 1024;

fn same_thread(c: &mut Criterion) {
    let (senders, mut rx) = mailbox::<u64>(1, DEPTH).expect("mailbox");
    let mut group = c.benchmark_group("mesh");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_recv_same_thread", |b| {
        b.iter(|| {
            senders[0].send(black_box(7)).expect("room in the queue");
            rx.try_recv().expect("the value just sent")
        })
    });
    group.finish();
}

/// Receives one value, sleeping on the wake socket (poll(2)) while the queue is empty.
fn recv_blocking(
    rx: &mut Receiver<u64>,
    wake_fd: i32,
    wake: &std::os::unix::net::UnixStream,
) -> u64 {
    loop {
        if let Some(v) = rx.try_recv() {
            return v;
        }
        if rx.prepare_wait() {
            let mut pfd = libc::pollfd {
                fd: wake_fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, count 1; poll only writes `revents`.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            drain_wake(wake);
        }
    }
}

fn cross_thread(c: &mut Criterion) {
    let mut group = c.benchmark_group("mesh");
    group.throughput(Throughput::Elements(BURST));
    group.sample_size(20);
    group.bench_function("one_to_one_cross_thread_100k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (mut senders, mut rx) = mailbox::<u64>(1, DEPTH).expect("mailbox");
                let wake = rx.take_wake_socket().expect("a wake socket");
                let tx = senders.pop().expect("one sender");
                let start = Instant::now();
                let producer = std::thread::spawn(move || {
                    for i in 0..BURST {
                        let mut v = i;
                        while let Err(full) = tx.send(v) {
                            v = full.0;
                            std::hint::spin_loop();
                        }
                    }
                });
                let mut sum = 0u64;
                for _ in 0..BURST {
                    sum = sum.wrapping_add(recv_blocking(&mut rx, wake.as_raw_fd(), &wake));
                }
                producer.join().expect("producer");
                total += start.elapsed();
                assert_eq!(sum, BURST * (BURST - 1) / 2, "every value arrived once");
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, same_thread, cross_thread);
criterion_main!(benches);
