//! The parent process of a run: checks the options, prepares the server side
//! (fanout's group), starts the workers, walks them through the phases, samples the
//! server's memory, and builds the report.

use std::sync::Arc;
use std::time::Duration;

use crate::cli::{Cli, Scenario, TargetKind};
use crate::clock::{mono_ns, unix_secs};
use crate::conn::Target;
use crate::report::{MemReport, Report, ReportInput};
use crate::runner::{child_main, Fleet, ProgressLine, RunConfig};
use crate::{admin, cli, sysmem};

/// Open files a process keeps for itself (stdio, runtime, timers, pipes).
const RESERVED_FDS: u64 = 64;

const TICK: Duration = Duration::from_millis(100);

/// Lead time between *go* and the start of the run, so every worker starts together.
const GO_LEAD_NS: u64 = 200_000_000;

/// Exit statuses.
pub const EXIT_PASS: i32 = 0;
pub const EXIT_FAIL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

/// Raises the soft open-file limit to the hard one; returns the soft limit in force.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Connections the run opens at once at most (what must fit in the file limit).
fn connections_held(s: &Scenario) -> u64 {
    match s {
        Scenario::Connect(a) => a.conns as u64,
        Scenario::Chat(a) => 2 * a.pairs as u64,
        Scenario::Fanout(a) => a.members as u64,
        Scenario::Churn(a) => {
            // rate x (lifetime + a connect timeout's worth of slow setups), roughly.
            (a.rate * (a.lifetime.as_secs_f64() + 1.0)).ceil() as u64
        }
    }
}

fn valid_id_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@:-".contains(&b))
}

/// Builds the run's configuration from the command line.
pub fn config(cli: &Cli) -> Result<RunConfig, String> {
    let c = &cli.common;
    let url = cli::parse_ws_url(&c.url)?;
    let secret = match c.target {
        TargetKind::Flare => c.jwt_secret.clone().ok_or(
            "--jwt-secret (or FLARE_JWT_SECRET) is required: tokens are minted with the gateway's secret",
        )?,
        TargetKind::RawWs => {
            if c.encoding != crate::proto::Encoding::Json {
                return Err("--encoding applies to --target flare only: raw-ws messages are text".into());
            }
            String::new()
        }
    };
    if c.processes == 0 {
        return Err("--processes must be at least 1".into());
    }
    let threads = c.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    if threads == 0 {
        return Err("--threads must be at least 1".into());
    }
    if !valid_id_part(&c.user_prefix) {
        return Err("--user-prefix: 1..=40 bytes of [A-Za-z0-9_.@:-]".into());
    }
    if c.max_error_rate.is_nan() || c.max_error_rate < 0.0 {
        return Err("--max-error-rate must be a number >= 0".into());
    }
    match &cli.scenario {
        Scenario::Chat(a) => {
            if a.rate <= 0.0 || a.pairs == 0 {
                return Err("chat needs --pairs >= 1 and --rate > 0".into());
            }
        }
        Scenario::Fanout(a) => {
            if a.rate <= 0.0 || a.members == 0 || a.publishers == 0 {
                return Err("fanout needs --members >= 1, --publishers >= 1 and --rate > 0".into());
            }
            if a.publishers > a.members {
                return Err("fanout: --publishers cannot exceed --members".into());
            }
            if let Some(url) = &a.publish_url {
                if c.target != TargetKind::RawWs {
                    return Err(
                        "--publish-url is for --target raw-ws: Flare's messages go over the WebSocket"
                            .into(),
                    );
                }
                cli::parse_http_url(url).map_err(|e| format!("--publish-url: {e}"))?;
            }
        }
        Scenario::Churn(a) => {
            if a.rate <= 0.0 {
                return Err("churn needs --rate > 0".into());
            }
        }
        Scenario::Connect(_) => {}
    }
    let run_id = match &c.run_id {
        Some(r) => r.clone(),
        None => format!("{:08x}", (crate::conn::rand_u64() >> 32) as u32),
    };
    let run_secs = c.duration.as_secs() + c.drain_timeout.as_secs() + c.connect_timeout.as_secs();
    Ok(RunConfig {
        common: c.clone(),
        scenario: cli.scenario.clone(),
        target: Target {
            kind: c.target,
            addr: url.addr,
            host: url.host,
            path: url.path,
            encoding: c.encoding,
            connect_timeout: c.connect_timeout,
        },
        secret: secret.into_bytes(),
        run_id,
        threads,
        processes: c.processes,
        // Valid for the whole run and its ramp, with a day to spare.
        token_exp: unix_secs() + run_secs + 86_400,
    })
}

/// Runs the command line to an exit status.
pub fn main_with(cli: Cli) -> i32 {
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("flare-loadgen: {e}");
            return EXIT_USAGE;
        }
    };
    let nofile = raise_nofile();
    if let Some(p) = cli.common.worker_process {
        return match child_main(Arc::new(cfg), p) {
            Ok(()) => EXIT_PASS,
            Err(e) => {
                eprintln!("flare-loadgen worker process {p}: {e}");
                EXIT_FAIL
            }
        };
    }
    let per_process = connections_held(&cfg.scenario).div_ceil(cfg.processes as u64);
    if per_process + RESERVED_FDS > nofile {
        eprintln!(
            "flare-loadgen: {per_process} connections per process do not fit the open-file limit \
             ({nofile}); use --processes {} or more",
            connections_held(&cfg.scenario).div_ceil(nofile.saturating_sub(RESERVED_FDS).max(1))
        );
        return EXIT_USAGE;
    }
    match coordinate(Arc::new(cfg)) {
        Ok(report) => {
            print!("{}", report.human());
            if let Some(path) = &cli.common.json {
                let json = serde_json::to_string_pretty(&report).expect("a report serializes");
                if let Err(e) = std::fs::write(path, json + "\n") {
                    eprintln!("flare-loadgen: cannot write {}: {e}", path.display());
                    return EXIT_USAGE;
                }
            }
            if report.passed {
                EXIT_PASS
            } else {
                EXIT_FAIL
            }
        }
        Err(e) => {
            eprintln!("flare-loadgen: {e}");
            EXIT_USAGE
        }
    }
}

fn coordinate(cfg: Arc<RunConfig>) -> Result<Report, String> {
    let c = &cfg.common;
    let mut deliveries_per_ack = 1;
    let mut target_rate = None;
    match &cfg.scenario {
        Scenario::Fanout(a) if c.target == TargetKind::RawWs => {
            // The room is the group: nothing to create.
            deliveries_per_ack = a.members as u64;
            target_rate = Some(a.rate);
        }
        Scenario::Fanout(a) => {
            let token = a
                .admin_token
                .as_deref()
                .ok_or("fanout needs --admin-token (or FLARE_ADMIN_TOKEN) to create its group")?;
            let (addr, host) = cli::parse_http_base(&a.admin)?;
            let group = crate::scenario::group_name(&cfg);
            let members = crate::scenario::member_ids(&cfg, a.members);
            admin::put_group(addr, &host, token, &group, &members)?;
            deliveries_per_ack = a.members as u64;
            target_rate = Some(a.rate);
        }
        Scenario::Chat(a) => target_rate = Some(a.rate),
        Scenario::Connect(_) | Scenario::Churn(_) => {}
    }
    // Churn holds no set of sessions to weigh: its memory figure would mean nothing.
    let server_pids: &[u32] = if matches!(cfg.scenario, Scenario::Churn(_)) {
        if !c.server_pid.is_empty() {
            eprintln!(
                "flare-loadgen: --server-pid is ignored by churn (it holds no set of sessions)"
            );
        }
        &[]
    } else {
        &c.server_pid
    };
    let mem_before = if server_pids.is_empty() {
        None
    } else {
        Some(sysmem::sample(server_pids).map_err(|e| format!("--server-pid: {e}"))?)
    };
    let workers = cfg.workers() as u64;
    let mut line = ProgressLine::new(c.quiet);
    let mut fleet = Fleet::start(cfg.clone())?;
    let result = phases(&cfg, server_pids, &mut fleet, &mut line, workers);
    line.clear();
    let mem_after = match result {
        Ok(m) => m,
        Err(e) => {
            fleet.abort();
            return Err(e);
        }
    };
    let totals = fleet.finish()?;
    let memory = match (mem_before, mem_after) {
        (Some(b), Some(a)) => Some(MemReport::new(
            server_pids,
            b,
            a,
            totals.conns.established,
            totals.loadgen_rss_kib,
        )),
        _ => None,
    };
    let driver = if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
    };
    Ok(Report::build(
        ReportInput {
            scenario: cfg.scenario.name().into(),
            run_id: cfg.run_id.clone(),
            url: c.url.clone(),
            encoding: match c.target {
                TargetKind::Flare => c.encoding.as_str().into(),
                TargetKind::RawWs => "raw-ws".into(),
            },
            driver: driver.into(),
            processes: cfg.processes,
            threads_per_process: cfg.threads,
            duration_secs: c.duration.as_secs_f64(),
            max_error_rate: c.max_error_rate,
            target_rate,
            deliveries_per_ack,
            memory,
        },
        totals,
    ))
}

/// Walks the workers through the phases; returns the memory sample taken when every
/// session was up (with --server-pid).
fn phases(
    cfg: &RunConfig,
    server_pids: &[u32],
    fleet: &mut Fleet,
    line: &mut ProgressLine,
    workers: u64,
) -> Result<Option<sysmem::MemSample>, String> {
    let c = &cfg.common;
    loop {
        let s = fleet.snapshot()?;
        line.show("connecting", &s);
        if s.ready >= workers {
            break;
        }
        std::thread::sleep(TICK);
    }
    let mem_after = if server_pids.is_empty() {
        None
    } else {
        let until = mono_ns() + c.settle.as_nanos() as u64;
        while mono_ns() < until {
            let s = fleet.snapshot()?;
            line.show("settling", &s);
            std::thread::sleep(TICK);
        }
        Some(sysmem::sample(server_pids).map_err(|e| format!("--server-pid: {e}"))?)
    };
    let t0 = mono_ns() + GO_LEAD_NS;
    fleet.go(t0);
    let run_end = t0 + c.duration.as_nanos() as u64;
    loop {
        let s = fleet.snapshot()?;
        line.show(
            if mono_ns() < run_end {
                "running"
            } else {
                "draining"
            },
            &s,
        );
        if s.run_done >= workers {
            break;
        }
        std::thread::sleep(TICK);
    }
    if let Scenario::Fanout(a) = &cfg.scenario {
        // Deliveries can only be judged with every worker's acks in hand.
        let deadline = mono_ns().max(run_end) + c.drain_timeout.as_nanos() as u64;
        loop {
            let s = fleet.snapshot()?;
            line.show("draining", &s);
            if s.deliveries_unique >= s.acked * a.members as u64 || mono_ns() >= deadline {
                break;
            }
            std::thread::sleep(TICK);
        }
    }
    // Workers now close their sessions; `finish` waits for them (each bounds its wait).
    fleet.stop();
    Ok(mem_after)
}
