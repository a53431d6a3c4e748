//! Harness of the real runs: a real `flare serve` on free loopback ports with a fresh
//! data dir, and `flare-loadgen` run against it with a bounded wait.
//!
//! The `flare` binary comes from `FLARE_BIN`, else from the directory of this crate's
//! own binary (`target/<profile>/flare`): build it first with
//! `cargo build -p flare-gateway`.
#![allow(dead_code)]

pub mod room;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flare_loadgen::report::Report;

pub const SECRET: &str = "loadgen-test-secret-3f9a";
pub const ADMIN_TOKEN: &str = "loadgen-test-admin-71be";

/// Generous bounds: the machine is small and shared.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One real run at a time: each starts a server and load on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn loadgen_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flare-loadgen"))
}

pub fn flare_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLARE_BIN") {
        return PathBuf::from(p);
    }
    let p = loadgen_bin()
        .parent()
        .expect("the binary has a directory")
        .join("flare");
    assert!(
        p.exists(),
        "the real-run tests need the flare binary at {} (or FLARE_BIN): \
         run `cargo build -p flare-gateway` first",
        p.display()
    );
    p
}

pub fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr")
}

/// `flare serve` on free ports; killed on drop.
pub struct Server {
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    child: Option<Child>,
    _data: tempfile::TempDir,
    log_dir: tempfile::TempDir,
}

impl Server {
    pub fn start() -> Server {
        for attempt in 1..=3 {
            let ws = free_port();
            let admin = free_port();
            let data = tempfile::tempdir().expect("tempdir");
            let log_dir = tempfile::tempdir().expect("tempdir");
            let log = File::create(log_dir.path().join("flare.log")).expect("log file");
            let mut cmd = Command::new(flare_bin());
            for (k, _) in std::env::vars() {
                if k.starts_with("FLARE_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("serve")
                .args(["--ws", &ws.to_string()])
                .args(["--admin", &admin.to_string()])
                .args(["--quic", &free_port().to_string()])
                .arg("--data")
                .arg(data.path())
                .args(["--shards", "2"])
                .args(["--jwt-secret", SECRET])
                .args(["--admin-token", ADMIN_TOKEN])
                // The per-connection send limit is the server's policy, not what these
                // tests check; catch-up bursts on a noisy machine must not trip it.
                .args(["--sends-per-sec", "100000"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log"))
                .stderr(log);
            let child = cmd.spawn().expect("spawn flare serve");
            let mut s = Server {
                ws,
                admin,
                child: Some(child),
                _data: data,
                log_dir,
            };
            match s.wait_ready() {
                Ok(()) => return s,
                Err(exited) if exited && attempt < 3 && s.log().contains("in use") => continue,
                Err(_) => panic!("flare serve did not become ready:\n{}", s.log()),
            }
        }
        unreachable!("three attempts either return or panic")
    }

    fn wait_ready(&mut self) -> Result<(), bool> {
        let deadline = Instant::now() + READY_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(true);
            }
            if http_status(self.admin, "/readyz") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(false)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.ws)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log_dir.path().join("flare.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// What one loadgen run gave.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub report: Option<Report>,
}

impl Run {
    /// The report, or a failure that shows everything the run printed.
    pub fn report(&self, server: Option<&Server>) -> &Report {
        match &self.report {
            Some(r) => r,
            None => panic!(
                "no JSON report (exit {}):\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
                self.code,
                self.stdout,
                self.stderr,
                server.map(|s| s.log()).unwrap_or_default()
            ),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `flare-loadgen args... --json <tmp>` (bounded) and reads its report.
pub fn loadgen(args: &[&str]) -> Run {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("report.json");
    let mut cmd = Command::new(loadgen_bin());
    cmd.args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .env_remove("FLARE_JWT_SECRET")
        .env_remove("FLARE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn flare-loadgen");
    let out = wait_bounded(child, RUN_TIMEOUT);
    let report = std::fs::read_to_string(&json)
        .ok()
        .map(|s| serde_json::from_str::<Report>(&s).expect("the JSON report parses as a Report"));
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    }
}

fn wait_bounded(mut child: Child, limit: Duration) -> Output {
    // Read both pipes on threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = t_err.join().unwrap_or_default();
            panic!(
                "flare-loadgen did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}
