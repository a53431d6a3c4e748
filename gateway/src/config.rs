//! Configuration of `flare serve`: every setting is a flag, an environment variable
//! `FLARE_<NAME>` and a key in the `--config` TOML file. Flags win over the
//! environment (clap reads both), which wins over the file, which wins over defaults.
//! Every limit of DESIGN.md §5 lives in [`Limits`], the one place it is defined.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

/// Flags of `flare serve`. Every value is optional here so that the file and the
/// defaults can fill what neither the command line nor the environment set.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as in --print-config).
    #[arg(long, env = "FLARE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// WebSocket listen address; clients connect to ws://ADDR/ws [default: 127.0.0.1:8080].
    #[arg(long, env = "FLARE_WS", value_name = "ADDR")]
    pub ws: Option<SocketAddr>,
    /// QUIC listen address [default: 127.0.0.1:8443]. QUIC is not implemented yet: accepted and ignored, with a warning.
    #[arg(long, env = "FLARE_QUIC", value_name = "ADDR")]
    pub quic: Option<SocketAddr>,
    /// Admin HTTP API address: /healthz, /readyz, /metrics, /v1/... [default: 127.0.0.1:9090].
    #[arg(long, env = "FLARE_ADMIN", value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Data directory of the embedded log and the development secrets [default: ./flare-data].
    #[arg(long, env = "FLARE_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Gateway shards: threads, each pinned to a core [default: one per available core
    /// but one, which the pipeline's thread keeps; one on a machine of one or two cores].
    #[arg(long, env = "FLARE_SHARDS", value_name = "N")]
    pub shards: Option<usize>,
    /// This node's id, shown to clients in auth_ok.node and folded into msg_ids [default: gw-1].
    #[arg(long, env = "FLARE_NODE_ID", value_name = "ID")]
    pub node_id: Option<String>,
    /// HS256 key of client tokens. Without one, a development secret is generated in the data dir.
    #[arg(
        long,
        env = "FLARE_JWT_SECRET",
        value_name = "S",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Bearer token of the admin API. Without one, a development token is generated in the data dir.
    #[arg(
        long,
        env = "FLARE_ADMIN_TOKEN",
        value_name = "T",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Kafka brokers (cluster mode: not implemented yet).
    #[arg(long, env = "FLARE_KAFKA", value_name = "BROKERS")]
    pub kafka: Option<String>,
    /// Redis URL (cluster mode: not implemented yet).
    #[arg(long, env = "FLARE_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// Roles this process runs (only "all" exists until cluster mode lands).
    #[arg(long, env = "FLARE_ROLES", value_name = "LIST")]
    pub roles: Option<String>,
    /// Log format: human or json [default: human]. Filter with FLARE_LOG (e.g. FLARE_LOG=debug).
    #[arg(long, env = "FLARE_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// Flags of the limits; see [`Limits`] for meaning and defaults.
#[derive(Debug, Args, Default)]
pub struct LimitArgs {
    /// Heartbeat interval announced in auth_ok; a connection silent for 3x this is closed [default: 30000].
    #[arg(long, env = "FLARE_HEARTBEAT_MS", value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Time a connection has to complete the WebSocket handshake and `auth` [default: 10000].
    #[arg(long, env = "FLARE_AUTH_TIMEOUT_MS", value_name = "MS")]
    pub auth_timeout_ms: Option<u64>,
    /// Largest `send` body in bytes; larger gets too_large [default: 65536].
    #[arg(long, env = "FLARE_MAX_BODY_BYTES", value_name = "BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest WebSocket message in bytes; larger closes with 1009 [default: 1048576].
    #[arg(long, env = "FLARE_MAX_FRAME_BYTES", value_name = "BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Largest WebSocket upgrade request in bytes [default: 8192].
    #[arg(long, env = "FLARE_MAX_HANDSHAKE_BYTES", value_name = "BYTES")]
    pub max_handshake_bytes: Option<usize>,
    /// Sends per second per connection, a token bucket with a burst of the same size [default: 100].
    #[arg(long, env = "FLARE_SENDS_PER_SEC", value_name = "N")]
    pub sends_per_sec: Option<u32>,
    /// Bytes queued for one slow connection before it is closed with 4008 [default: 4194304].
    #[arg(long, env = "FLARE_OUTBOUND_BYTES_MAX", value_name = "BYTES")]
    pub outbound_bytes_max: Option<usize>,
    /// Connections one shard holds at most [default: 1000000].
    #[arg(long, env = "FLARE_CONNS_PER_SHARD", value_name = "N")]
    pub conns_per_shard: Option<usize>,
    /// Depth of each inter-thread queue, shard <-> pipeline [default: 65536].
    #[arg(long, env = "FLARE_QUEUE_DEPTH", value_name = "N")]
    pub queue_depth: Option<usize>,
    /// Inbox retention: messages kept per user [default: 10000].
    #[arg(long, env = "FLARE_RETENTION_MESSAGES", value_name = "N")]
    pub retention_messages: Option<usize>,
    /// Inbox retention: age in seconds [default: 604800, 7 days].
    #[arg(long, env = "FLARE_RETENTION_SECS", value_name = "SECS")]
    pub retention_secs: Option<u64>,
    /// Dedup window of client message ids, in seconds [default: 600].
    #[arg(long, env = "FLARE_DEDUP_WINDOW_SECS", value_name = "SECS")]
    pub dedup_window_secs: Option<u64>,
    /// Dedup entries held at most, about 100 bytes each; a full table forgets the
    /// oldest early and logs a warning [default: 16000000, the whole window up to
    /// ~26k msgs/s at the default window; at least 65536].
    #[arg(long, env = "FLARE_DEDUP_MAX_ENTRIES", value_name = "N")]
    pub dedup_max_entries: Option<usize>,
    /// How long a drain (SIGTERM) waits for connections to go before exiting [default: 10000].
    #[arg(long, env = "FLARE_DRAIN_TIMEOUT_MS", value_name = "MS")]
    pub drain_timeout_ms: Option<u64>,
}

/// Every bound of the gateway, in one place (DESIGN.md §5, STYLE.md 3).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub heartbeat_ms: u64,
    pub auth_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
    pub max_handshake_bytes: usize,
    pub sends_per_sec: u32,
    pub outbound_bytes_max: usize,
    pub conns_per_shard: usize,
    pub queue_depth: usize,
    pub retention_messages: usize,
    pub retention_secs: u64,
    pub dedup_window_secs: u64,
    pub dedup_max_entries: usize,
    pub drain_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            heartbeat_ms: 30_000,
            auth_timeout_ms: 10_000,
            max_body_bytes: 65_536,
            max_frame_bytes: 1 << 20,
            max_handshake_bytes: 8192,
            sends_per_sec: 100,
            outbound_bytes_max: 4 << 20,
            conns_per_shard: 1_000_000,
            queue_depth: 65_536,
            retention_messages: 10_000,
            retention_secs: 7 * 24 * 3600,
            dedup_window_secs: 600,
            dedup_max_entries: flare_pipeline::dedup::MAX_ENTRIES_DEFAULT,
            drain_timeout_ms: 10_000,
        }
    }
}

/// The effective configuration of `flare serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub ws: SocketAddr,
    pub quic: SocketAddr,
    pub admin: SocketAddr,
    pub data: PathBuf,
    pub shards: usize,
    pub node_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kafka: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<String>,
    pub roles: String,
    pub log_format: String,
    pub limits: Limits,
}

/// Shards by default on `cores` available cores: all but one. The embedded pipeline's
/// thread carries every message (its engine, the log's group commit), and with a shard
/// on every core it shares one with a shard, waiting for its turn there. On this
/// project's 2-core machine, with the load generator on the same cores, one shard
/// instead of two raised the chat maximum over rkyv from 283k to 367k msgs/s and took
/// the p99 at 100k msgs/s from 18.6 to 3.6 ms, while fan-out's best step fell from
/// 5868 to 4934–5600 msgs/s: one thread then writes every delivery (the README's
/// figures, `bench/compare --flare-args "--shards N"`).
pub fn default_shards(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ws: "127.0.0.1:8080".parse().expect("literal address"),
            quic: "127.0.0.1:8443".parse().expect("literal address"),
            admin: "127.0.0.1:9090".parse().expect("literal address"),
            data: PathBuf::from("./flare-data"),
            shards: default_shards(flare_shard::launch::available_cores()),
            node_id: "gw-1".to_string(),
            jwt_secret: None,
            admin_token: None,
            kafka: None,
            redis: None,
            roles: "all".to_string(),
            log_format: "human".to_string(),
            limits: Limits::default(),
        }
    }
}

macro_rules! overlay {
    ($dst:expr, $src:expr, [$($field:ident),* $(,)?]) => {
        $( if let Some(v) = $src.$field.take() { $dst.$field = v; } )*
    };
}

impl Config {
    /// Resolves flags and environment (already merged by clap) over the file over defaults.
    pub fn resolve(mut args: ServeArgs) -> Result<Config> {
        let mut cfg = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        overlay!(
            cfg,
            args,
            [ws, quic, admin, data, shards, node_id, roles, log_format]
        );
        if let Some(v) = args.jwt_secret.take() {
            cfg.jwt_secret = Some(v);
        }
        if let Some(v) = args.admin_token.take() {
            cfg.admin_token = Some(v);
        }
        if let Some(v) = args.kafka.take() {
            cfg.kafka = Some(v);
        }
        if let Some(v) = args.redis.take() {
            cfg.redis = Some(v);
        }
        let l = &mut args.limits;
        overlay!(
            cfg.limits,
            l,
            [
                heartbeat_ms,
                auth_timeout_ms,
                max_body_bytes,
                max_frame_bytes,
                max_handshake_bytes,
                sends_per_sec,
                outbound_bytes_max,
                conns_per_shard,
                queue_depth,
                retention_messages,
                retention_secs,
                dedup_window_secs,
                dedup_max_entries,
                drain_timeout_ms,
            ]
        );
        cfg.validate()?;
        Ok(cfg)
    }

    fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Rejects settings that cannot work, naming the fix.
    pub fn validate(&self) -> Result<()> {
        let l = &self.limits;
        if self.shards == 0 || self.shards > 1024 {
            bail!("--shards must be between 1 and 1024 (got {})", self.shards);
        }
        if !flare_codec::ids::is_valid_id(&self.node_id) {
            bail!(
                "--node-id must be 1..=64 characters of [A-Za-z0-9_.@:-] (got {:?})",
                self.node_id
            );
        }
        if self.kafka.is_some() || self.redis.is_some() {
            bail!("cluster mode (--kafka, --redis) is not implemented yet; run without them for the embedded log");
        }
        if self.roles != "all" {
            bail!(
                "--roles: only \"all\" exists until cluster mode lands (got {:?})",
                self.roles
            );
        }
        if self.log_format != "human" && self.log_format != "json" {
            bail!(
                "--log-format must be human or json (got {:?})",
                self.log_format
            );
        }
        if matches!(&self.jwt_secret, Some(s) if s.is_empty()) {
            bail!("--jwt-secret must not be empty");
        }
        if matches!(&self.admin_token, Some(s) if s.is_empty()) {
            bail!("--admin-token must not be empty");
        }
        if l.heartbeat_ms < 10 || l.auth_timeout_ms < 10 {
            bail!("--heartbeat-ms and --auth-timeout-ms must be at least 10");
        }
        if l.max_frame_bytes < 1024 {
            bail!("--max-frame-bytes must be at least 1024");
        }
        if l.max_body_bytes == 0 || l.max_body_bytes > l.max_frame_bytes {
            bail!(
                "--max-body-bytes must be between 1 and --max-frame-bytes ({})",
                l.max_frame_bytes
            );
        }
        if l.max_handshake_bytes < 256 {
            bail!("--max-handshake-bytes must be at least 256");
        }
        if l.sends_per_sec == 0 {
            bail!("--sends-per-sec must be at least 1");
        }
        if l.outbound_bytes_max < l.max_frame_bytes {
            bail!(
                "--outbound-bytes-max must be at least --max-frame-bytes ({})",
                l.max_frame_bytes
            );
        }
        if l.conns_per_shard == 0 || l.queue_depth < 16 {
            bail!("--conns-per-shard must be at least 1 and --queue-depth at least 16");
        }
        if l.retention_messages == 0 || l.retention_secs == 0 {
            bail!("--retention-messages and --retention-secs must be at least 1");
        }
        let min = flare_pipeline::dedup::MAX_ENTRIES_MIN;
        if l.dedup_max_entries < min {
            bail!(
                "--dedup-max-entries must be at least {min}, more than the messages that \
                 are not durable yet can hold (got {})",
                l.dedup_max_entries
            );
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.jwt_secret.is_some() {
            shown.jwt_secret = Some("<set>".into());
        }
        if shown.admin_token.is_some() {
            shown.admin_token = Some("<set>".into());
        }
        toml::to_string_pretty(&shown).expect("config serializes")
    }
}

/// The development secrets kept in the data dir when none are configured.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevSecrets {
    pub jwt_secret: String,
    pub admin_token: String,
}

const DEV_SECRETS_FILE: &str = "dev-secrets.toml";

/// Returns the JWT secret and admin token: configured ones, or the development ones
/// of the data dir, generated (and printed once) on first use.
pub fn secrets(
    data: &Path,
    jwt: Option<&str>,
    admin: Option<&str>,
    create: bool,
) -> Result<(String, String)> {
    if let (Some(j), Some(a)) = (jwt, admin) {
        return Ok((j.to_string(), a.to_string()));
    }
    let path = data.join(DEV_SECRETS_FILE);
    let dev = match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str::<DevSecrets>(&text)
            .with_context(|| format!("invalid {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            std::fs::create_dir_all(data)
                .with_context(|| format!("cannot create data dir {}", data.display()))?;
            let dev = DevSecrets {
                jwt_secret: random_hex(32)?,
                admin_token: random_hex(24)?,
            };
            write_private(&path, &toml::to_string(&dev)?)?;
            eprintln!(
                "flare: generated a development JWT secret and admin token in {} (printed once):\n  jwt_secret  = {}\n  admin_token = {}",
                path.display(),
                dev.jwt_secret,
                dev.admin_token
            );
            dev
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no --jwt-secret given and no {} yet: pass --jwt-secret, or run `flare serve` once with this --data", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    Ok((
        jwt.map(str::to_string).unwrap_or(dev.jwt_secret),
        admin.map(str::to_string).unwrap_or(dev.admin_token),
    ))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("cannot read /dev/urandom")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flare.toml");
        std::fs::write(
            &file,
            "shards = 3\nnode_id = \"n-file\"\n[limits]\nheartbeat_ms = 1234\nsends_per_sec = 7\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file),
            node_id: Some("n-flag".into()),
            limits: LimitArgs {
                sends_per_sec: Some(9),
                ..Default::default()
            },
            ..Default::default()
        };
        let cfg = Config::resolve(args).unwrap();
        assert_eq!(cfg.shards, 3);
        assert_eq!(cfg.node_id, "n-flag");
        assert_eq!(cfg.limits.heartbeat_ms, 1234);
        assert_eq!(cfg.limits.sends_per_sec, 9);
        assert_eq!(cfg.limits.max_body_bytes, 65_536);
    }

    #[test]
    fn default_shards_leave_the_pipeline_a_core() {
        assert_eq!(
            [1, 2, 3, 4, 64].map(default_shards),
            [1, 1, 2, 3, 63],
            "one core: the shard and the pipeline share it; more: all but one"
        );
        assert_eq!(
            Config::default().shards,
            default_shards(flare_shard::launch::available_cores())
        );
    }

    #[test]
    fn unknown_file_keys_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("flare.toml");
        std::fs::write(&file, "shardz = 3\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("shardz"), "{err:#}");
        let err = Config::resolve(ServeArgs {
            shards: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--shards"));
        let err = Config::resolve(ServeArgs {
            limits: LimitArgs {
                dedup_max_entries: Some(1000),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("--dedup-max-entries"), "{err}");
    }

    #[test]
    fn help_states_the_real_defaults() {
        use clap::Args as _;
        let help = ServeArgs::augment_args(clap::Command::new("serve"))
            .render_long_help()
            .to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let l = Limits::default();
        for (flag, v) in [
            ("--heartbeat-ms", l.heartbeat_ms.to_string()),
            ("--auth-timeout-ms", l.auth_timeout_ms.to_string()),
            ("--max-body-bytes", l.max_body_bytes.to_string()),
            ("--max-frame-bytes", l.max_frame_bytes.to_string()),
            ("--max-handshake-bytes", l.max_handshake_bytes.to_string()),
            ("--sends-per-sec", l.sends_per_sec.to_string()),
            ("--outbound-bytes-max", l.outbound_bytes_max.to_string()),
            ("--conns-per-shard", l.conns_per_shard.to_string()),
            ("--queue-depth", l.queue_depth.to_string()),
            ("--retention-messages", l.retention_messages.to_string()),
            ("--retention-secs", l.retention_secs.to_string()),
            ("--dedup-window-secs", l.dedup_window_secs.to_string()),
            ("--dedup-max-entries", l.dedup_max_entries.to_string()),
            ("--drain-timeout-ms", l.drain_timeout_ms.to_string()),
        ] {
            let at = help
                .find(&format!("{flag} <"))
                .unwrap_or_else(|| panic!("{flag} in help"));
            let rest = &help[at..];
            let entry = &rest[..rest[2..].find(" --").map_or(rest.len(), |i| i + 2)];
            assert!(entry.contains(&format!("[default: {v}")), "{flag}: {entry}");
        }
    }

    #[test]
    fn dev_secrets_are_generated_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(secrets(dir.path(), None, None, false).is_err());
        let (j1, a1) = secrets(dir.path(), None, None, true).unwrap();
        let (j2, a2) = secrets(dir.path(), None, None, false).unwrap();
        assert_eq!((j1.len(), a1.len()), (64, 48));
        assert_eq!((j1, a1), (j2, a2));
        let (j3, _) = secrets(dir.path(), Some("given"), None, false).unwrap();
        assert_eq!(j3, "given");
    }
}
