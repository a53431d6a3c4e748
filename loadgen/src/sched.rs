//! Open-loop scheduling: tick `i` of a schedule is due at `start + i / rate`, whatever
//! happened to earlier ticks. A worker that falls behind catches up by issuing every
//! missed tick at once, each keeping its own scheduled time, and latency is measured
//! from that scheduled time. So a stall of the server (or of the load generator)
//! shows up in the latency of every request it delayed, instead of silently lowering
//! the request rate ("coordinated omission").

/// One due tick: its index in the schedule and the time it was due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tick {
    pub index: u64,
    pub scheduled_ns: u64,
}

impl Tick {
    /// Latency of the request of this tick, answered at `done_ns`.
    pub fn latency_ns(&self, done_ns: u64) -> u64 {
        done_ns.saturating_sub(self.scheduled_ns)
    }
}

/// A fixed-rate schedule over `[start_ns, end_ns)`.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    start_ns: u64,
    end_ns: u64,
    /// Ticks per 1000 seconds: integer arithmetic keeps tick times exact over long runs.
    rate_per_ks: u128,
    next: u64,
}

impl OpenLoop {
    /// A schedule of `rate_per_sec` ticks per second (> 0) from `start_ns` until `end_ns`.
    pub fn new(start_ns: u64, rate_per_sec: f64, end_ns: u64) -> OpenLoop {
        assert!(
            rate_per_sec.is_finite() && rate_per_sec > 0.0,
            "an open-loop rate is positive"
        );
        OpenLoop {
            start_ns,
            end_ns,
            rate_per_ks: ((rate_per_sec * 1000.0).round() as u128).max(1),
            next: 0,
        }
    }

    /// When tick `i` is due.
    pub fn scheduled_ns(&self, i: u64) -> u64 {
        let offset = i as u128 * 1_000_000_000_000u128 / self.rate_per_ks;
        self.start_ns
            .saturating_add(offset.min(u64::MAX as u128) as u64)
    }

    /// When the next tick is due, or None once the schedule is over.
    pub fn next_due_ns(&self) -> Option<u64> {
        let t = self.scheduled_ns(self.next);
        (t < self.end_ns).then_some(t)
    }

    /// The next tick if it is due at `now_ns`. Call until None: every missed tick comes
    /// out, in order, none skipped.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Tick> {
        let t = self.next_due_ns()?;
        if t > now_ns {
            return None;
        }
        let tick = Tick {
            index: self.next,
            scheduled_ns: t,
        };
        self.next += 1;
        Some(tick)
    }

    /// Ticks issued so far.
    pub fn issued(&self) -> u64 {
        self.next
    }

    pub fn is_done(&self) -> bool {
        self.next_due_ns().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn ticks_at_a_fixed_rate() {
        let start = 5_000 * MS;
        let mut s = OpenLoop::new(start, 1000.0, start + 10 * MS);
        let mut got = Vec::new();
        for step in 0..=20u64 {
            // Poll every half tick: each tick comes out once, at its own time.
            let now = start + step * MS / 2;
            while let Some(t) = s.pop_due(now) {
                assert!(t.scheduled_ns <= now);
                got.push(t);
            }
        }
        let want: Vec<Tick> = (0..10)
            .map(|i| Tick {
                index: i,
                scheduled_ns: start + i * MS,
            })
            .collect();
        assert_eq!(got, want);
        assert!(s.is_done());
        assert_eq!(s.issued(), 10);
    }

    #[test]
    fn catches_up_without_skipping_and_latency_counts_from_schedule() {
        let mut s = OpenLoop::new(0, 100.0, 1_000 * MS); // one tick per 10 ms
        assert_eq!(s.pop_due(0).map(|t| t.index), Some(0));
        assert_eq!(s.pop_due(0), None);
        // The worker stalls for 55 ms: ticks 1..=5 are all due, none is dropped, and
        // each keeps its scheduled time, so the stall is in their latencies.
        let now = 55 * MS;
        let late: Vec<Tick> = std::iter::from_fn(|| s.pop_due(now)).collect();
        assert_eq!(
            late.iter().map(|t| t.index).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        let answered = now + MS;
        let lat: Vec<u64> = late.iter().map(|t| t.latency_ns(answered) / MS).collect();
        assert_eq!(lat, [46, 36, 26, 16, 6]);
        assert_eq!(s.next_due_ns(), Some(60 * MS));
    }

    #[test]
    fn fractional_rates_and_the_end_are_exact() {
        // 3 ticks per second over 10 s: exactly 30, the last one before the end.
        let mut s = OpenLoop::new(0, 3.0, 10_000 * MS);
        let all: Vec<Tick> = std::iter::from_fn(|| s.pop_due(u64::MAX)).collect();
        assert_eq!(all.len(), 30);
        assert_eq!(all[3].scheduled_ns, 1_000 * MS);
        assert!(all.last().unwrap().scheduled_ns < 10_000 * MS);
        assert_eq!(s.pop_due(u64::MAX), None);
    }
}
