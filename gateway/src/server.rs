//! `flare serve`: binds the sockets, recovers the pipeline, starts the shards and the
//! admin server, then waits for SIGTERM/SIGINT and drains.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use flare_pipeline::api::{Endpoint, Event, Request};
use flare_pipeline::{spawn_embedded, PipelineConfig};
use flare_shard::launch::{spawn_shard, Driver};
use flare_shard::listener::reuseport_tcp;
use flare_shard::mailbox::mailbox;

use crate::admin::{self, AdminInit};
use crate::config::{secrets, Config};
use crate::metrics::ShardMetrics;
use crate::shard::{self, ShardInit};

const LISTEN_BACKLOG: i32 = 4096;
const RING_ENTRIES: u32 = 1024;

pub fn serve(cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.data)
        .with_context(|| format!("cannot create data dir {} (set --data)", cfg.data.display()))?;
    let (jwt_secret, admin_token) = secrets(
        &cfg.data,
        cfg.jwt_secret.as_deref(),
        cfg.admin_token.as_deref(),
        true,
    )?;

    let nofile = flare_tuning::raise_nofile_limit();
    match nofile {
        Ok(n) => tracing::info!(
            open_files = n,
            connections = n.saturating_sub(64),
            "raised the open-file limit to the hard limit; this process can hold about this many connections"
        ),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let driver = Driver::detect();
    if driver == Driver::Epoll {
        tracing::warn!(
            "io_uring is unavailable here: shards run on monoio's epoll (legacy) driver"
        );
    }
    if cfg.quic != Config::default().quic {
        tracing::warn!(quic = %cfg.quic, "QUIC is not implemented yet: --quic is ignored");
    }

    // Sockets first: a busy port is an error at start, not a surprise later.
    let ws_listeners = reuseport_tcp(cfg.ws, cfg.shards, LISTEN_BACKLOG)
        .with_context(|| format!("cannot listen on --ws {}", cfg.ws))?;
    let ws_addr = ws_listeners[0].local_addr()?;
    let admin_listener = bind_admin(cfg.admin)?;
    let admin_addr = admin_listener.local_addr()?;

    // Mailboxes: one request queue per endpoint into the pipeline, one event queue back.
    let endpoints = cfg.shards + 1;
    let depth = cfg.limits.queue_depth;
    let (mut req_senders, req_receiver) = mailbox::<Request>(endpoints, depth)?;
    let mut event_senders = Vec::with_capacity(endpoints);
    let mut event_receivers = Vec::with_capacity(endpoints);
    for _ in 0..endpoints {
        let (mut tx, rx) = mailbox::<Event>(1, depth)?;
        event_senders.push(tx.pop().expect("one sender"));
        event_receivers.push(rx);
    }

    let pipeline = spawn_embedded(
        PipelineConfig {
            data_dir: cfg.data.clone(),
            node_id: cfg.node_id.clone(),
            retention_messages: cfg.limits.retention_messages,
            retention_ms: cfg.limits.retention_secs.saturating_mul(1000),
            dedup_window_ms: cfg.limits.dedup_window_secs.saturating_mul(1000),
            dedup_max_entries: cfg.limits.dedup_max_entries,
            catchup_page: 256,
            // A page plus what is already queued must fit the outbound bound.
            page_bytes_max: cfg.limits.outbound_bytes_max / 4,
        },
        req_receiver,
        event_senders,
    )
    .with_context(|| format!("cannot open the embedded log in {}", cfg.data.display()))?;

    block_termination_signals();
    let draining = Arc::new(AtomicBool::new(false));
    let mut event_receivers = event_receivers.into_iter();
    let mut req_senders_iter = req_senders.drain(..);
    let mut shard_metrics = Vec::with_capacity(cfg.shards);
    let mut shard_threads = Vec::with_capacity(cfg.shards);
    let node: Arc<str> = Arc::from(cfg.node_id.as_str());
    for (index, listener) in ws_listeners.into_iter().enumerate() {
        let metrics = Arc::new(ShardMetrics::default());
        shard_metrics.push(metrics.clone());
        let to_pipeline = req_senders_iter.next().expect("one sender per endpoint");
        let events = event_receivers.next().expect("one receiver per endpoint");
        let limits = cfg.limits.clone();
        let secret = jwt_secret.clone().into_bytes();
        let draining = draining.clone();
        let node = node.clone();
        let handle = spawn_shard(index, RING_ENTRIES, move || {
            let init = ShardInit {
                index: index as Endpoint,
                node: Rc::from(&*node),
                limits,
                jwt_secret: secret,
                to_pipeline,
                events,
                metrics,
                draining,
            };
            shard::run(init, listener)
        })?;
        shard_threads.push(handle);
    }
    let admin_init = AdminInit {
        token: admin_token,
        node: cfg.node_id.clone(),
        max_body_bytes: cfg.limits.max_body_bytes,
        to_pipeline: req_senders_iter.next().expect("admin endpoint sender"),
        events: event_receivers.next().expect("admin endpoint receiver"),
        shard_metrics,
        draining: draining.clone(),
        driver: driver.as_str(),
    };
    drop(req_senders_iter);
    std::thread::Builder::new()
        .name("flare-admin".into())
        .spawn(move || {
            match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
            {
                Ok(mut rt) => rt.block_on(admin::run(admin_init, admin_listener)),
                Err(e) => tracing::error!(error = %e, "admin: cannot start its runtime"),
            }
        })?;

    tracing::info!(
        ws = %format!("ws://{ws_addr}/ws"),
        admin = %format!("http://{admin_addr}"),
        shards = cfg.shards,
        driver = driver.as_str(),
        node = %cfg.node_id,
        data = %cfg.data.display(),
        "flare ready"
    );

    let signal = wait_for_termination();
    tracing::info!(
        signal,
        "draining: new connections refused, sessions get goaway"
    );
    draining.store(true, Ordering::SeqCst);
    for t in shard_threads {
        let _ = t.join();
    }
    if let Err(e) = pipeline.stop() {
        tracing::error!(error = %e, "the pipeline stopped with an error");
        return Err(e.into());
    }
    tracing::info!("stopped");
    Ok(())
}

fn bind_admin(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on --admin {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Blocks SIGTERM and SIGINT in this thread and every thread it starts afterwards,
/// so that only `wait_for_termination` receives them.
fn block_termination_signals() {
    let set = termination_set();
    // SAFETY: `set` is a valid, initialised signal set.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn wait_for_termination() -> &'static str {
    let set = termination_set();
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
    unsafe {
        libc::sigwait(&set, &mut sig);
    }
    if sig == libc::SIGINT {
        "SIGINT"
    } else {
        "SIGTERM"
    }
}
