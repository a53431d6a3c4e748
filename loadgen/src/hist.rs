//! Latency histograms (HdrHistogram, nanoseconds, 3 significant digits). Worker
//! threads and processes each record their own; the results carry them in the V2
//! serialization, base64'd, and merging adds the counts, so the merged percentiles are
//! exactly those of one histogram of every sample.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest value tracked before the histogram grows (it auto-resizes past it).
const INITIAL_HIGHEST_NS: u64 = 60_000_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;
/// Precision of one interval of a [`LatencySeries`]: 2 digits keep a histogram at about
/// 30 KiB, where 3 take 220 KiB.
const SERIES_DIGITS: u8 = 2;
/// Most intervals in a series: a longer run gets wider intervals, so a series holds at
/// most this many histograms (about 9 MiB) whatever the run's length.
pub const MAX_INTERVALS: u64 = 300;

#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist::new()
    }
}

impl LatencyHist {
    pub fn new() -> LatencyHist {
        LatencyHist::with_digits(SIGNIFICANT_DIGITS)
    }

    fn with_digits(digits: u8) -> LatencyHist {
        let mut h = Histogram::new_with_bounds(1, INITIAL_HIGHEST_NS, digits)
            .expect("valid histogram bounds");
        h.auto(true);
        LatencyHist(h)
    }

    /// Records one latency in nanoseconds (0 is recorded as 1 ns).
    pub fn record(&mut self, ns: u64) {
        let v = ns.max(1);
        // Auto-resize makes room for any value; should growing fail, clamp.
        if self.0.record(v).is_err() {
            self.0.saturating_record(v);
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHist) {
        self.0
            .add(&other.0)
            .expect("an auto-resizing histogram accepts any other histogram");
    }

    /// The V2 serialization, base64.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .expect("serializing to a Vec cannot fail");
        STANDARD.encode(bytes)
    }

    pub fn from_base64(s: &str) -> Result<LatencyHist, String> {
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| format!("histogram is not base64: {e}"))?;
        let mut h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut &bytes[..])
            .map_err(|e| format!("histogram is not V2: {e:?}"))?;
        h.auto(true);
        Ok(LatencyHist(h))
    }

    /// Percentiles and extremes, in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.0;
        let us = |ns: u64| ns as f64 / 1000.0;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

impl Serialize for LatencyHist {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for LatencyHist {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LatencyHist::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// Latency over the run: one histogram per interval, each sample in the interval of its
/// *scheduled* send time. One histogram of the whole run hides when its tail happened;
/// here a stall shows as the intervals whose messages waited for it, and the backlog it
/// left as the ones after. Workers and processes share the run's start, so their series
/// merge interval by interval, exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencySeries {
    /// Start of the first interval (CLOCK_MONOTONIC ns).
    start_ns: u64,
    /// Width of an interval; 0 in a series that was not started yet.
    interval_ns: u64,
    /// Intervals in the run (the last one may be partial).
    intervals: u64,
    /// Histograms of the intervals so far, made as samples reach them.
    slots: Vec<LatencyHist>,
    /// The interval the last sample fell in, `[start, end)` ns and its index: samples
    /// come mostly in order, and this spares each a division.
    #[serde(skip)]
    last: (u64, u64, usize),
    /// Samples recorded before the series was started, for [`LatencySeries::start`].
    #[serde(skip)]
    early: Vec<(u64, u64)>,
}

impl PartialEq for LatencySeries {
    fn eq(&self, o: &LatencySeries) -> bool {
        (self.start_ns, self.interval_ns, self.intervals, &self.slots)
            == (o.start_ns, o.interval_ns, o.intervals, &o.slots)
    }
}

impl LatencySeries {
    /// A series of the run `[start_ns, start_ns + run_ns)` in intervals of `interval_ns`,
    /// widened to whole multiples of it if the run would need more than
    /// [`MAX_INTERVALS`].
    pub fn new(start_ns: u64, run_ns: u64, interval_ns: u64) -> LatencySeries {
        let asked = interval_ns.max(1);
        let widen = run_ns.div_ceil(asked).div_ceil(MAX_INTERVALS).max(1);
        let interval_ns = asked * widen;
        LatencySeries {
            start_ns,
            interval_ns,
            intervals: run_ns.div_ceil(interval_ns).max(1),
            slots: Vec::new(),
            last: (0, 0, 0),
            early: Vec::new(),
        }
    }

    /// Makes this series the one [`LatencySeries::new`] makes, keeping the samples
    /// recorded before: a worker can receive its first messages before it starts it.
    pub fn start(&mut self, start_ns: u64, run_ns: u64, interval_ns: u64) {
        let early = std::mem::take(&mut self.early);
        *self = LatencySeries::new(start_ns, run_ns, interval_ns);
        for (scheduled_ns, latency_ns) in early {
            self.record(scheduled_ns, latency_ns);
        }
    }

    /// Width of an interval (ns); 0 if never started.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Records `latency_ns` of a message scheduled at `scheduled_ns`. Samples before the
    /// start count in the first interval, after the end in the last.
    pub fn record(&mut self, scheduled_ns: u64, latency_ns: u64) {
        let (start, end, i) = self.last;
        if (start..end).contains(&scheduled_ns) {
            self.slots[i].record(latency_ns);
            return;
        }
        if self.interval_ns == 0 {
            self.early.push((scheduled_ns, latency_ns));
            return;
        }
        let i =
            (scheduled_ns.saturating_sub(self.start_ns) / self.interval_ns).min(self.intervals - 1);
        while self.slots.len() <= i as usize {
            self.slots.push(LatencyHist::with_digits(SERIES_DIGITS));
        }
        self.slots[i as usize].record(latency_ns);
        // The first and last intervals also hold what falls before and after the run;
        // those samples take the slow way.
        let start = self.start_ns + i * self.interval_ns;
        self.last = (start, start + self.interval_ns, i as usize);
    }

    /// Adds every sample of `other`, a series of the same run.
    pub fn merge(&mut self, other: &LatencySeries) {
        if other.interval_ns == 0 {
            return;
        }
        if self.interval_ns == 0 {
            *self = other.clone();
            return;
        }
        assert!(
            (self.start_ns, self.interval_ns) == (other.start_ns, other.interval_ns),
            "series of one run share its start and interval"
        );
        self.intervals = self.intervals.max(other.intervals);
        for (i, h) in other.slots.iter().enumerate() {
            match self.slots.get_mut(i) {
                Some(mine) => mine.merge(h),
                None => self.slots.push(h.clone()),
            }
        }
    }

    /// Each interval's figures, every interval of the run included (empty ones with a
    /// count of 0).
    pub fn summary(&self) -> Vec<IntervalSummary> {
        let empty = LatencyHist::with_digits(SERIES_DIGITS);
        (0..self.intervals as usize)
            .map(|i| {
                let s = self.slots.get(i).unwrap_or(&empty).summary();
                IntervalSummary {
                    start_secs: (i as u64 * self.interval_ns) as f64 / 1e9,
                    count: s.count,
                    p50_us: s.p50_us,
                    p99_us: s.p99_us,
                    max_us: s.max_us,
                }
            })
            .collect()
    }
}

/// One interval of a [`LatencySeries`] (microseconds, within 1%).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalSummary {
    /// Seconds from the run's start to the interval's.
    pub start_secs: f64,
    /// Messages scheduled in the interval that arrived.
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// What a report shows of one histogram (microseconds; HdrHistogram's values are
/// equivalent within 0.1%).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic spread of latencies from 1 µs to ~2 s.
    fn samples(seed: u64, n: usize) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                1_000 + (x % 2_000_000_000) / (1 + (x >> 60))
            })
            .collect()
    }

    #[test]
    fn merge_of_serialized_histograms_equals_histogram_of_all_samples() {
        let parts: Vec<Vec<u64>> = (1..=4).map(|s| samples(s * 7919, 5_000)).collect();
        let mut all = LatencyHist::new();
        for v in parts.iter().flatten() {
            all.record(*v);
        }
        // Each worker records its part, ships it as base64 V2, and the parent merges.
        let mut merged = LatencyHist::new();
        for part in &parts {
            let mut h = LatencyHist::new();
            for v in part {
                h.record(*v);
            }
            let wire = h.to_base64();
            merged.merge(&LatencyHist::from_base64(&wire).unwrap());
        }
        assert_eq!(merged.count(), 20_000);
        assert_eq!(merged, all);
        assert_eq!(merged.summary(), all.summary());
        // And the merge really has every part: not equal to any subset.
        let mut three = LatencyHist::new();
        for v in parts[..3].iter().flatten() {
            three.record(*v);
        }
        assert_ne!(three, all);
    }

    #[test]
    fn values_past_the_initial_range_are_kept() {
        let mut h = LatencyHist::new();
        h.record(0);
        h.record(INITIAL_HIGHEST_NS * 10);
        let back = LatencyHist::from_base64(&h.to_base64()).unwrap();
        assert_eq!(back.count(), 2);
        assert!(back.summary().max_us >= (INITIAL_HIGHEST_NS * 10) as f64 / 1000.0 * 0.999);
        assert!(LatencyHist::from_base64("%%%").is_err());
    }

    #[test]
    fn summary_of_known_values() {
        let mut h = LatencyHist::new();
        for us in 1..=1000u64 {
            h.record(us * 1000);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() <= 1.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
        assert_eq!(LatencyHist::new().summary().count, 0);
    }

    #[test]
    fn a_series_counts_each_sample_in_the_interval_of_its_scheduled_time() {
        let mut s = LatencySeries::new(1_000, 3_000_000_000, 1_000_000_000);
        s.record(1_000, 5_000_000); // at the start
        s.record(999_999_999 + 1_000, 1_000_000); // the first interval's last nanosecond
        s.record(1_000_000_000 + 1_000, 2_000_000); // the second's first
        s.record(0, 3_000_000); // before the start: the first interval
        s.record(10_000_000_000, 4_000_000); // past the end: the last
        let v = s.summary();
        assert_eq!(v.iter().map(|i| i.count).collect::<Vec<_>>(), [3, 1, 1]);
        assert_eq!(
            v.iter().map(|i| i.start_secs).collect::<Vec<_>>(),
            [0.0, 1.0, 2.0]
        );
        assert!((v[0].max_us - 5000.0).abs() <= 50.0, "{v:?}");
        assert!((v[2].p50_us - 4000.0).abs() <= 40.0, "{v:?}");
        // A series that was never started has no intervals and merges as nothing.
        let idle = LatencySeries::default();
        assert!(idle.summary().is_empty());
        let mut copy = s.clone();
        copy.merge(&idle);
        assert_eq!(copy, s);
        // What was recorded before the start is in it once started.
        let mut late = LatencySeries::default();
        late.record(1_000, 5_000_000);
        late.start(1_000, 3_000_000_000, 1_000_000_000);
        late.record(1_000_000_000 + 1_000, 2_000_000);
        let counts: Vec<u64> = late.summary().iter().map(|i| i.count).collect();
        assert_eq!(counts, [1, 1, 0]);
    }

    #[test]
    fn series_merged_across_workers_equal_the_series_of_all_samples() {
        let run = 4_000_000_000;
        let mut all = LatencySeries::new(0, run, 500_000_000);
        let mut merged = LatencySeries::default();
        for seed in 1..=3u64 {
            let mut part = LatencySeries::new(0, run, 500_000_000);
            for (i, v) in samples(seed * 104_729, 2_000).into_iter().enumerate() {
                let at = (i as u64 * 1_999_999 * seed) % run;
                part.record(at, v);
                all.record(at, v);
            }
            // Shipped between processes as JSON, like a worker's result.
            let wire = serde_json::to_string(&part).unwrap();
            merged.merge(&serde_json::from_str(&wire).unwrap());
        }
        assert_eq!(merged.summary(), all.summary());
        assert_eq!(merged.summary().iter().map(|i| i.count).sum::<u64>(), 6_000);
        assert_eq!(merged.summary().len(), 8);
    }

    #[test]
    fn a_long_run_gets_wider_intervals() {
        // An hour in 100 ms intervals would be 36000 of them.
        let s = LatencySeries::new(0, 3_600_000_000_000, 100_000_000);
        assert!(s.summary().len() as u64 <= MAX_INTERVALS);
        assert_eq!(
            s.interval_ns() % 100_000_000,
            0,
            "a multiple of the width asked for"
        );
        assert_eq!(s.interval_ns(), 12_000_000_000);
        // A short one keeps the width asked for.
        assert_eq!(
            LatencySeries::new(0, 10_000_000_000, 100_000_000).interval_ns(),
            100_000_000
        );
    }
}
