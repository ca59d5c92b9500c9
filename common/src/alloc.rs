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

/// Allocations of at least this size are their own mapping.
pub const MMAP_THRESHOLD: usize = 256 << 10;

/// Fixes glibc's mmap threshold at [`MMAP_THRESHOLD`] for the whole
/// process, so every buffer that large is given back to the kernel when it
/// is freed, whichever thread frees it. The cost is one page fault per 4 KiB
/// of each fresh buffer, which is why hot paths reuse their large buffers.
/// Does nothing with another C library or allocator.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; any value is valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
