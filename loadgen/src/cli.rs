//! The command line: common options, one subcommand per scenario.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::clock::parse_duration;
use crate::proto::Encoding;

const AFTER_HELP: &str = "\
Every scenario runs in phases: connect its sessions (the ramp), wait until every worker
is ready, run for --duration, drain (wait for outstanding acks and deliveries, at most
--drain-timeout), then close. Latencies are measured open-loop: from the time a request
was scheduled, not the time it was sent, so a stall anywhere counts in full.

Work is split over --processes x --threads workers. Each process can hold at most
about its open-file limit of connections (20000 here): use --processes for more, and
--source-addrs for more than ~28000 connections per source address and server port.

Exit status: 0 when the run passed, 1 when the error rate went over --max-error-rate
or any acknowledged message was lost, duplicated or reordered, 2 on a usage or setup
error.

Examples:
  flare-loadgen --jwt-secret S connect --conns 10000 --ramp-rate 2000 --duration 30s --server-pid PID
  flare-loadgen --jwt-secret S chat --pairs 50 --rate 2000 --duration 30s
  flare-loadgen --jwt-secret S fanout --admin-token T --members 1000 --publishers 2 --rate 100 --duration 20s
  flare-loadgen --jwt-secret S churn --rate 500 --lifetime 1s --duration 30s
  flare-loadgen --target raw-ws --url ws://127.0.0.1:8081/ws fanout --members 1000 --rate 100";

/// Load generator for Flare: many authenticated WebSocket sessions, open-loop message
/// rates, HdrHistogram latencies, and a loss / duplicate / order check.
#[derive(Debug, Parser)]
#[command(name = "flare-loadgen", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// What kind of server the run drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// Flare: authenticated sessions of PROTOCOL.md (auth, send, send_ok, msg).
    Flare,
    /// A plain WebSocket broadcast server: rooms by URL path, every text message goes
    /// to every connection of its room, no auth, no acknowledgement (see `bench/peers`).
    RawWs,
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The gateway's WebSocket URL (raw-ws: rooms are paths below it).
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// The server's protocol: Flare's, or raw-ws rooms for servers that do not speak it.
    #[arg(long, global = true, value_enum, default_value = "flare")]
    pub target: TargetKind,
    /// Frame encoding of every session (Flare only; raw-ws messages are text).
    #[arg(long, global = true, value_enum, default_value = "json")]
    pub encoding: Encoding,
    /// The gateway's HS256 secret; tokens are minted with it.
    #[arg(long, global = true, env = "FLARE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Worker threads per process, each with its own monoio runtime [default: cores].
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Worker processes (this binary re-executed); their results are merged exactly.
    #[arg(long, global = true, default_value_t = 1)]
    pub processes: usize,
    /// Source addresses for outgoing connections, used round-robin
    /// (e.g. 127.0.0.1,127.0.0.2,127.0.0.3).
    #[arg(long, global = true, value_delimiter = ',')]
    pub source_addrs: Vec<IpAddr>,
    /// How long the run phase lasts (connect: how long connections are held).
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// New connections per second, over all workers, while connecting (0: as fast as
    /// --connect-concurrency allows).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub ramp_rate: f64,
    /// Connection attempts in progress at once, per worker.
    #[arg(long, global = true, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Limit for connect + handshake + auth of one connection.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Longest wait, after the run, for outstanding acks and deliveries.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Width of the intervals of the report's latency over time (chat, fanout): each
    /// message counts in the interval of its scheduled send. A run longer than 300
    /// intervals gets wider ones.
    #[arg(long, global = true, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Pid of the server, or a comma-separated list whose RSS is summed (e.g. nginx's
    /// workers): its RSS (VmRSS), the host's kernel TCP buffer memory and kernel slab
    /// memory are sampled before connecting and once every session is up (after
    /// --settle), and reported per connection.
    #[arg(long, global = true, value_delimiter = ',', value_name = "PID")]
    pub server_pid: Vec<u32>,
    /// Pause between "every session is up" and the memory sample.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    pub settle: Duration,
    /// User ids are `<prefix>-<run id>-<n>`; the run id is random per run.
    #[arg(long, global = true, default_value = "lg")]
    pub user_prefix: String,
    /// Write every figure (and the merged histograms, base64 HdrHistogram V2) here.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Highest tolerated error rate, errors / operations (connection attempts +
    /// scheduled messages), e.g. 0.01; above it the exit status is 1.
    #[arg(long, global = true, default_value_t = 0.0)]
    pub max_error_rate: f64,
    /// Never print the live progress line (it is printed only when stderr is a terminal).
    #[arg(long, global = true)]
    pub quiet: bool,

    /// Internal: this process is worker process N of the run (set by the parent).
    #[arg(long, global = true, hide = true)]
    pub worker_process: Option<usize>,
    /// Internal: the run id shared by the worker processes.
    #[arg(long, global = true, hide = true)]
    pub run_id: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// N authenticated idle connections at --ramp-rate, held for --duration: connect
    /// rate, failures by reason, and (with --server-pid) the server's memory per
    /// connection.
    Connect(ConnectArgs),
    /// Pairs of users sending each other messages at a fixed total rate: end-to-end and
    /// send_ok latency, throughput, errors by code, loss / duplicate / order check.
    Chat(ChatArgs),
    /// One group of M members (created through the admin API), publishers at a fixed
    /// rate: deliveries per second and delivery latency.
    Fanout(FanoutArgs),
    /// Connections that come and go at a fixed rate: each connects, authenticates,
    /// stays --lifetime, and closes.
    Churn(ChurnArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Connections to open, over all workers.
    #[arg(long, default_value_t = 1000)]
    pub conns: usize,
}

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Pairs of users; each user sends to the other.
    #[arg(long, default_value_t = 10)]
    pub pairs: usize,
    /// Messages per second over all senders (each sender: rate / (2 x pairs)). Mind the
    /// gateway's per-connection limit (`flare serve --sends-per-sec`, default 100).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Bytes of each message body (at least the sequence number and timestamp).
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Members of the group, each one connection.
    #[arg(long, default_value_t = 100)]
    pub members: usize,
    /// How many of the members publish.
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Group messages per second over all publishers (each is delivered to every
    /// member, the publisher included). Each publisher sends rate / publishers per
    /// second: mind the gateway's per-connection limit (`--sends-per-sec`, default 100).
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Bytes of each message body.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// The admin API's base URL.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// The admin API's bearer token.
    #[arg(long, env = "FLARE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// raw-ws only: publish each message as an HTTP `POST <URL>/<room>` (nchan's
    /// publisher endpoint, e.g. http://127.0.0.1:8081/pub) instead of writing it to the
    /// publisher's WebSocket. A 2xx answer acknowledges the message; its latency is
    /// reported as the send_ok latency.
    #[arg(long, value_name = "URL")]
    pub publish_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    /// New connections per second, over all workers.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long each connection stays open after `auth_ok`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub lifetime: Duration,
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Connect(_) => "connect",
            Scenario::Chat(_) => "chat",
            Scenario::Fanout(_) => "fanout",
            Scenario::Churn(_) => "churn",
        }
    }
}

/// A `ws://host:port/path` URL, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

pub fn parse_ws_url(url: &str) -> Result<WsUrl, String> {
    parse_url(url, "ws://")
}

/// An `http://host:port/path` URL, resolved.
pub fn parse_http_url(url: &str) -> Result<WsUrl, String> {
    parse_url(url, "http://")
}

fn parse_url(url: &str, scheme: &str) -> Result<WsUrl, String> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or_else(|| format!("`{url}`: only {scheme} URLs are supported here"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("`{url}`: cannot resolve {with_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("`{url}`: {with_port} resolves to nothing"))?;
    Ok(WsUrl {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// An `http://host:port` base URL: the socket address and the Host header.
pub fn parse_http_base(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// admin URLs are supported"))?;
    let authority = rest.trim_end_matches('/');
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("`{url}`: cannot resolve {with_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("`{url}` resolves to nothing"))?;
    Ok((addr, authority.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_parse() {
        let u = parse_ws_url("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(u.addr, "127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(
            (u.host.as_str(), u.path.as_str()),
            ("127.0.0.1:8080", "/ws")
        );
        let u = parse_ws_url("ws://127.0.0.1").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (80, "/"));
        assert!(parse_ws_url("http://127.0.0.1/ws").is_err());
        assert!(parse_ws_url("ws:///ws").is_err());
        let u = parse_http_url("http://127.0.0.1:8081/pub").unwrap();
        assert_eq!((u.addr.port(), u.path.as_str()), (8081, "/pub"));
        assert!(parse_http_url("ws://127.0.0.1:8081/pub").is_err());
        let (a, h) = parse_http_base("http://127.0.0.1:9090/").unwrap();
        assert_eq!((a.port(), h.as_str()), (9090, "127.0.0.1:9090"));
    }

    #[test]
    fn raw_ws_target_and_several_server_pids_parse() {
        let c = Cli::try_parse_from([
            "flare-loadgen",
            "connect",
            "--target",
            "raw-ws",
            "--server-pid",
            "10,11",
        ])
        .unwrap();
        assert_eq!(c.common.target, TargetKind::RawWs);
        assert_eq!(c.common.server_pid, vec![10, 11]);
        let c = Cli::try_parse_from(["flare-loadgen", "connect"]).unwrap();
        assert_eq!(c.common.target, TargetKind::Flare);
        assert!(c.common.server_pid.is_empty());
    }

    #[test]
    fn cli_parses_common_options_on_either_side_of_the_scenario() {
        let c = Cli::try_parse_from([
            "flare-loadgen",
            "--encoding",
            "rkyv",
            "chat",
            "--pairs",
            "4",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--source-addrs",
            "127.0.0.1,127.0.0.2",
        ])
        .unwrap();
        assert_eq!(c.common.encoding, Encoding::Rkyv);
        assert_eq!(c.common.duration, Duration::from_secs(2));
        assert_eq!(c.common.source_addrs.len(), 2);
        match c.scenario {
            Scenario::Chat(a) => assert_eq!((a.pairs, a.rate), (4, 200.0)),
            other => panic!("parsed as {other:?}"),
        }
    }
}
