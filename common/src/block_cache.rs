//! A global allocator that keeps a few recently freed large blocks for
//! reuse, on top of the system allocator.
//!
//! Why: the agent and the master target fix glibc's mmap threshold (see
//! [`crate::alloc::tune_allocator`]), so every buffer of 256 KiB or more is
//! its own mapping, given back to the kernel when it is freed. That keeps
//! their frame memory bounded, but every transient buffer of that size also
//! costs a page fault and a cleared page per 4 KiB: tonic's encode and
//! decode buffers (one fresh 2 MiB buffer per message, because HTTP/2 still
//! holds the previous message's bytes when the next one is encoded), the
//! agent's wire copy of a frame and the master target's decompressed frames.
//! A profile of a full initial sync put a quarter of the agent's samples and
//! a tenth of the master target's in that fault path.
//!
//! This keeps at most [`CACHE_BLOCKS`] freed blocks of
//! [`crate::alloc::MMAP_THRESHOLD`] up to [`MAX_BLOCK`] bytes, and at most
//! [`CACHE_BYTES`] of them in all, and hands one back to the next request
//! it fits (at most twice the request, so a small request does not pin a
//! big block). Memory stays bounded: the cache adds at most
//! [`CACHE_BYTES`] to what the process uses, everything it does not keep
//! is freed at once as before, and a shrinking `realloc` goes to the system
//! allocator, which gives the tail back. General-purpose allocators (mimalloc
//! was measured) also remove the faults but keep far more memory: the
//! agent's peak RSS went from 281 to 520 MiB.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

use crate::alloc::MMAP_THRESHOLD;

/// Freed blocks kept at most.
pub const CACHE_BLOCKS: usize = 12;
/// Bytes of freed blocks kept at most.
pub const CACHE_BYTES: usize = 24 << 20;
/// Larger blocks are never kept.
pub const MAX_BLOCK: usize = 8 << 20;
/// What `malloc` aligns every block to: blocks with a larger alignment are
/// not kept, because the system allocator gets them another way.
const MALLOC_ALIGN: usize = 16;

/// One kept block: its address and its usable size.
#[derive(Clone, Copy)]
struct Kept {
    ptr: usize,
    size: usize,
}

struct Shelf {
    blocks: [Kept; CACHE_BLOCKS],
    len: usize,
    bytes: usize,
}

/// The system allocator with a small cache of large freed blocks. Install it
/// with `#[global_allocator]` in a binary.
pub struct BlockCache {
    kept: Mutex<Shelf>,
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

impl BlockCache {
    pub const fn new() -> BlockCache {
        BlockCache {
            kept: Mutex::new(Shelf {
                blocks: [Kept { ptr: 0, size: 0 }; CACHE_BLOCKS],
                len: 0,
                bytes: 0,
            }),
        }
    }

    /// Blocks and bytes kept now.
    pub fn kept(&self) -> (usize, usize) {
        let k = self.lock();
        (k.len, k.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shelf> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether blocks of this layout are kept.
    fn cacheable(layout: &Layout) -> bool {
        cfg!(all(target_os = "linux", target_env = "gnu"))
            && layout.align() <= MALLOC_ALIGN
            && (MMAP_THRESHOLD..=MAX_BLOCK).contains(&layout.size())
    }

    /// Takes the smallest kept block of at least `size` bytes and at most
    /// twice that.
    fn take(&self, size: usize) -> Option<*mut u8> {
        let mut k = self.lock();
        let mut best: Option<usize> = None;
        for i in 0..k.len {
            let b = k.blocks[i];
            if b.size >= size
                && b.size <= size.saturating_mul(2)
                && best.is_none_or(|j| b.size < k.blocks[j].size)
            {
                best = Some(i);
            }
        }
        let i = best?;
        let b = k.blocks[i];
        let len = k.len;
        k.blocks.copy_within(i + 1..len, i);
        k.len -= 1;
        k.bytes -= b.size;
        Some(b.ptr as *mut u8)
    }

    /// Keeps a freed block of `size` ≤ [`MAX_BLOCK`] bytes, evicting the
    /// oldest kept ones to make room; puts those in `evicted` (to be freed
    /// outside the lock) and returns how many.
    fn keep(&self, ptr: *mut u8, size: usize, evicted: &mut [Kept; CACHE_BLOCKS]) -> usize {
        let mut n = 0;
        let mut k = self.lock();
        while k.len > 0 && (k.len == CACHE_BLOCKS || k.bytes + size > CACHE_BYTES) {
            let oldest = k.blocks[0];
            let len = k.len;
            k.blocks.copy_within(1..len, 0);
            k.len -= 1;
            k.bytes -= oldest.size;
            evicted[n] = oldest;
            n += 1;
        }
        let len = k.len;
        k.blocks[len] = Kept {
            ptr: ptr as usize,
            size,
        };
        k.len += 1;
        k.bytes += size;
        n
    }
}

/// The size `malloc` actually gave a block (at least what was asked).
fn usable_size(ptr: *mut u8) -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `ptr` is a live block from this process's malloc.
    unsafe {
        libc::malloc_usable_size(ptr.cast())
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = ptr;
        0
    }
}

// SAFETY: every block handed out is either fresh from `System` or a block
// `System` handed out earlier with the same alignment (at most malloc's) and
// at least the requested size, which nobody else holds once it is kept.
// Blocks are only ever given back to `System` (free), which needs no size.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::cacheable(&layout) {
            if let Some(p) = self.take(layout.size()) {
                return p;
            }
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::cacheable(&layout) {
            if let Some(p) = self.take(layout.size()) {
                // SAFETY: the block has at least `layout.size()` bytes.
                unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                return p;
            }
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::cacheable(&layout) {
            let size = usable_size(ptr);
            if size <= MAX_BLOCK {
                let mut evicted = [Kept { ptr: 0, size: 0 }; CACHE_BLOCKS];
                let n = self.keep(ptr, size, &mut evicted);
                for b in &evicted[..n] {
                    // SAFETY: a block from `System` that nobody holds, with
                    // at least `b.size` bytes and malloc's alignment.
                    unsafe {
                        System.dealloc(
                            b.ptr as *mut u8,
                            Layout::from_size_align_unchecked(b.size, 1),
                        )
                    };
                }
                return;
            }
        }
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Only growth is served here. A shrink goes to the system allocator,
        // which gives the tail of a large block back (the agent's frame
        // bodies and the MT's closed interval indexes shrink to fit so that
        // what stays allocated is what they account for).
        if layout.align() <= MALLOC_ALIGN && new_size > layout.size() && new_size >= MMAP_THRESHOLD
        {
            // A block from the cache may already be big enough.
            if new_size <= usable_size(ptr) {
                return ptr;
            }
            // SAFETY: same alignment, valid size (the caller's contract).
            let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
            if Self::cacheable(&new_layout) {
                if let Some(p) = self.take(new_size) {
                    // SAFETY: `p` holds at least `new_size` bytes, more than
                    // the `layout.size()` bytes copied from `ptr`, and is not
                    // `ptr` (which is live, not kept).
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, p, layout.size());
                        self.dealloc(ptr, layout);
                    }
                    return p;
                }
            }
        }
        // SAFETY: forwarded unchanged (glibc resizes large blocks with
        // mremap).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: usize) -> Layout {
        Layout::from_size_align(n, 1).unwrap()
    }

    #[test]
    fn a_freed_large_block_is_reused_and_small_ones_are_not_kept() {
        let c = BlockCache::new();
        // SAFETY: each block is used within the layout it was allocated with
        // and freed once, with that layout.
        unsafe {
            let p = c.alloc(layout(2 << 20));
            p.write_bytes(7, 2 << 20);
            c.dealloc(p, layout(2 << 20));
            assert_eq!(c.kept().0, 1);
            // Too small for it (more than twice smaller): not taken.
            let q = c.alloc(layout(512 << 10));
            assert_ne!(q, p);
            c.dealloc(q, layout(512 << 10));
            // Fits: taken, and zeroed when asked.
            let r = c.alloc_zeroed(layout((2 << 20) - 100));
            assert_eq!(r, p);
            assert!(std::slice::from_raw_parts(r, (2 << 20) - 100)
                .iter()
                .all(|&b| b == 0));
            c.dealloc(r, layout((2 << 20) - 100));
            let small = c.alloc(layout(4096));
            c.dealloc(small, layout(4096));
            assert_eq!(c.kept().0, 2, "the two large blocks, not the small one");
        }
    }

    #[test]
    fn the_cache_stays_within_its_bounds() {
        let c = BlockCache::new();
        // SAFETY: each block is used within the layout it was allocated with
        // and freed once, with that layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..CACHE_BLOCKS + 5)
                .map(|_| c.alloc(layout(3 << 20)))
                .collect();
            for &p in &blocks {
                c.dealloc(p, layout(3 << 20));
            }
            let (n, bytes) = c.kept();
            assert!(
                bytes <= CACHE_BYTES && n <= CACHE_BLOCKS,
                "{n} blocks, {bytes} bytes"
            );
            assert!(n >= CACHE_BYTES / (4 << 20), "{n} blocks kept");
            // A block larger than MAX_BLOCK is never kept.
            let big = c.alloc(layout(MAX_BLOCK + 1));
            c.dealloc(big, layout(MAX_BLOCK + 1));
            assert_eq!(c.kept(), (n, bytes));
        }
    }

    #[test]
    fn realloc_keeps_the_content_through_the_cache() {
        let c = BlockCache::new();
        // SAFETY: each block is used within the layout it was allocated with
        // and freed once, with that layout.
        unsafe {
            let spare = c.alloc(layout(6 << 20));
            c.dealloc(spare, layout(6 << 20));
            let p = c.alloc(layout(MMAP_THRESHOLD));
            for i in 0..MMAP_THRESHOLD {
                *p.add(i) = (i % 251) as u8;
            }
            let q = c.realloc(p, layout(MMAP_THRESHOLD), 4 << 20);
            assert_eq!(q, spare, "grown into the kept block");
            for i in 0..MMAP_THRESHOLD {
                assert_eq!(*q.add(i), (i % 251) as u8);
            }
            // Growing within the block keeps it in place.
            let r = c.realloc(q, layout(4 << 20), 5 << 20);
            assert_eq!(r, q);
            // A shrink gives the rest back, even with a fitting block kept
            // (it once copied the old size into that smaller block).
            let small = c.alloc(layout(MMAP_THRESHOLD));
            c.dealloc(small, layout(MMAP_THRESHOLD));
            let s = c.realloc(r, layout(5 << 20), MMAP_THRESHOLD);
            assert!(usable_size(s) < 1 << 20, "{} bytes kept", usable_size(s));
            for i in 0..MMAP_THRESHOLD {
                assert_eq!(*s.add(i), (i % 251) as u8);
            }
            c.dealloc(s, layout(MMAP_THRESHOLD));
        }
    }
}
