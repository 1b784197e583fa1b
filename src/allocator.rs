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

/// How often the process's CPU time is looked at (one cheap system call).
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// The process is quiet when it used less CPU than this since the last look (5 % of one
/// core): a burst of work is over.
const QUIET_CPU: Duration = Duration::from_millis(25);

/// The allocator is looked at only in a quiet moment after at least this much work
/// since it was last looked at: a burst, not the odd request. (A thousand long-polls
/// answered and their connections closed take about 20 ms.)
const WORK_BEFORE_LOOKING: Duration = Duration::from_millis(10);

/// How much more free memory the allocator must hold than after the last trim.
const TRIM_AFTER_FREEING: usize = 4 * 1024 * 1024;

/// Decides when to trim from the free memory the allocator holds, looked at now and
/// then.
#[derive(Debug, Default)]
struct TrimPolicy {
    /// Free bytes after the last trim, or the fewest since (none before the first:
    /// what starting up freed counts).
    baseline: usize,
}

impl TrimPolicy {
    /// Whether to trim now that the allocator holds `free` bytes it could hand back.
    fn should_trim(&mut self, free: usize) -> bool {
        if free < self.baseline {
            self.baseline = free;
            return false;
        }
        free - self.baseline >= TRIM_AFTER_FREEING
    }

    /// A trim left the allocator holding `free` bytes (the chunks stay free in its
    /// books; their pages are what goes back).
    fn trimmed(&mut self, free: usize) {
        self.baseline = free;
    }
}

/// Hand freed memory back to the system after bursts; runs until the task is aborted.
///
/// glibc returns only the top of each heap by itself: after a thousand connections
/// close, the pages they used in the middle of the heap stay resident although free.
/// `malloc_trim` releases those. Both it and `mallinfo2`, which tells how much is
/// free, walk every free chunk with each arena locked, so nothing here runs while the
/// process is busy: read every second on a worker, `mallinfo2` alone took 1.5 ms each
/// time once the heap had served a 100,000-event room. The allocator is looked at, on
/// a blocking thread, in the first quiet moment after some work, and trimmed when it
/// holds [`TRIM_AFTER_FREEING`] more free memory than after the last trim.
pub async fn trim_after_bursts() {
    let Some(mut cpu_before) = process_cpu() else {
        return;
    };
    if free_bytes().is_none() {
        return;
    }
    let mut cpu_at_last_look = Duration::ZERO;
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is at once: the first look waits one interval.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(cpu) = process_cpu() else {
            return;
        };
        let quiet = cpu.saturating_sub(cpu_before) < QUIET_CPU;
        cpu_before = cpu;
        if !quiet || cpu.saturating_sub(cpu_at_last_look) < WORK_BEFORE_LOOKING {
            continue;
        }
        let look = tokio::task::spawn_blocking(move || look_and_trim(policy)).await;
        let Ok(looked) = look else {
            return;
        };
        policy = looked;
        // The look's own CPU is not work that frees memory.
        cpu_before = process_cpu().unwrap_or(cpu);
        cpu_at_last_look = cpu_before;
    }
}

/// Read how much the allocator holds free and trim it when the policy says so.
fn look_and_trim(mut policy: TrimPolicy) -> TrimPolicy {
    let Some(free) = free_bytes() else {
        return policy;
    };
    if policy.should_trim(free) {
        let started = std::time::Instant::now();
        release_free_memory();
        policy.trimmed(free_bytes().unwrap_or(free));
        tracing::debug!(
            free_mib = free / (1024 * 1024),
            took_us = started.elapsed().as_micros() as u64,
            "freed memory handed back to the system"
        );
    }
    policy
}

/// CPU time used so far by every thread of the process.
fn process_cpu() -> Option<Duration> {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &raw mut t) };
    (r == 0).then(|| Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

/// Bytes the program has allocated and not freed; `None` where the allocator cannot
/// tell. It walks the allocator's free chunks with its arenas locked: not for a hot
/// path, nor for a timer.
pub fn in_use() -> Option<usize> {
    glibc::in_use()
}

/// Bytes the allocator holds free (in its bins and at the top of its heaps); `None`
/// where it cannot tell. Walks its free chunks like [`in_use`].
fn free_bytes() -> Option<usize> {
    glibc::free_bytes()
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

    /// Bytes in free chunks, the top chunks of the heaps included.
    pub fn free_bytes() -> Option<usize> {
        // SAFETY: as in `in_use`.
        let info = unsafe { mallinfo2() };
        Some(info.fordblks)
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

    pub fn free_bytes() -> Option<usize> {
        None
    }

    pub fn trim() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_freeing() {
        let mut p = TrimPolicy::default();
        let mib = 1024 * 1024;
        assert!(
            !p.should_trim(3 * mib),
            "a little freed is not worth a walk"
        );
        assert!(p.should_trim(40 * mib), "40 MiB freed since the start");
        p.trimmed(40 * mib);
        assert!(!p.should_trim(40 * mib), "already trimmed at this level");
        assert!(!p.should_trim(30 * mib), "free memory was used again");
        assert!(!p.should_trim(33 * mib));
        assert!(
            p.should_trim(34 * mib),
            "4 MiB more than the new, lower level"
        );
    }

    #[test]
    fn the_process_cpu_time_moves() {
        let before = process_cpu().expect("a CPU time");
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        assert!(process_cpu().unwrap() > before, "{x}");
    }
}
