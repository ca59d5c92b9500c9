//! The allocator setting of the components that hand frame-sized buffers
//! from one thread to another (the agent and the master target).
//!
//! Why: glibc's mmap threshold is dynamic. After the first free of a mapped
//! MiB-sized buffer it rises to that size (up to 32 MiB), so later buffers
//! come from per-thread arenas, which only shrink from the top and each keep
//! their own peak. A process whose 1-4 MiB buffers are allocated on one
//! thread and freed on another then holds far more than it uses: the agent
//! reached its change-buffer limit plus 120-230 MiB, and the master target's
//! RSS climbed through a bench run from 191 to 319 MiB (170 MiB with the
//! threshold fixed).

use std::sync::Mutex;

/// Allocations of at least this size are their own mapping.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] for the whole
/// process, so every buffer that large is given back to the kernel when it
/// is freed, whichever thread frees it. The cost is one page fault per 4 KiB
/// of each fresh buffer, which is why hot paths reuse their large buffers
/// and the binaries that call this install
/// [`crate::block_cache::BlockCache`] for the transient ones.
/// Does nothing with another C library or allocator.
pub fn tune_allocator() {
    crate::sys::set_mmap_threshold(MMAP_THRESHOLD);
}

/// Large buffers kept for reuse, so a hot path does not pay a page fault
/// per 4 KiB of a fresh mapping for every buffer (see
/// [`tune_allocator`]). Buffers can be taken on one thread and given back
/// on another.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Buffers kept at most.
    keep: usize,
}

impl BufferPool {
    /// A pool that keeps at most `keep` buffers given back.
    pub fn new(keep: usize) -> BufferPool {
        BufferPool {
            free: Mutex::new(Vec::new()),
            keep,
        }
    }

    /// An empty buffer that was given back, if the pool holds one.
    pub fn take(&self) -> Option<Vec<u8>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    /// Buffers held now.
    pub fn kept(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Keeps `buf`, emptied, for a later [`BufferPool::take`], unless the
    /// pool already holds `keep` buffers (then it is freed).
    pub fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}
