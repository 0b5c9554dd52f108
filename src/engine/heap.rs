//! How the process's C heap (glibc's malloc, which ONNX Runtime allocates from) gives memory
//! back. A daemon that swaps models must end each swap where it started, and glibc's defaults
//! do not: after the first large block is freed it raises its mmap threshold (up to 32 MiB),
//! so the next model's tensors come from heap arenas, one per thread that allocated (up to
//! eight per core), and stay resident once freed. Measured on the soak (SmolLM2, a swap every
//! 12 s for 3 min): 631 MiB with one model loaded grew to 982 MiB with glibc's defaults.
//!
//! [`configure`] fixes the thresholds (large blocks always mapped, so freeing one unmaps it)
//! and caps the arenas; [`release_freed`] hands the free tops of every arena back after a model
//! is unloaded. Other C libraries (musl) keep their own policy and both are no-ops there.

/// Allocations this large or larger are mapped on their own, and unmapped when freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 256 * 1024;

/// Heap arenas at most: the engine's threads share them (its work is in large, mapped blocks).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Sets the heap's policy; call once, before the process starts threads.
pub fn configure() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only sets parameters of the allocator; called before other threads.
    unsafe {
        // Setting a threshold also stops glibc from raising it (and the trim threshold) as
        // blocks are freed.
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Gives the free memory at the top of each heap arena back to the system (after a model
/// was unloaded).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` takes the allocator's own locks; safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
