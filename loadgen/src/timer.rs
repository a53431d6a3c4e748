//! A sleep with sub-millisecond precision for the open-loop schedulers. monoio's timer
//! wheel rounds every sleep up to the next millisecond, which would add up to a
//! millisecond of load-generator lateness to every measured latency; a `timerfd` armed
//! at an absolute `CLOCK_MONOTONIC` time wakes within microseconds.

use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use crate::clock::mono_ns;

pub struct PreciseTimer {
    fd: RawFd,
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
            return PreciseTimer { fd, waiter: None };
        }
        // SAFETY: `fd` is a fresh descriptor we own; ownership moves into the wrapper,
        // which closes it on drop. It is not a socket: only readiness waits (poll) are
        // ever done through the wrapper, which work on any pollable descriptor, and the
        // expiration counter is read below with read(2) directly.
        let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        match monoio::net::UnixStream::from_std(std_stream) {
            Ok(w) => PreciseTimer {
                fd,
                waiter: Some(w),
            },
            Err(_) => PreciseTimer {
                fd: -1,
                waiter: None,
            },
        }
    }

    /// Sleeps until `deadline_ns` of CLOCK_MONOTONIC (returns at once if it passed).
    pub async fn sleep_until(&self, deadline_ns: u64) {
        let now = mono_ns();
        if deadline_ns <= now {
            return;
        }
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
        while mono_ns() < deadline_ns {
            if waiter.readable(false).await.is_err() {
                monoio::time::sleep(Duration::from_nanos(deadline_ns.saturating_sub(mono_ns())))
                    .await;
                break;
            }
            self.drain();
        }
        self.drain();
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
