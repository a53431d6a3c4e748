//! Bounded, lock-free mailboxes between threads: one queue per (sender, receiver)
//! pair, and one wake-up descriptor per receiver.
//!
//! A sender pushes into its own single-producer ring (`Ring`) and, only when the
//! receiver said it is about to sleep, writes one byte to the receiver's wake socket.
//! The receiver drains its queues, announces sleep, checks once more, and then waits
//! for its wake descriptor to become readable with whatever runtime it runs (monoio on
//! the shards, glommio in the pipeline). A full queue is backpressure: `send` gives the
//! value back and the caller decides.
//!
//! The wake descriptor is one end of a non-blocking `AF_UNIX` socket pair rather than
//! an eventfd: monoio (both drivers) and glommio can await a socket's readiness
//! natively, so no runtime needs a blocking read.

use std::cell::{Cell, UnsafeCell};
use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A bounded queue for one producer thread and one consumer thread.
///
/// The producer writes a slot, then publishes it by advancing `tail`; the consumer
/// takes published slots and frees them by advancing `head`. A value is either
/// published or not, so a consumer never waits for a producer. A multi-producer
/// queue (crossbeam's `ArrayQueue`, used here before) claims a slot first and fills it
/// after, and its `pop` spins while a claimed slot is unfilled: with more busy threads
/// than cores, a producer preempted between the two steps kept its consumer spinning
/// for the rest of a time slice. In `flare-loadgen chat` at 60k msgs/s the pipeline
/// thread spun there for about half of its time in the bursts of latency (`perf`).
struct Ring<T> {
    /// `head`, the next slot to take, written by the consumer; and the consumer's last
    /// look at `tail`.
    consumer: Side,
    /// `tail`, the next slot to fill, written by the producer; and the producer's last
    /// look at `head`.
    producer: Side,
    capacity: usize,
    /// `slots.len() - 1`; the length is a power of two at least `capacity`.
    mask: usize,
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
}

/// One side's index, and its copy of the other side's, alone on a cache line (two
/// lines: adjacent-line prefetch pairs them). Each side reads the other's index only
/// when its copy says the ring is full (producer) or empty (consumer): reading it on
/// every call took its cache line from the other core each time, and a benchmark of
/// one thread to another ran 2.4 times slower than crossbeam's queue.
#[repr(align(128))]
struct Side {
    index: AtomicUsize,
    /// Touched only by this side's thread.
    seen: Cell<usize>,
}

impl Side {
    fn new() -> Side {
        Side {
            index: AtomicUsize::new(0),
            seen: Cell::new(0),
        }
    }
}

// SAFETY: a value moves from the producer's thread to the consumer's, so `T: Send`.
// The slots are shared, but a slot is written only by the producer while it is not
// published (past `tail`, and freed: before `head + capacity`) and read only by the
// consumer while it is (from `head` to `tail`); the Release/Acquire pairs on `tail`
// and `head` order those accesses, and a stale copy of the other side's index only
// makes a side see less than there is. Each `seen` is touched by its side's thread
// only. `Sender` and `Receiver` keep one producer and one consumer.
unsafe impl<T: Send> Sync for Ring<T> {}
unsafe impl<T: Send> Send for Ring<T> {}

impl<T> Ring<T> {
    fn new(capacity: usize) -> Ring<T> {
        let len = capacity.next_power_of_two();
        Ring {
            consumer: Side::new(),
            producer: Side::new(),
            capacity,
            mask: len - 1,
            // Every slot written once now, as a queue that initializes its slots does:
            // the ring is resident from the start, not growing as traffic first reaches
            // each slot (which `connect --server-pid` counted as memory per connection).
            slots: (0..len)
                .map(|_| UnsafeCell::new(MaybeUninit::zeroed()))
                .collect(),
        }
    }

    /// Queues `value`, or gives it back when the ring is full. Producer only.
    fn push(&self, value: T) -> Result<(), T> {
        let tail = self.producer.index.load(Ordering::Relaxed);
        if tail.wrapping_sub(self.producer.seen.get()) >= self.capacity {
            self.producer
                .seen
                .set(self.consumer.index.load(Ordering::Acquire));
            if tail.wrapping_sub(self.producer.seen.get()) >= self.capacity {
                return Err(value);
            }
        }
        // SAFETY: the slot is not published, and the consumer freed it (the Acquire
        // load of `head` that `seen` holds), so only this producer touches it.
        unsafe { (*self.slots[tail & self.mask].get()).write(value) };
        self.producer
            .index
            .store(tail.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// Takes the oldest value. Consumer only.
    fn pop(&self) -> Option<T> {
        let head = self.consumer.index.load(Ordering::Relaxed);
        if head == self.consumer.seen.get() {
            self.consumer
                .seen
                .set(self.producer.index.load(Ordering::Acquire));
            if head == self.consumer.seen.get() {
                return None;
            }
        }
        // SAFETY: the slot is published (before the `tail` that `seen` holds, whose
        // Acquire load saw its write), and only this consumer takes it, once: `head`
        // moves past it.
        let value = unsafe { (*self.slots[head & self.mask].get()).assume_init_read() };
        self.consumer
            .index
            .store(head.wrapping_add(1), Ordering::Release);
        Some(value)
    }

    fn len(&self) -> usize {
        // Sequentially consistent, for the sleep handshake (see `Wake::notify`).
        let head = self.consumer.index.load(Ordering::SeqCst);
        let tail = self.producer.index.load(Ordering::SeqCst);
        tail.wrapping_sub(head)
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        while self.pop().is_some() {}
    }
}

struct Wake {
    sleeping: AtomicBool,
    tx: UnixStream,
}

impl Wake {
    /// Called after a push. The flag is read before it is written: a swap on every
    /// send took the flag's cache line from the receiver's core each time, though the
    /// receiver is seldom asleep. The fence orders the push before the read, as the
    /// receiver's `prepare_wait` orders its flag before its look at the queues: one of
    /// the two sides sees the other's write, so no value is left unannounced.
    fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            // A full socket buffer means a wake-up is already pending: that is fine.
            let _ = (&self.tx).write(&[1]);
        }
    }
}

/// The sending side of one (sender, receiver) pair. Not `Clone` and not `Sync`: one
/// owner, one thread at a time, as its ring requires.
pub struct Sender<T> {
    queue: Arc<Ring<T>>,
    wake: Arc<Wake>,
    _one_thread: PhantomData<Cell<()>>,
}

/// The value could not be queued: the receiver is behind. The value is given back.
#[derive(Debug)]
pub struct Full<T>(pub T);

impl<T> Sender<T> {
    /// Queues `value` and wakes the receiver if it sleeps.
    pub fn send(&self, value: T) -> Result<(), Full<T>> {
        match self.queue.push(value) {
            Ok(()) => {
                self.wake.notify();
                Ok(())
            }
            Err(v) => {
                // Wake it anyway: it must drain before we can make progress.
                self.wake.notify();
                Err(Full(v))
            }
        }
    }

    /// How many values wait in this pair's queue.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether this pair's queue is empty.
    pub fn is_empty(&self) -> bool {
        self.queue.len() == 0
    }
}

/// The receiving side: all queues addressed to one thread.
pub struct Receiver<T> {
    queues: Vec<Arc<Ring<T>>>,
    wake: Arc<Wake>,
    rx: Option<UnixStream>,
    next: usize,
}

impl<T> Receiver<T> {
    /// Takes one value, visiting the senders' queues round-robin so no sender starves.
    pub fn try_recv(&mut self) -> Option<T> {
        let n = self.queues.len();
        for i in 0..n {
            let q = (self.next + i) % n;
            if let Some(v) = self.queues[q].pop() {
                self.next = (q + 1) % n;
                return Some(v);
            }
        }
        None
    }

    /// Announces that the receiver is about to wait. Returns `false` when a value
    /// arrived meanwhile: then do not wait, receive again.
    pub fn prepare_wait(&self) -> bool {
        self.wake.sleeping.store(true, Ordering::SeqCst);
        if self.queues.iter().any(|q| q.len() > 0) {
            self.wake.sleeping.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Hands the readable end of the wake socket to the runtime that waits on it.
    /// After each wake-up the owner must call [`drain_wake`] on it.
    pub fn take_wake_socket(&mut self) -> Option<UnixStream> {
        self.rx.take()
    }
}

/// Reads every pending wake-up byte from a non-blocking wake socket.
pub fn drain_wake(mut rx: &UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        match rx.read(&mut buf) {
            Ok(n) if n == buf.len() => continue,
            _ => return,
        }
    }
}

/// Makes a mailbox with `senders` independent bounded queues of `capacity` each.
pub fn mailbox<T>(senders: usize, capacity: usize) -> io::Result<(Vec<Sender<T>>, Receiver<T>)> {
    assert!(senders > 0, "a mailbox needs at least one sender");
    assert!(capacity > 0, "a mailbox queue needs a capacity");
    let (tx, rx) = UnixStream::pair()?;
    tx.set_nonblocking(true)?;
    rx.set_nonblocking(true)?;
    let wake = Arc::new(Wake {
        sleeping: AtomicBool::new(false),
        tx,
    });
    let queues: Vec<_> = (0..senders)
        .map(|_| Arc::new(Ring::new(capacity)))
        .collect();
    let txs = queues
        .iter()
        .map(|q| Sender {
            queue: q.clone(),
            wake: wake.clone(),
            _one_thread: PhantomData,
        })
        .collect();
    Ok((
        txs,
        Receiver {
            queues,
            wake,
            rx: Some(rx),
            next: 0,
        },
    ))
}

/// Waits on a wake socket from a monoio runtime.
pub struct MonoioWaker {
    stream: monoio::net::UnixStream,
    std: UnixStream,
}

impl MonoioWaker {
    /// Wraps the wake socket taken from [`Receiver::take_wake_socket`].
    pub fn new(rx: UnixStream) -> io::Result<Self> {
        let std = rx.try_clone()?;
        let stream = monoio::net::UnixStream::from_std(rx)?;
        Ok(Self { stream, std })
    }

    /// Waits until a sender wrote a wake-up, then consumes it.
    pub async fn wait(&self) -> io::Result<()> {
        self.stream.readable(false).await?;
        drain_wake(&self.std);
        Ok(())
    }
}

/// Receives the next value, waiting on `waker` while every queue is empty.
pub async fn recv_monoio<T>(rx: &mut Receiver<T>, waker: &MonoioWaker) -> io::Result<T> {
    loop {
        if let Some(v) = rx.try_recv() {
            return Ok(v);
        }
        if rx.prepare_wait() {
            waker.wait().await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_and_backpressure() {
        let (txs, mut rx) = mailbox::<u32>(2, 2).unwrap();
        txs[0].send(1).unwrap();
        txs[0].send(2).unwrap();
        assert!(matches!(txs[0].send(3), Err(Full(3))));
        txs[1].send(10).unwrap();
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![1, 10, 2]);
    }

    #[test]
    fn a_ring_holds_exactly_its_capacity_in_order_across_wrap_arounds() {
        // 3 is not a power of two: the ring has 4 slots but holds 3.
        let ring = Ring::new(3);
        let mut next_in = 0u32;
        let mut next_out = 0u32;
        for round in 0..1000 {
            while ring.push(next_in).is_ok() {
                next_in += 1;
            }
            assert_eq!(ring.len(), 3, "round {round}");
            assert_eq!(ring.push(u32::MAX), Err(u32::MAX));
            // Take one or two, so the slots in use move around the ring.
            for _ in 0..1 + round % 2 {
                assert_eq!(ring.pop(), Some(next_out));
                next_out += 1;
            }
        }
        while let Some(v) = ring.pop() {
            assert_eq!(v, next_out);
            next_out += 1;
        }
        assert_eq!((next_out, ring.len()), (next_in, 0));
    }

    #[test]
    fn values_left_in_a_ring_are_dropped_with_it() {
        let counted = Arc::new(());
        let ring = Ring::new(8);
        for _ in 0..5 {
            ring.push(counted.clone()).unwrap();
        }
        drop(ring.pop());
        assert_eq!(Arc::strong_count(&counted), 5);
        drop(ring);
        assert_eq!(Arc::strong_count(&counted), 1);
    }

    /// Sends `v`, yielding while the receiver's queue is full.
    fn send_retrying(tx: &Sender<u64>, mut v: u64) {
        while let Err(Full(back)) = tx.send(v) {
            v = back;
            std::thread::yield_now();
        }
    }

    #[test]
    fn wakes_a_sleeping_receiver_across_threads() {
        let (mut txs, mut rx) = mailbox::<u64>(1, 1024).unwrap();
        let sock = rx.take_wake_socket().unwrap();
        let tx = txs.pop().unwrap();
        let producer = std::thread::spawn(move || {
            for i in 0..10_000u64 {
                send_retrying(&tx, i);
            }
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .build()
            .unwrap();
        let sum = rt.block_on(async move {
            let waker = MonoioWaker::new(sock).unwrap();
            let mut sum = 0u64;
            for expect in 0..10_000u64 {
                let v = recv_monoio(&mut rx, &waker).await.unwrap();
                assert_eq!(v, expect, "one sender's values arrive in order");
                sum += v;
            }
            sum
        });
        producer.join().unwrap();
        assert_eq!(sum, (0..10_000u64).sum::<u64>());
    }

    /// A sender that pauses between values, so the receiver goes to sleep again and
    /// again, and every value must wake it: a lost wake-up fails the wait's deadline.
    #[test]
    fn no_wake_up_is_lost_when_the_receiver_keeps_falling_asleep() {
        const VALUES: u64 = 3_000;
        let (mut txs, mut rx) = mailbox::<u64>(1, 1024).unwrap();
        let sock = rx.take_wake_socket().unwrap();
        let tx = txs.pop().unwrap();
        let producer = std::thread::spawn(move || {
            for i in 0..VALUES {
                send_retrying(&tx, i);
                // Vary the gap, so sends meet the receiver at every step of going to sleep.
                for _ in 0..(i * 7919 % 2000) {
                    std::hint::spin_loop();
                }
                if i % 64 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let waker = MonoioWaker::new(sock).unwrap();
            for expect in 0..VALUES {
                let v = monoio::time::timeout(
                    std::time::Duration::from_secs(20),
                    recv_monoio(&mut rx, &waker),
                )
                .await
                .unwrap_or_else(|_| panic!("value {expect} was queued but never announced"))
                .unwrap();
                assert_eq!(v, expect);
            }
        });
        producer.join().unwrap();
    }
}
