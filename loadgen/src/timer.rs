//! A sleep with sub-millisecond precision for the open-loop schedulers. monoio's timer
//! wheel rounds every sleep up to the next millisecond, which would add up to a
//! millisecond of load-generator lateness to every measured latency; a `timerfd` armed
//! at an absolute `CLOCK_MONOTONIC` time wakes within microseconds.
//!
//! Each wake-up costs a few system calls (arm, wait, read), which at tens of thousands
//! of scheduled sends a second was a fifth of the load generator's CPU. So a timer
//! wakes at most once per [`MIN_WAKE_GAP_NS`]: a scheduler then sends everything that
//! fell due meanwhile, up to that much late. Latencies are measured from the scheduled
//! time, so the lateness is in every figure, never hidden (the report's send lag).

use std::cell::Cell;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use crate::clock::mono_ns;

/// The shortest time between two wake-ups of one timer.
pub const MIN_WAKE_GAP_NS: u64 = 100_000;

pub struct PreciseTimer {
    fd: RawFd,
    /// When the last sleep ended.
    woke_ns: Cell<u64>,
    /// The timerfd wrapped so the runtime can wait for it to be readable (io_uring
    /// poll or epoll); None when no timerfd could be made (then monoio's sleep).
    waiter: Option<monoio::net::UnixStream>,
}

impl PreciseTimer {
    pub fn new() -> PreciseTimer {
        // SAFETY: timerfd_create takes no pointers; we own the returned fd.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return PreciseTimer {
                fd,
                woke_ns: Cell::new(0),
                waiter: None,
            };
        }
        // SAFETY: `fd` is a fresh descriptor we own; ownership moves into the wrapper,
        // which closes it on drop. It is not a socket: only readiness waits (poll) are
        // ever done through the wrapper, which work on any pollable descriptor, and the
        // expiration counter is read below with read(2) directly.
        let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        match monoio::net::UnixStream::from_std(std_stream) {
            Ok(w) => PreciseTimer {
                fd,
                woke_ns: Cell::new(0),
                waiter: Some(w),
            },
            Err(_) => PreciseTimer {
                fd: -1,
                woke_ns: Cell::new(0),
                waiter: None,
            },
        }
    }

    /// Sleeps until `deadline_ns` of CLOCK_MONOTONIC, or [`MIN_WAKE_GAP_NS`] after the
    /// last sleep ended if that is later. Returns at once if `deadline_ns` passed.
    pub async fn sleep_until(&self, deadline_ns: u64) {
        let now = mono_ns();
        if deadline_ns <= now {
            return;
        }
        let deadline_ns = deadline_ns.max(self.woke_ns.get() + MIN_WAKE_GAP_NS);
        self.sleep_exactly_until(deadline_ns, now).await;
        self.woke_ns.set(mono_ns());
    }

    async fn sleep_exactly_until(&self, deadline_ns: u64, now: u64) {
        let Some(waiter) = &self.waiter else {
            monoio::time::sleep(Duration::from_nanos(deadline_ns - now)).await;
            return;
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (deadline_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (deadline_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: `spec` is a live local; the old value is not asked for.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd,
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            monoio::time::sleep(Duration::from_nanos(deadline_ns - now)).await;
            return;
        }
        // The timer was disarmed and drained before, so it fires only at `deadline_ns`.
        loop {
            if waiter.readable(false).await.is_err() {
                monoio::time::sleep(Duration::from_nanos(deadline_ns.saturating_sub(mono_ns())))
                    .await;
                return;
            }
            self.drain();
            if mono_ns() >= deadline_ns {
                return;
            }
        }
    }

    fn drain(&self) {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer; the fd is non-blocking.
        let _ = unsafe { libc::read(self.fd, expirations.as_mut_ptr().cast(), 8) };
    }
}

impl Default for PreciseTimer {
    fn default() -> Self {
        PreciseTimer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sleep never ends before its deadline, nor before the gap after the last one.
    #[test]
    fn wakes_no_earlier_than_the_deadline_or_the_gap() {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let timer = PreciseTimer::new();
            let deadline = mono_ns() + 300_000;
            timer.sleep_until(deadline).await;
            let first = mono_ns();
            assert!(first >= deadline);
            // Due a microsecond from now, but the timer woke just now.
            timer.sleep_until(mono_ns() + 1_000).await;
            let second = mono_ns();
            assert!(
                second >= first + MIN_WAKE_GAP_NS,
                "woke {} ns after the last wake-up",
                second - first
            );
            // A deadline that passed returns at once, without sleeping.
            let before = timer.woke_ns.get();
            timer.sleep_until(mono_ns() - 1).await;
            assert_eq!(timer.woke_ns.get(), before);
        });
    }
}
