//! Host checks for holding many connections. Reading is all this crate does on its
//! own; raising this process's soft open-file limit is the one change it makes,
//! and only for the process that asks (`flare serve` does at start).

use std::fmt::Write;
use std::io;

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a valid local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// One checked setting.
#[derive(Debug, Clone)]
pub struct Finding {
    pub name: &'static str,
    pub value: String,
    pub advice: Option<String>,
}

/// What `flare tune check` prints.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn report(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            let _ = writeln!(out, "{:<40} {}", f.name, f.value);
            if let Some(a) = &f.advice {
                let _ = writeln!(out, "  -> {a}");
            }
        }
        let n = self.findings.iter().filter(|f| f.advice.is_some()).count();
        let _ = writeln!(out, "{n} setting(s) to look at");
        out
    }
}

fn read_sys(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Reads the limits that cap connections on this host.
pub fn check() -> Report {
    let mut r = Report::default();
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes a valid local rlimit.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        r.findings.push(Finding {
            name: "RLIMIT_NOFILE (soft/hard)",
            value: format!("{}/{}", lim.rlim_cur, lim.rlim_max),
            advice: (lim.rlim_max < 1_048_576).then(|| {
                format!(
                    "one process holds at most ~{} connections; raise the hard limit (LimitNOFILE=, limits.conf) or run several processes",
                    lim.rlim_max.saturating_sub(64)
                )
            }),
        });
    }
    let num = |s: &Option<String>| {
        s.as_deref()
            .and_then(|v| v.split(' ').next()?.parse::<u64>().ok())
    };
    let file_max = read_sys("/proc/sys/fs/file-max");
    r.findings.push(Finding {
        name: "fs.file-max",
        advice: num(&file_max)
            .filter(|v| *v < 2_000_000)
            .map(|_| "sysctl -w fs.file-max=4000000".into()),
        value: file_max.unwrap_or_else(|| "unreadable".into()),
    });
    let somaxconn = read_sys("/proc/sys/net/core/somaxconn");
    r.findings.push(Finding {
        name: "net.core.somaxconn",
        advice: num(&somaxconn)
            .filter(|v| *v < 4096)
            .map(|_| "sysctl -w net.core.somaxconn=65535 (accept backlog)".into()),
        value: somaxconn.unwrap_or_else(|| "unreadable".into()),
    });
    let ports = read_sys("/proc/sys/net/ipv4/ip_local_port_range");
    r.findings.push(Finding {
        name: "net.ipv4.ip_local_port_range",
        advice: None,
        value: format!(
            "{} (limits outgoing connections per source address: matters for load generators)",
            ports.unwrap_or_else(|| "unreadable".into())
        ),
    });
    let tcp_mem = read_sys("/proc/sys/net/ipv4/tcp_mem");
    r.findings.push(Finding {
        name: "net.ipv4.tcp_mem (pages)",
        advice: None,
        value: tcp_mem.unwrap_or_else(|| "unreadable".into()),
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit() {
        let soft = raise_nofile_limit().unwrap();
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(soft, lim.rlim_cur);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
    }

    #[test]
    fn check_reports_the_file_limit() {
        let r = check();
        assert!(r
            .findings
            .iter()
            .any(|f| f.name.starts_with("RLIMIT_NOFILE")));
        assert!(r.report().contains("setting(s) to look at"));
    }
}
