//! `flare`: the one binary of Flare. `flare serve` runs a gateway node with the
//! embedded durable pipeline; `flare token` mints client tokens; `flare tune`
//! checks a host for many connections.

mod admin;
mod config;
mod conn;
mod jwt;
mod metrics;
mod notify;
mod server;
mod shard;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};

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
