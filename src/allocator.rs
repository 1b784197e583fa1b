//! The process allocator (glibc's malloc on Linux): tuned once at start, and asked to
//! give memory back to the system after a burst of work has freed much of it.

use std::time::Duration;

/// Keep the allocator from holding on to memory it no longer needs. Password hashing
/// (argon2) allocates 19 MiB per hash; with glibc's default, freed blocks that large
/// stay in per-thread arenas and the resident size climbs by tens of MiB per thread.
/// A fixed mmap threshold returns them to the system at once, and fewer arenas keep
/// fragmentation down on small machines.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's mallopt(3) parameters (malloc.h).
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        const M_ARENA_MAX: std::ffi::c_int = -8;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt only changes allocator parameters; called before other threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 * 1024);
            mallopt(M_ARENA_MAX, 2);
        }
    }
}

/// How often the allocator's use is looked at.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// How far the memory in use must have fallen from its peak since the last trim before
/// the free pages are handed back.
const TRIM_AFTER_FREEING: usize = 4 * 1024 * 1024;

/// Decides when to trim from the bytes in use, looked at now and then.
#[derive(Debug, Default)]
struct TrimPolicy {
    peak: usize,
}

impl TrimPolicy {
    /// Whether to trim now that `in_use` bytes are allocated.
    fn should_trim(&mut self, in_use: usize) -> bool {
        self.peak = self.peak.max(in_use);
        if self.peak - in_use >= TRIM_AFTER_FREEING {
            self.peak = in_use;
            true
        } else {
            false
        }
    }
}

/// Hand freed memory back to the system after bursts; runs until the task is aborted.
///
/// glibc returns only the top of each heap by itself: after a thousand connections
/// close, the pages they used in the middle of the heap stay resident although free.
/// `malloc_trim` releases those, at the cost of a walk over the free chunks; it runs only
/// when the memory in use has fallen by [`TRIM_AFTER_FREEING`] from its peak, on a
/// blocking thread.
pub async fn trim_after_bursts() {
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(in_use) = in_use() else {
            return;
        };
        if policy.should_trim(in_use) {
            let started = std::time::Instant::now();
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            tracing::debug!(
                in_use_mib = in_use / (1024 * 1024),
                took_us = started.elapsed().as_micros() as u64,
                "freed memory handed back to the system"
            );
        }
    }
}

/// Bytes the program has allocated and not freed; `None` where the allocator cannot
/// tell.
pub fn in_use() -> Option<usize> {
    glibc::in_use()
}

/// Hand the allocator's free pages back to the system (a walk over its free chunks).
pub fn release_free_memory() {
    glibc::trim();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    /// `struct mallinfo2` of malloc.h (glibc 2.33 and later).
    #[repr(C)]
    struct MallInfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }

    unsafe extern "C" {
        fn mallinfo2() -> MallInfo2;
        fn malloc_trim(pad: usize) -> std::ffi::c_int;
    }

    /// Bytes allocated and not freed, in the heaps and in blocks mapped on their own.
    pub fn in_use() -> Option<usize> {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { mallinfo2() };
        Some(info.uordblks + info.hblkhd)
    }

    pub fn trim() {
        // SAFETY: malloc_trim releases free pages; it never touches memory in use.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod glibc {
    pub fn in_use() -> Option<usize> {
        None
    }

    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_fall_from_the_peak() {
        let mut p = TrimPolicy::default();
        let mib = 1024 * 1024;
        assert!(!p.should_trim(10 * mib));
        assert!(!p.should_trim(40 * mib), "growing is no reason to trim");
        assert!(
            !p.should_trim(37 * mib),
            "a small fall is not a burst ending"
        );
        assert!(p.should_trim(30 * mib), "10 MiB below the peak");
        assert!(!p.should_trim(30 * mib), "already trimmed at this level");
        assert!(!p.should_trim(28 * mib));
        assert!(
            p.should_trim(25 * mib),
            "5 MiB below the level of the last trim"
        );
    }
}
