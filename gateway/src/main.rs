//! `flare`: the one binary of Flare. `flare serve` runs a gateway node with the
//! embedded durable pipeline; `flare token` mints client tokens; `flare tune`
//! checks a host for many connections.

mod admin;
mod config;
mod conn;
mod deliver;
mod jwt;
mod metrics;
mod notify;
mod server;
mod shard;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};

/// jemalloc rather than glibc's malloc. With inboxes full, so that every message frees
/// an old one, chat at 120k msgs/s has half the p99 latency with jemalloc (the README
/// has the runs). glibc also grows a thread's heap a page or so at a time, each step an
/// `mprotect` call: about 6500 a second on the pipeline thread, the slowest 9 ms.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, which `_RJEM_MALLOC_CONF` in the environment can override.
/// Freed pages go back to the kernel after about a second (not ten), from jemalloc's
/// own background thread, so an idle server's memory is what its connections hold.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000".as_ptr());

/// A C string pointer that may be a `static`: it points at a literal.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a `'static` literal that nothing writes.
unsafe impl Sync for MallocConf {}

#[derive(Parser)]
#[command(
    name = "flare",
    version,
    about = "Flare: a thread-per-core io_uring gateway for instant messaging"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway node (WebSocket, admin API, embedded durable log).
    Serve(Box<ServeArgs>),
    /// Mint a client token (HS256 JWT) with the node's secret.
    Token(TokenArgs),
    /// Check (or tune) this host for many connections.
    Tune {
        #[command(subcommand)]
        action: TuneAction,
    },
}

#[derive(clap::Args)]
struct TokenArgs {
    /// User id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// Device id (the token's `dev`).
    #[arg(long)]
    device: Option<String>,
    /// Lifetime, like 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// HS256 secret; defaults to the development secret of --data.
    #[arg(long, env = "FLARE_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Data dir holding the development secret.
    #[arg(long, env = "FLARE_DATA", default_value = "./flare-data")]
    data: PathBuf,
}

#[derive(Subcommand)]
enum TuneAction {
    /// Report limits that cap how many connections this host can hold.
    Check,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
        Command::Tune {
            action: TuneAction::Check,
        } => {
            print!("{}", flare_tuning::check().report());
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("flare: {e:#}");
        std::process::exit(2);
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let print = args.print_config;
    let cfg = Config::resolve(args)?;
    if print {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    init_logging(&cfg.log_format);
    server::serve(cfg)
}

fn init_logging(format: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("FLARE_LOG").unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn token(args: TokenArgs) -> Result<()> {
    if !flare_codec::ids::is_valid_id(&args.user) {
        bail!("--user must be 1..=64 characters of [A-Za-z0-9_.@:-]");
    }
    if let Some(d) = &args.device {
        if !flare_codec::ids::is_valid_id(d) {
            bail!("--device must be 1..=64 characters of [A-Za-z0-9_.@:-]");
        }
    }
    let ttl = jwt::parse_ttl(&args.ttl).map_err(anyhow::Error::msg)?;
    let (secret, _) = config::secrets(&args.data, args.jwt_secret.as_deref(), Some(""), false)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("clock before 1970")?
        .as_secs();
    let claims = jwt::Claims {
        sub: args.user,
        exp: now + ttl,
        dev: args.device,
    };
    println!("{}", jwt::mint(&claims, secret.as_bytes()));
    Ok(())
}
