//! A few frame-sized buffers kept for reuse, so a steady stream of large
//! writes does not pay for fresh memory on every frame.
//!
//! Why: the agent maps each frame buffer on its own (see
//! [`rebound_common::alloc::tune_allocator`]) and unmaps it when it is done
//! with it, when the process server acknowledges the frame (tonic encodes
//! the frame from this body, see [`crate::ingest_codec`]). A profile of fio
//! 1 MiB sequential writes put about a fifth of the agent's CPU in page
//! faults, page clearing and unmapping for those fresh buffers. A buffer
//! taken from here has its pages already.
//!
//! Memory: a buffer given back is kept only while the pool holds fewer than
//! [`POOL_FRAMES`]. A fresh buffer is resident only as far as it was written,
//! so what the pool adds beyond what the change buffer accounts for is at
//! most [`POOL_FRAMES`] × [`BODY_CAPACITY`] (12 MiB): the kept buffers, or
//! the slack of reused ones that hold a smaller frame.

use rebound_common::alloc::BufferPool;

use crate::capture::{FRAME_TARGET, MAX_RECORD_DATA};

/// Bodies kept at most.
pub const POOL_FRAMES: usize = 4;
/// Capacity of every body the pool hands out: a frame is handed over once
/// its body reaches [`FRAME_TARGET`], and the record that crosses it is at
/// most [`MAX_RECORD_DATA`] plus its header, so a frame never grows it.
pub const BODY_CAPACITY: usize = FRAME_TARGET + MAX_RECORD_DATA + 4096;

#[derive(Debug)]
pub struct FramePool {
    free: BufferPool,
}

impl Default for FramePool {
    fn default() -> FramePool {
        FramePool {
            free: BufferPool::new(POOL_FRAMES),
        }
    }
}

impl FramePool {
    /// A body to build the next frame in: a kept one, or a new allocation of
    /// [`BODY_CAPACITY`] (only the pages written to become resident).
    pub fn take(&self) -> Vec<u8> {
        self.free
            .take()
            .unwrap_or_else(|| Vec::with_capacity(BODY_CAPACITY))
    }

    /// Gives back the body of an acknowledged frame. It is kept if it still
    /// has the full capacity and the pool is not full; otherwise freed.
    pub fn give(&self, body: Vec<u8>) {
        if body.capacity() >= BODY_CAPACITY {
            self.free.give(body);
        }
    }

    /// Buffers kept now.
    pub fn kept(&self) -> usize {
        self.free.kept()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_pool_frames_full_size_bodies() {
        let pool = FramePool::default();
        let bodies: Vec<Vec<u8>> = (0..POOL_FRAMES + 2).map(|_| pool.take()).collect();
        assert!(bodies.iter().all(|b| b.capacity() >= BODY_CAPACITY));
        for b in bodies {
            pool.give(b);
        }
        assert_eq!(pool.kept(), POOL_FRAMES);
        // A body that was shrunk is not worth keeping.
        pool.take();
        pool.give(Vec::with_capacity(1024));
        assert_eq!(pool.kept(), POOL_FRAMES - 1);
    }

    #[test]
    fn a_reused_body_keeps_its_allocation() {
        let pool = FramePool::default();
        let mut b = pool.take();
        b.extend_from_slice(&[7u8; 4096]);
        let ptr = b.as_ptr();
        pool.give(b);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty() && again.capacity() >= BODY_CAPACITY);
    }
}
