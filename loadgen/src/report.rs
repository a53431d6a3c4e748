//! Results: what one worker measured ([`WorkerResult`], merged across threads and
//! processes), and the final [`Report`] with derived figures, printed for a person and
//! written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{CheckSummary, SeqSummary};
use crate::hist::{IntervalSummary, LatencyHist, LatencySeries, LatencySummary};
use crate::sysmem::MemSample;

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, y) => x.or(y),
    }
}

/// Connection figures of a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnStats {
    pub attempted: u64,
    pub established: u64,
    /// Attempts that failed before `auth_ok`, by reason.
    pub failed: BTreeMap<String, u64>,
    /// Open sessions ended by the server or the network, by reason.
    pub dropped: BTreeMap<String, u64>,
    /// Open sessions we closed at the end.
    pub closed: u64,
    /// CLOCK_MONOTONIC ns of the first scheduled attempt and the last `auth_ok`.
    pub first_attempt_ns: Option<u64>,
    pub last_established_ns: Option<u64>,
    /// Connect latency: scheduled attempt to `auth_ok`.
    pub connect_latency: LatencyHist,
}

impl ConnStats {
    pub fn merge(&mut self, o: &ConnStats) {
        self.attempted += o.attempted;
        self.established += o.established;
        add_counts(&mut self.failed, &o.failed);
        add_counts(&mut self.dropped, &o.dropped);
        self.closed += o.closed;
        self.first_attempt_ns = min_opt(self.first_attempt_ns, o.first_attempt_ns);
        self.last_established_ns = max_opt(self.last_established_ns, o.last_established_ns);
        self.connect_latency.merge(&o.connect_latency);
    }
}

/// Message figures of a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MsgStats {
    /// Ticks of the open-loop schedule.
    pub scheduled: u64,
    /// Messages written to a socket.
    pub sent: u64,
    /// Scheduled but not sent, by reason (e.g. the sender's session was not open).
    pub not_sent: BTreeMap<String, u64>,
    /// `send_ok` frames.
    pub acked: u64,
    /// `send_ok` frames with `dup: true` (a fresh id never should get one).
    pub dup_acks: u64,
    /// `error` frames, by code.
    pub errors: BTreeMap<String, u64>,
    /// Sent, and neither acknowledged nor refused by the end of the drain.
    pub unacked: u64,
    /// Server frames that did not decode, by reason.
    pub bad_frames: BTreeMap<String, u64>,
    /// `msg` frames received, every copy counted.
    pub deliveries: u64,
    /// Deliveries of the scenario's messages to their recipients (fanout: to members;
    /// chat: to the peer), distinct.
    pub deliveries_unique: u64,
    /// Latency from the scheduled send to the `msg` at the recipient.
    pub e2e_latency: LatencyHist,
    /// Latency from the scheduled send to its `send_ok`.
    pub send_ok_latency: LatencyHist,
    /// How late the load generator wrote each message after its scheduled time.
    pub send_lag: LatencyHist,
    /// `e2e_latency` per interval of the run (by scheduled send time).
    pub e2e_series: LatencySeries,
}

impl MsgStats {
    /// Starts the latency series of a run that begins at `t0_ns` (CLOCK_MONOTONIC) and
    /// lasts `run`, in intervals of `interval`.
    pub fn start_series(&mut self, t0_ns: u64, run: Duration, interval: Duration) {
        self.e2e_series
            .start(t0_ns, run.as_nanos() as u64, interval.as_nanos() as u64);
    }

    pub fn merge(&mut self, o: &MsgStats) {
        self.scheduled += o.scheduled;
        self.sent += o.sent;
        add_counts(&mut self.not_sent, &o.not_sent);
        self.acked += o.acked;
        self.dup_acks += o.dup_acks;
        add_counts(&mut self.errors, &o.errors);
        self.unacked += o.unacked;
        add_counts(&mut self.bad_frames, &o.bad_frames);
        self.deliveries += o.deliveries;
        self.deliveries_unique += o.deliveries_unique;
        self.e2e_latency.merge(&o.e2e_latency);
        self.send_ok_latency.merge(&o.send_ok_latency);
        self.send_lag.merge(&o.send_lag);
        self.e2e_series.merge(&o.e2e_series);
    }
}

/// Everything one worker (or a merge of workers) measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerResult {
    /// How many workers this result merges.
    pub workers: u64,
    pub conns: ConnStats,
    pub msgs: MsgStats,
    /// Loss / duplicate / order of the messages at their recipients.
    pub delivery_check: CheckSummary,
    /// The same for the sender's own copy (the inbox holds sent messages too).
    pub echo_check: CheckSummary,
    /// Server `seq` numbering on each connection.
    pub inbox_seq: SeqSummary,
    /// The run phase, CLOCK_MONOTONIC ns: earliest start, latest end.
    pub run_start_ns: Option<u64>,
    pub run_end_ns: Option<u64>,
    /// Growth of the load generator's resident memory from its start to every session
    /// up (worker runtimes included), summed over processes (KiB).
    pub loadgen_rss_kib: u64,
}

impl WorkerResult {
    pub fn merge(&mut self, o: &WorkerResult) {
        self.workers += o.workers;
        self.conns.merge(&o.conns);
        self.msgs.merge(&o.msgs);
        self.delivery_check.add(&o.delivery_check);
        self.echo_check.add(&o.echo_check);
        self.inbox_seq.add(&o.inbox_seq);
        self.run_start_ns = min_opt(self.run_start_ns, o.run_start_ns);
        self.run_end_ns = max_opt(self.run_end_ns, o.run_end_ns);
        self.loadgen_rss_kib += o.loadgen_rss_kib;
    }

    pub fn merged<'a>(parts: impl IntoIterator<Item = &'a WorkerResult>) -> WorkerResult {
        let mut m = WorkerResult::default();
        for p in parts {
            m.merge(p);
        }
        m
    }
}

/// The server's memory before and after the sessions were opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemReport {
    /// The server's processes; their RSS is summed.
    pub server_pids: Vec<u32>,
    pub connections: u64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// (after - before) / connections.
    pub rss_per_conn_bytes: f64,
    /// Kernel TCP buffer memory of the whole host (`/proc/net/sockstat` TCP mem pages
    /// x page size): both ends of every loopback connection are in it.
    pub tcp_mem_before_bytes: u64,
    pub tcp_mem_after_bytes: u64,
    pub tcp_mem_per_conn_bytes: f64,
    /// Kernel slab memory of the whole host (`Slab:` of /proc/meminfo): socket
    /// structures of both ends of every loopback connection, and anything else the
    /// host allocated meanwhile, so an upper bound of the kernel's cost.
    pub kernel_slab_before_bytes: u64,
    pub kernel_slab_after_bytes: u64,
    pub kernel_slab_per_conn_bytes: f64,
    /// The load generator's own memory growth per connection (all its processes,
    /// runtimes and buffers included, so an upper bound).
    pub loadgen_rss_per_conn_bytes: f64,
}

impl MemReport {
    pub fn new(
        pids: &[u32],
        before: MemSample,
        after: MemSample,
        conns: u64,
        loadgen_rss_kib: u64,
    ) -> MemReport {
        let per = |b: u64, a: u64| {
            if conns == 0 {
                0.0
            } else {
                (a as f64 - b as f64) / conns as f64
            }
        };
        MemReport {
            server_pids: pids.to_vec(),
            connections: conns,
            rss_before_bytes: before.rss_bytes,
            rss_after_bytes: after.rss_bytes,
            rss_per_conn_bytes: per(before.rss_bytes, after.rss_bytes),
            tcp_mem_before_bytes: before.tcp_mem_bytes,
            tcp_mem_after_bytes: after.tcp_mem_bytes,
            tcp_mem_per_conn_bytes: per(before.tcp_mem_bytes, after.tcp_mem_bytes),
            kernel_slab_before_bytes: before.slab_bytes,
            kernel_slab_after_bytes: after.slab_bytes,
            kernel_slab_per_conn_bytes: per(before.slab_bytes, after.slab_bytes),
            loadgen_rss_per_conn_bytes: per(0, loadgen_rss_kib * 1024),
        }
    }
}

/// Connection figures of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnReport {
    pub attempted: u64,
    pub established: u64,
    pub failed_total: u64,
    pub failed: BTreeMap<String, u64>,
    pub dropped_total: u64,
    pub dropped: BTreeMap<String, u64>,
    /// From the first scheduled attempt to the last `auth_ok`.
    pub ramp_secs: f64,
    /// established / ramp_secs.
    pub connect_rate_per_sec: f64,
    pub connect_latency: LatencySummary,
}

/// Message figures of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MsgReport {
    pub target_rate_per_sec: f64,
    pub scheduled: u64,
    pub sent: u64,
    pub not_sent: BTreeMap<String, u64>,
    pub acked: u64,
    pub acked_per_sec: f64,
    pub errors_total: u64,
    pub errors: BTreeMap<String, u64>,
    pub unacked: u64,
    pub dup_acks: u64,
    pub bad_frames: BTreeMap<String, u64>,
    pub deliveries: u64,
    pub deliveries_unique: u64,
    /// Deliveries expected from the acknowledged messages (fanout: acked x members).
    pub deliveries_expected: u64,
    pub deliveries_per_sec: f64,
    pub e2e_latency: LatencySummary,
    pub send_ok_latency: LatencySummary,
    pub send_lag: LatencySummary,
    /// Width of the intervals of `e2e_over_time` (seconds).
    pub interval_secs: f64,
    /// End-to-end latency per interval of the run, by scheduled send time.
    pub e2e_over_time: Vec<IntervalSummary>,
}

/// Integrity figures of the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrityReport {
    pub delivery: CheckSummary,
    pub echo: CheckSummary,
    pub inbox_seq: SeqSummary,
    /// Fanout only: acknowledged deliveries that never arrived, counted from totals
    /// (exact when nothing was left unacknowledged).
    pub missing_deliveries: u64,
    pub violations: u64,
}

/// The final report of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub run_id: String,
    pub url: String,
    pub encoding: String,
    pub driver: String,
    pub processes: usize,
    pub threads_per_process: usize,
    pub duration_secs: f64,
    /// Measured run phase: earliest start to latest end over the workers.
    pub run_secs: f64,
    pub connections: ConnReport,
    pub server_memory: Option<MemReport>,
    pub messages: Option<MsgReport>,
    pub integrity: Option<IntegrityReport>,
    pub errors: u64,
    pub operations: u64,
    pub error_rate: f64,
    pub max_error_rate: f64,
    pub passed: bool,
    /// Every raw total, with the merged histograms (base64 HdrHistogram V2).
    pub totals: WorkerResult,
}

/// What the report needs besides the merged totals.
#[derive(Debug, Clone)]
pub struct ReportInput {
    pub scenario: String,
    pub run_id: String,
    pub url: String,
    pub encoding: String,
    pub driver: String,
    pub processes: usize,
    pub threads_per_process: usize,
    pub duration_secs: f64,
    pub max_error_rate: f64,
    /// Messages per second asked for (None: the scenario sends none).
    pub target_rate: Option<f64>,
    /// Deliveries each acknowledged message must produce (chat: 1 at the peer;
    /// fanout: members).
    pub deliveries_per_ack: u64,
    pub memory: Option<MemReport>,
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

fn rate(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

impl Report {
    pub fn build(input: ReportInput, t: WorkerResult) -> Report {
        let c = &t.conns;
        let failed_total: u64 = c.failed.values().sum();
        let dropped_total: u64 = c.dropped.values().sum();
        let ramp_secs = match (c.first_attempt_ns, c.last_established_ns) {
            (Some(a), Some(b)) if b > a => secs(b - a),
            _ => 0.0,
        };
        let run_secs = match (t.run_start_ns, t.run_end_ns) {
            (Some(a), Some(b)) if b > a => secs(b - a),
            _ => 0.0,
        };
        let connections = ConnReport {
            attempted: c.attempted,
            established: c.established,
            failed_total,
            failed: c.failed.clone(),
            dropped_total,
            dropped: c.dropped.clone(),
            ramp_secs,
            connect_rate_per_sec: rate(c.established, ramp_secs),
            connect_latency: c.connect_latency.summary(),
        };
        let m = &t.msgs;
        let errors_total: u64 = m.errors.values().sum();
        let not_sent_total: u64 = m.not_sent.values().sum();
        let bad_frames_total: u64 = m.bad_frames.values().sum();
        let deliveries_expected = t.delivery_check.acked.max(m.acked) * input.deliveries_per_ack;
        let messages = input.target_rate.map(|target| MsgReport {
            target_rate_per_sec: target,
            scheduled: m.scheduled,
            sent: m.sent,
            not_sent: m.not_sent.clone(),
            acked: m.acked,
            acked_per_sec: rate(m.acked, run_secs),
            errors_total,
            errors: m.errors.clone(),
            unacked: m.unacked,
            dup_acks: m.dup_acks,
            bad_frames: m.bad_frames.clone(),
            deliveries: m.deliveries,
            deliveries_unique: m.deliveries_unique,
            deliveries_expected,
            deliveries_per_sec: rate(m.deliveries_unique, run_secs),
            e2e_latency: m.e2e_latency.summary(),
            send_ok_latency: m.send_ok_latency.summary(),
            send_lag: m.send_lag.summary(),
            interval_secs: m.e2e_series.interval_ns() as f64 / 1e9,
            e2e_over_time: m.e2e_series.summary(),
        });
        let integrity = input.target_rate.map(|_| {
            // Fanout's receivers cannot see the publishers' acks (other processes), so
            // its loss figure comes from totals; chat's checkers see both ends.
            let missing_deliveries = if input.scenario == "fanout" {
                deliveries_expected.saturating_sub(m.deliveries_unique)
            } else {
                0
            };
            let violations = t.delivery_check.violations()
                + t.echo_check.violations()
                + t.inbox_seq.gaps
                + t.inbox_seq.repeats
                + m.dup_acks
                + missing_deliveries;
            IntegrityReport {
                delivery: t.delivery_check,
                echo: t.echo_check,
                inbox_seq: t.inbox_seq,
                missing_deliveries,
                violations,
            }
        });
        let violations = integrity.as_ref().map_or(0, |i| i.violations);
        let errors = failed_total
            + dropped_total
            + errors_total
            + not_sent_total
            + m.unacked
            + bad_frames_total
            + violations;
        let operations = c.attempted + m.scheduled;
        let error_rate = if operations == 0 {
            0.0
        } else {
            errors as f64 / operations as f64
        };
        let passed = violations == 0 && error_rate <= input.max_error_rate && c.attempted > 0;
        Report {
            scenario: input.scenario,
            run_id: input.run_id,
            url: input.url,
            encoding: input.encoding,
            driver: input.driver,
            processes: input.processes,
            threads_per_process: input.threads_per_process,
            duration_secs: input.duration_secs,
            run_secs,
            connections,
            server_memory: input.memory,
            messages,
            integrity,
            errors,
            operations,
            error_rate,
            max_error_rate: input.max_error_rate,
            passed,
            totals: t,
        }
    }

    /// The summary for a person.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let w = &mut s;
        let _ = writeln!(
            w,
            "flare-loadgen {}: {} ({}), {} process(es) x {} thread(s), {} driver, run {:.2} s",
            self.scenario,
            self.url,
            self.encoding,
            self.processes,
            self.threads_per_process,
            self.driver,
            self.run_secs
        );
        let c = &self.connections;
        let _ = writeln!(
            w,
            "connections: {}/{} established, {} failed, {} dropped; ramp {:.2} s = {:.0} conn/s",
            c.established,
            c.attempted,
            c.failed_total,
            c.dropped_total,
            c.ramp_secs,
            c.connect_rate_per_sec
        );
        let _ = writeln!(
            w,
            "  connect latency (scheduled attempt to auth_ok): {}",
            lat(&c.connect_latency)
        );
        if !c.failed.is_empty() {
            let _ = writeln!(w, "  failed: {}", counts(&c.failed));
        }
        if !c.dropped.is_empty() {
            let _ = writeln!(w, "  dropped: {}", counts(&c.dropped));
        }
        if let Some(m) = &self.server_memory {
            let _ = writeln!(
                w,
                "server memory (pid {}, {} connections): RSS {} -> {} = {:.0} B/conn; kernel TCP buffers (host, both ends) {} -> {} = {:.0} B/conn",
                m.server_pids
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join("+"),
                m.connections,
                bytes(m.rss_before_bytes),
                bytes(m.rss_after_bytes),
                m.rss_per_conn_bytes,
                bytes(m.tcp_mem_before_bytes),
                bytes(m.tcp_mem_after_bytes),
                m.tcp_mem_per_conn_bytes
            );
            let _ = writeln!(
                w,
                "  kernel slab (host, both ends): {} -> {} = {:.0} B/conn",
                bytes(m.kernel_slab_before_bytes),
                bytes(m.kernel_slab_after_bytes),
                m.kernel_slab_per_conn_bytes
            );
            let _ = writeln!(
                w,
                "  load generator RSS growth: {:.0} B/conn (upper bound: includes its runtimes)",
                m.loadgen_rss_per_conn_bytes
            );
        }
        if let Some(m) = &self.messages {
            let _ = writeln!(
                w,
                "messages: target {:.0}/s; scheduled {}, sent {}, acked {} ({:.1}/s), errors {}, unacked {}",
                m.target_rate_per_sec, m.scheduled, m.sent, m.acked, m.acked_per_sec, m.errors_total, m.unacked
            );
            if !m.errors.is_empty() {
                let _ = writeln!(w, "  errors by code: {}", counts(&m.errors));
            }
            if !m.not_sent.is_empty() {
                let _ = writeln!(w, "  not sent: {}", counts(&m.not_sent));
            }
            if !m.bad_frames.is_empty() {
                let _ = writeln!(w, "  bad server frames: {}", counts(&m.bad_frames));
            }
            let _ = writeln!(
                w,
                "  deliveries: {} distinct of {} expected ({:.1}/s), {} msg frames in all",
                m.deliveries_unique, m.deliveries_expected, m.deliveries_per_sec, m.deliveries
            );
            let _ = writeln!(
                w,
                "  end-to-end latency (scheduled send to msg): {}",
                lat(&m.e2e_latency)
            );
            for line in over_time(&m.e2e_over_time, m.interval_secs) {
                let _ = writeln!(w, "  {line}");
            }
            let _ = writeln!(
                w,
                "  send_ok latency (scheduled send to send_ok): {}",
                lat(&m.send_ok_latency)
            );
            let _ = writeln!(
                w,
                "  load generator send lag (scheduled to written): {}",
                lat(&m.send_lag)
            );
        }
        if let (true, Some(i), Some(m)) =
            (self.scenario == "fanout", &self.integrity, &self.messages)
        {
            let d = &i.delivery;
            let _ = writeln!(
                w,
                "integrity: deliveries expected {}, arrived {}, missing {}, duplicated {}, reordered {}",
                m.deliveries_expected, d.received, i.missing_deliveries, d.duplicates, d.reordered
            );
            let _ = writeln!(
                w,
                "  inbox seq: {} gaps, {} repeats",
                i.inbox_seq.gaps, i.inbox_seq.repeats
            );
        } else if let Some(i) = &self.integrity {
            let d = &i.delivery;
            let _ = writeln!(
                w,
                "integrity: acked {}, arrived {}, lost {}, duplicated {}, reordered {}, unexpected {}",
                d.acked, d.received, d.lost, d.duplicates, d.reordered, d.unexpected
            );
            if i.echo.acked > 0 || i.echo.received > 0 {
                let e = &i.echo;
                let _ = writeln!(
                    w,
                    "  sender's own copies: arrived {}, lost {}, duplicated {}, reordered {}",
                    e.received, e.lost, e.duplicates, e.reordered
                );
            }
            if i.missing_deliveries > 0 {
                let _ = writeln!(w, "  missing deliveries: {}", i.missing_deliveries);
            }
            let _ = writeln!(
                w,
                "  inbox seq: {} gaps, {} repeats",
                i.inbox_seq.gaps, i.inbox_seq.repeats
            );
        }
        let _ = writeln!(
            w,
            "result: {} (errors {} of {} operations = {:.6}, max {})",
            if self.passed { "PASS" } else { "FAIL" },
            self.errors,
            self.operations,
            self.error_rate,
            self.max_error_rate
        );
        s
    }
}

fn lat(l: &LatencySummary) -> String {
    if l.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
        us(l.p50_us),
        us(l.p90_us),
        us(l.p99_us),
        us(l.p999_us),
        us(l.max_us),
        l.count
    )
}

/// Intervals listed one by one up to this many; past it, their range and the worst.
const LISTED_INTERVALS: usize = 12;

/// The end-to-end p99 over time: every interval's for a short run, else the spread of
/// the intervals' p99 and the worst intervals.
fn over_time(intervals: &[IntervalSummary], width_secs: f64) -> Vec<String> {
    let with_samples: Vec<&IntervalSummary> = intervals.iter().filter(|i| i.count > 0).collect();
    if intervals.len() < 2 || with_samples.is_empty() {
        return Vec::new();
    }
    let head = format!("end-to-end p99 over time ({width_secs} s intervals, by scheduled send)");
    let mut worst = with_samples.clone();
    worst.sort_by(|a, b| b.p99_us.total_cmp(&a.p99_us));
    let at = |i: &IntervalSummary| {
        format!(
            "{:.1} s: p50 {} p99 {} max {} (n={})",
            i.start_secs,
            us(i.p50_us),
            us(i.p99_us),
            us(i.max_us),
            i.count
        )
    };
    if intervals.len() <= LISTED_INTERVALS {
        let each: Vec<String> = intervals
            .iter()
            .map(|i| {
                if i.count == 0 {
                    "-".into()
                } else {
                    us(i.p99_us)
                }
            })
            .collect();
        return vec![
            format!("{head}: {}", each.join(" ")),
            format!("  worst interval at {}", at(worst[0])),
        ];
    }
    let median = worst[worst.len() / 2].p99_us;
    let mut lines = vec![format!(
        "{head}: {} intervals, p99 from {} to {}, median {}; worst:",
        intervals.len(),
        us(worst[worst.len() - 1].p99_us),
        us(worst[0].p99_us),
        us(median)
    )];
    lines.extend(worst.iter().take(3).map(|i| format!("  at {}", at(i))));
    lines
}

fn us(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.2}s", v / 1e6)
    } else if v >= 1000.0 {
        format!("{:.2}ms", v / 1e3)
    } else {
        format!("{v:.0}us")
    }
}

fn bytes(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1} KiB", b as f64 / 1024.0)
    } else {
        format!("{b} B")
    }
}

fn counts(m: &BTreeMap<String, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64) -> WorkerResult {
        let mut r = WorkerResult {
            workers: 1,
            ..Default::default()
        };
        r.conns.attempted = 10 + seed;
        r.conns.established = 9 + seed;
        r.conns.failed.insert("refused".into(), 1);
        r.conns.first_attempt_ns = Some(1000 + seed);
        r.conns.last_established_ns = Some(5000 + seed);
        r.msgs.scheduled = 100;
        r.msgs.sent = 100;
        r.msgs.acked = 99;
        r.msgs.errors.insert("rate_limited".into(), 1);
        r.msgs
            .start_series(0, Duration::from_secs(2), Duration::from_secs(1));
        for i in 0..100 {
            r.msgs.e2e_latency.record(1000 * (i + seed));
            r.msgs.e2e_series.record(i * 20_000_000, 1000 * (i + seed));
            r.conns.connect_latency.record(50_000 + i);
        }
        r.delivery_check.acked = 99;
        r.delivery_check.received = 99;
        r.run_start_ns = Some(10_000 + seed);
        r.run_end_ns = Some(2_000_000_000 + seed);
        r
    }

    #[test]
    fn worker_result_json_round_trip() {
        let r = sample(3);
        let json = serde_json::to_string(&r).unwrap();
        let back: WorkerResult = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn merge_adds_counts_and_keeps_time_extremes() {
        let m = WorkerResult::merged([&sample(0), &sample(5)]);
        assert_eq!(m.workers, 2);
        assert_eq!(m.conns.attempted, 25);
        assert_eq!(m.conns.failed["refused"], 2);
        assert_eq!(m.conns.first_attempt_ns, Some(1000));
        assert_eq!(m.conns.last_established_ns, Some(5005));
        assert_eq!(m.msgs.e2e_latency.count(), 200);
        let per_second: Vec<u64> = m
            .msgs
            .e2e_series
            .summary()
            .iter()
            .map(|i| i.count)
            .collect();
        assert_eq!(per_second, [100, 100]);
        assert_eq!(m.msgs.errors["rate_limited"], 2);
        assert_eq!(m.run_start_ns, Some(10_000));
        assert_eq!(m.run_end_ns, Some(2_000_000_005));
    }

    fn input(max_error_rate: f64) -> ReportInput {
        ReportInput {
            scenario: "chat".into(),
            run_id: "r".into(),
            url: "ws://x/ws".into(),
            encoding: "json".into(),
            driver: "io_uring".into(),
            processes: 1,
            threads_per_process: 1,
            duration_secs: 2.0,
            max_error_rate,
            target_rate: Some(50.0),
            deliveries_per_ack: 1,
            memory: None,
        }
    }

    #[test]
    fn report_derives_rates_and_judges_error_rate() {
        let r = Report::build(input(0.0), sample(0));
        assert_eq!(r.connections.failed_total, 1);
        assert!((r.run_secs - 1.99999).abs() < 0.001);
        // 1 refused + 1 error frame = 2 errors of 10 + 100 operations.
        assert_eq!((r.errors, r.operations), (2, 110));
        assert!(!r.passed);
        let r = Report::build(input(0.05), sample(0));
        assert!(r.passed, "{}", r.human());
        let json = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        assert!(r.human().contains("PASS"));
    }

    #[test]
    fn any_integrity_violation_fails_whatever_the_error_rate() {
        let mut s = sample(0);
        s.delivery_check.lost = 1;
        let r = Report::build(input(1.0), s);
        assert!(!r.passed);
        assert_eq!(r.integrity.unwrap().violations, 1);
    }

    fn interval(start_secs: f64, p99_ms: f64) -> IntervalSummary {
        IntervalSummary {
            start_secs,
            count: 10,
            p50_us: 100.0,
            p99_us: p99_ms * 1000.0,
            max_us: p99_ms * 2000.0,
        }
    }

    #[test]
    fn latency_over_time_lists_a_short_run_and_sums_up_a_long_one() {
        assert!(
            over_time(&[interval(0.0, 1.0)], 1.0).is_empty(),
            "one interval says nothing new"
        );
        let mut short = vec![interval(0.0, 1.0), interval(1.0, 7.5), interval(2.0, 2.0)];
        short[2].count = 0;
        assert_eq!(
            over_time(&short, 1.0),
            [
                "end-to-end p99 over time (1 s intervals, by scheduled send): 1.00ms 7.50ms -",
                "  worst interval at 1.0 s: p50 100us p99 7.50ms max 15.00ms (n=10)",
            ]
        );
        let long: Vec<IntervalSummary> = (0..30)
            .map(|i| interval(f64::from(i) / 10.0, 1.0 + f64::from(i % 7)))
            .collect();
        let lines = over_time(&long, 0.1);
        assert_eq!(
            lines[0],
            "end-to-end p99 over time (0.1 s intervals, by scheduled send): 30 intervals, p99 from 1.00ms to 7.00ms, median 4.00ms; worst:"
        );
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert!(
            lines[1..].iter().all(|l| l.contains("p99 7.00ms")),
            "{lines:?}"
        );
    }
}
