//! The durable log: the [`Log`] trait and the embedded implementation on a glommio
//! DMA (O_DIRECT) file with group commit.
//!
//! [`EmbeddedLog`] keeps one file, `log`, in the data directory. Records are framed
//! as in [`crate::record`] and written back to back. A flush writes everything staged
//! since the last flush as one aligned write, starting at the block that holds the end
//! of the durable records (that partially filled block is kept in memory and written
//! again with the new records), zero-padded to the block size, then `fdatasync`s.
//! Rewriting the last block with its old bytes unchanged keeps the durable prefix
//! intact whichever of its sectors reach the disk.
//!
//! The flush's `pwrite` and `fdatasync` are plain system calls on the pipeline thread,
//! not glommio I/O. The driver awaits every flush before it takes new requests (see
//! [`crate::embedded`]), so nothing else could run meanwhile anyway, and the blocking
//! calls save what the ring cost around them: a hand-off to an io-wq worker for the
//! `fdatasync`, and a `membarrier` (an inter-processor interrupt to every core running
//! a Flare thread) each time glommio put the thread to sleep. In `flare-loadgen chat`
//! at 105k msgs/s that was about a fifth of the pipeline's CPU time (109–113 →
//! 91–92 ticks per 3 s).
//!
//! Recovery reads the file from the start and stops at the first zero length, bad CRC,
//! undecodable or truncated record: a torn tail. The file is cut back to the block
//! holding that point and appending continues there.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use glommio::io::{DmaFile, OpenOptions};

use crate::config::{LOG_BLOCK_BYTES, REPLAY_CHUNK_BYTES};
use crate::record::{decode_frame, encode_frame, Decoded, End, Record};

/// What a recovery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Records applied.
    pub records: u64,
    /// Bytes of valid records.
    pub bytes: u64,
    /// Why reading stopped before the end of the file, if it did with bytes left.
    pub torn_tail: Option<End>,
}

/// A durable, ordered log of [`Record`]s.
///
/// Ownership of the log passes into [`flush`](Log::flush) and comes back with its
/// result, so a driver can keep deciding on new requests while a flush is in flight.
pub trait Log: Sized + 'static {
    /// Reads every durable record in order, from the start.
    fn replay<'a>(
        &'a mut self,
        apply: &'a mut dyn FnMut(Record),
    ) -> impl Future<Output = io::Result<Recovered>> + 'a;

    /// Adds records to the next flush. Nothing is durable yet.
    fn stage(&mut self, records: &[Record]);

    /// Makes everything staged durable. On error nothing staged counts as written:
    /// the staged records are dropped, and a later flush writes over them.
    fn flush(self) -> impl Future<Output = (Self, io::Result<()>)> + 'static;

    /// Bytes of durable records.
    fn durable_bytes(&self) -> u64;
}

/// The log of the embedded pipeline, on one O_DIRECT file.
pub struct EmbeddedLog {
    file: DmaFile,
    path: PathBuf,
    /// End of the durable records.
    durable_len: u64,
    /// The durable bytes of the block holding `durable_len`, from its start.
    tail: Vec<u8>,
    /// Framed records waiting for the next flush.
    staged: Vec<u8>,
    /// End of the bytes written past `durable_len` by failed flushes: the next write
    /// covers them with zeros so no stale record survives after the valid ones.
    dirty_end: u64,
}

/// Creates the log file if missing and makes sure it is not empty.
///
/// glommio 0.9 decides once per thread and device whether the device supports
/// polled I/O by reading the first block of the first DMA file opened there. On an
/// empty file that read succeeds without reaching the device, glommio concludes "yes",
/// and every later read fails with EOPNOTSUPP on devices without poll queues (virtio
/// disks, most cloud volumes). A block of zeros is an empty log, so a new log starts
/// as one; the file and its directory entry are synced so the file itself is durable.
fn prepare_file(path: &Path) -> io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("creating log {}: {e}", path.display())))?;
    if file.metadata()?.len() == 0 {
        // Written, not `set_len`: reading a hole does not reach the device either.
        std::os::unix::fs::FileExt::write_all_at(&file, &[0u8; LOG_BLOCK_BYTES], 0)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

/// Runs a system call until it is not interrupted; its result, or the error.
fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let r = call();
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn align_down(v: u64) -> u64 {
    v - v % LOG_BLOCK_BYTES as u64
}

fn align_up(v: u64) -> u64 {
    align_down(v + LOG_BLOCK_BYTES as u64 - 1)
}

impl EmbeddedLog {
    /// Opens (creates) the log file at `path`. Must run inside a glommio executor.
    pub async fn open(path: &Path) -> io::Result<Self> {
        prepare_file(path)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(path)
            .await
            .map_err(|e| io::Error::other(format!("opening log {}: {e}", path.display())))?;
        if LOG_BLOCK_BYTES as u64 % file.alignment() != 0 {
            return Err(io::Error::other(format!(
                "log {}: O_DIRECT alignment {} does not divide the block size {LOG_BLOCK_BYTES}",
                path.display(),
                file.alignment()
            )));
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            durable_len: 0,
            tail: Vec::new(),
            staged: Vec::new(),
            dirty_end: 0,
        })
    }

    /// Closes the file.
    pub async fn close(self) -> io::Result<()> {
        self.file.close().await.map_err(io::Error::from)
    }

    fn context(&self, what: &str, e: impl std::fmt::Display) -> io::Error {
        io::Error::other(format!("{what} log {}: {e}", self.path.display()))
    }

    async fn recover(&mut self, apply: &mut dyn FnMut(Record)) -> io::Result<Recovered> {
        let size = self
            .file
            .file_size()
            .await
            .map_err(|e| self.context("sizing", e))?;
        let mut carry: Vec<u8> = Vec::new();
        // File offset of `carry[0]`.
        let mut base = 0u64;
        let mut read_to = 0u64;
        let mut records = 0;
        let mut torn_tail = None;
        'read: loop {
            let mut pos = 0;
            loop {
                match decode_frame(&carry[pos..]) {
                    Decoded::Record(rec, n) => {
                        apply(rec);
                        records += 1;
                        pos += n;
                    }
                    Decoded::End(end) => {
                        torn_tail = Some(end);
                        base += pos as u64;
                        break 'read;
                    }
                    Decoded::Insufficient(_) => break,
                }
            }
            carry.drain(..pos);
            base += pos as u64;
            if read_to >= size {
                if !carry.is_empty() {
                    torn_tail = Some(End::Truncated);
                }
                break;
            }
            let chunk = self
                .file
                .read_at_aligned(read_to, REPLAY_CHUNK_BYTES)
                .await
                .map_err(|e| self.context("reading", e))?;
            if chunk.is_empty() {
                break;
            }
            carry.extend_from_slice(&chunk);
            read_to += chunk.len() as u64;
        }
        // Only zero padding after the valid records is a clean end.
        if torn_tail == Some(End::Zero) {
            torn_tail = None;
        }
        self.durable_len = base;
        let block_start = align_down(base);
        let in_block = (base - block_start) as usize;
        self.tail = if in_block == 0 {
            Vec::new()
        } else {
            let block = self
                .file
                .read_at_aligned(block_start, LOG_BLOCK_BYTES)
                .await
                .map_err(|e| self.context("reading", e))?;
            block[..in_block].to_vec()
        };
        // Whatever follows the valid records is garbage: cut the file after the block
        // holding their end; that block is rewritten, zero-padded, by the next flush.
        let keep = align_up(base).max(LOG_BLOCK_BYTES as u64);
        if size > keep {
            self.file
                .truncate(keep)
                .await
                .map_err(|e| self.context("truncating", e))?;
        }
        self.dirty_end = keep;
        Ok(Recovered {
            records,
            bytes: base,
            torn_tail,
        })
    }

    async fn write_staged(&mut self) -> io::Result<()> {
        let block_start = align_down(self.durable_len);
        let data_len = self.tail.len() + self.staged.len();
        let end = (block_start + data_len as u64).max(self.dirty_end);
        let len = (align_up(end) - block_start) as usize;
        let mut buf = self.file.alloc_dma_buffer(len);
        let bytes = buf.as_bytes_mut();
        bytes[..self.tail.len()].copy_from_slice(&self.tail);
        bytes[self.tail.len()..data_len].copy_from_slice(&self.staged);
        bytes[data_len..].fill(0);
        // From here on a failure may leave any of these bytes on disk.
        self.dirty_end = self.dirty_end.max(block_start + len as u64);
        let fd = self.file.as_raw_fd();
        let written = retry_eintr(|| {
            // SAFETY: `buf` is `len` initialised, aligned bytes that outlive the call.
            unsafe { libc::pwrite(fd, buf.as_ptr().cast(), len, block_start as libc::off_t) }
        })
        .map_err(|e| self.context("writing", e))?;
        if written != len {
            return Err(self.context("writing", format!("short write: {written} of {len} bytes")));
        }
        // SAFETY: fdatasync only reads the descriptor, which `self.file` keeps open.
        retry_eintr(|| unsafe { libc::fdatasync(fd) } as isize)
            .map_err(|e| self.context("syncing", e))?;
        // Durable. Keep the new partial block for the next write.
        let new_len = self.durable_len + self.staged.len() as u64;
        let new_block = align_down(new_len);
        let mut joined = std::mem::take(&mut self.tail);
        joined.extend_from_slice(&self.staged);
        joined.drain(..(new_block - block_start) as usize);
        self.tail = joined;
        self.durable_len = new_len;
        self.dirty_end = block_start + len as u64;
        Ok(())
    }
}

impl Log for EmbeddedLog {
    fn replay<'a>(
        &'a mut self,
        apply: &'a mut dyn FnMut(Record),
    ) -> impl Future<Output = io::Result<Recovered>> + 'a {
        self.recover(apply)
    }

    fn stage(&mut self, records: &[Record]) {
        for rec in records {
            encode_frame(rec, &mut self.staged);
        }
    }

    async fn flush(mut self) -> (Self, io::Result<()>) {
        let result = if self.staged.is_empty() {
            Ok(())
        } else {
            self.write_staged().await
        };
        self.staged.clear();
        (self, result)
    }

    fn durable_bytes(&self) -> u64 {
        self.durable_len
    }
}
