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

#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHist(Histogram<u64>);

impl Default for LatencyHist {
    fn default() -> Self {
        LatencyHist::new()
    }
}

impl LatencyHist {
    pub fn new() -> LatencyHist {
        let mut h = Histogram::new_with_bounds(1, INITIAL_HIGHEST_NS, SIGNIFICANT_DIGITS)
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
}
