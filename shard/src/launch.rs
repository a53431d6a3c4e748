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

/// The settings of a shard's io_uring. With `COOP_TASKRUN` (Linux 5.19) a completion
/// that arrives while the shard is running does not interrupt it with an
/// inter-processor interrupt: the shard picks it up at its next system call, which a
/// busy shard makes every few microseconds, and a sleeping shard is woken as before.
/// Every loopback or LAN send wakes its reader's ring, and on a virtual machine each
/// such interrupt is an exit to the hypervisor: without this flag they were the largest
/// single cost of the chat path, and halved its latency (see the README's figures).
pub fn uring_builder() -> io_uring::Builder {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun();
    urb
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
            let build = |urb| {
                monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .with_entries(ring_entries)
                    .uring_builder(urb)
                    .enable_timer()
                    .build()
            };
            // Kernels before 5.19 refuse COOP_TASKRUN with EINVAL: run without it.
            let built = match build(uring_builder()) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    build(io_uring::IoUring::builder())
                }
                built => built,
            };
            let mut rt = match built {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(shard = index, error = %e, "could not start the shard runtime");
                    return;
                }
            };
            rt.block_on(body());
        })
}
