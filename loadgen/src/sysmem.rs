//! Memory figures from /proc: a process's resident set (`VmRSS` of
//! `/proc/PID/status`), the kernel's TCP buffer memory (`mem` pages of the `TCP:`
//! line of `/proc/net/sockstat`, for the whole network namespace), and the kernel's
//! slab memory (`Slab:` of `/proc/meminfo`, host-wide), where socket structures live.

use std::io;

/// One sample of the server's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSample {
    pub rss_bytes: u64,
    pub tcp_mem_bytes: u64,
    pub slab_bytes: u64,
}

/// Samples the summed RSS of `pids` (a server of several processes, like nginx's
/// workers) and the host's kernel memory.
pub fn sample(pids: &[u32]) -> io::Result<MemSample> {
    let mut rss_kib = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| io::Error::new(e.kind(), format!("pid {pid}: {e}")))?;
        rss_kib += parse_vmrss_kib(&status).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no VmRSS in /proc/{pid}/status"),
            )
        })?;
    }
    let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
    let pages = parse_tcp_mem_pages(&sockstat).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "no TCP mem in /proc/net/sockstat",
        )
    })?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let slab_kib = parse_kib_field(&meminfo, "Slab:")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no Slab in /proc/meminfo"))?;
    Ok(MemSample {
        rss_bytes: rss_kib * 1024,
        tcp_mem_bytes: pages * page_size(),
        slab_bytes: slab_kib * 1024,
    })
}

/// This process's resident set, KiB (0 if unreadable).
pub fn self_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vmrss_kib(&s))
        .unwrap_or(0)
}

pub fn page_size() -> u64 {
    // SAFETY: sysconf takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// `VmRSS:   123456 kB` → 123456.
pub fn parse_vmrss_kib(status: &str) -> Option<u64> {
    parse_kib_field(status, "VmRSS:")
}

/// The value of a `Name:   123 kB` line.
pub fn parse_kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut it = line[name.len()..].split_whitespace();
    let n = it.next()?.parse().ok()?;
    (it.next()? == "kB").then_some(n)
}

/// `TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 3` → 3.
pub fn parse_tcp_mem_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "mem")?;
    words.get(i + 1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        let status = "Name:\tflare\nVmPeak:\t  9999 kB\nVmRSS:\t   20480 kB\nThreads:\t3\n";
        assert_eq!(parse_vmrss_kib(status), Some(20480));
        assert_eq!(parse_vmrss_kib("Name: x\n"), None);
        let meminfo = "MemTotal:       24684000 kB\nSlab:             123456 kB\n";
        assert_eq!(parse_kib_field(meminfo, "Slab:"), Some(123456));
        let sockstat =
            "sockets: used 120\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 3\nUDP: inuse 1 mem 0\n";
        assert_eq!(parse_tcp_mem_pages(sockstat), Some(3));
        assert_eq!(parse_tcp_mem_pages("UDP: inuse 1 mem 0\n"), None);
    }

    #[test]
    fn samples_this_process() {
        let me = std::process::id();
        let s = sample(&[me]).expect("/proc is readable");
        assert!(s.rss_bytes > 0 && s.slab_bytes > 0);
        // Several pids sum: this process twice is (about) twice its RSS.
        let twice = sample(&[me, me]).expect("/proc is readable");
        assert!(twice.rss_bytes > s.rss_bytes);
        assert!(sample(&[me, u32::MAX]).is_err());
        assert!(self_rss_kib() > 0);
    }
}
