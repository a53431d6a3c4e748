//! Starting shards: one thread per shard, pinned to a core, each running its own
//! monoio runtime on io_uring (or on epoll where io_uring is unavailable).

use std::io;
use std::thread::JoinHandle;

/// Which monoio driver the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    /// io_uring when the kernel supports every operation monoio needs, else epoll.
    pub fn detect() -> Self {
        if monoio::utils::detect_uring() {
            Driver::IoUring
        } else {
            Driver::Epoll
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll (legacy driver)",
        }
    }
}

/// Number of cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Spawns shard `index` as a thread named `flare-shard-<index>`, pinned to core
/// `index % cores`, running `body` to completion on a monoio runtime with timers.
pub fn spawn_shard<F, Fut>(index: usize, ring_entries: u32, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name(format!("flare-shard-{index}"))
        .spawn(move || {
            let core = index % available_cores();
            if let Err(e) = monoio::utils::bind_to_cpu_set([core]) {
                tracing::warn!(shard = index, core, error = ?e, "could not pin shard to its core");
            }
            let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .with_entries(ring_entries)
                .enable_timer()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(shard = index, error = %e, "could not start the shard runtime");
                    return;
                }
            };
            rt.block_on(body());
        })
}
