//! The async runtime: one worker thread per CPU the process may use, and, when asked
//! (`runtime.pin_workers`) and there is exactly one worker for each of them, each
//! worker kept on a CPU of its own.
//!
//! Why: a message to a busy room wakes hundreds of waiting `/sync` requests at once.
//! Every worker then has work, but some kernels (those that pack the threads of a
//! lightly loaded virtual machine onto few CPUs) leave two workers time-sharing one
//! CPU while the other idles, for as long as the burst lasts. A worker that may run
//! only on its own CPU cannot be packed. Threads for blocking work (log syncs,
//! password hashing) and RocksDB's own threads still run anywhere.

use std::{
    cell::Cell,
    io,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::config::RuntimeConfig;

/// The multi-threaded runtime Salon serves on.
pub fn build(config: &RuntimeConfig) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if config.pin_workers {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(plan) = allowed_cpus().and_then(|cpus| pin_plan(&cpus, workers)) {
            builder.worker_threads(workers);
            pin_workers(&mut builder, plan);
        }
    }
    builder.build()
}

/// The CPU for each worker, in the order workers first go idle (every allowed CPU,
/// one each); `None` when pinning would not help: a single CPU, or more CPUs than
/// workers (the kernel then has room to spread them by itself), or fewer (some would
/// have to share).
pub fn pin_plan(allowed: &[usize], workers: usize) -> Option<Vec<usize>> {
    (allowed.len() >= 2 && allowed.len() == workers).then(|| allowed.to_vec())
}

/// Pin the workers as `plan` says; every other runtime thread may use all of its CPUs.
fn pin_workers(builder: &mut tokio::runtime::Builder, plan: Vec<usize>) {
    thread_local! {
        /// Whether this thread is a worker that has taken its CPU.
        static PINNED: Cell<bool> = const { Cell::new(false) };
    }
    let next = Arc::new(AtomicUsize::new(0));
    let allowed = plan.clone();
    // A thread starts with the affinity of the thread that spawned it: a blocking
    // thread started from a pinned worker would be held to that worker's CPU.
    builder.on_thread_start(move || {
        if let Err(e) = set_affinity(&allowed) {
            tracing::warn!("cannot let a new runtime thread run on every CPU: {e}");
        }
    });
    // Only workers park; each takes the next CPU the first time it does.
    builder.on_thread_park(move || {
        if PINNED.with(|p| p.replace(true)) {
            return;
        }
        let Some(&cpu) = plan.get(next.fetch_add(1, Ordering::Relaxed)) else {
            return;
        };
        if let Err(e) = set_affinity(&[cpu]) {
            tracing::warn!("cannot keep a runtime worker on CPU {cpu}: {e}");
        }
    });
}

/// The CPUs the calling thread may run on; `None` where that cannot be known.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an all-zero cpu_set_t is the empty set; sched_getaffinity fills at
        // most the size given.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) };
        if r != 0 {
            return None;
        }
        // SAFETY: CPU_ISSET reads a bit of the set, for indices within its size.
        let cpus = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect();
        Some(cpus)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Let the calling thread run only on `cpus`.
fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in `allowed_cpus`; CPU_SET writes a bit within the set's size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        let r = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = cpus;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_pinned_only_one_to_each_cpu() {
        assert_eq!(pin_plan(&[0, 1], 2), Some(vec![0, 1]));
        assert_eq!(pin_plan(&[2, 5, 7], 3), Some(vec![2, 5, 7]));
        assert_eq!(pin_plan(&[0], 1), None, "one CPU: nothing to spread");
        assert_eq!(pin_plan(&[0, 1, 2, 3], 2), None, "room to spread");
        assert_eq!(pin_plan(&[0, 1], 4), None, "workers would share");
    }

    #[test]
    fn pinned_workers_keep_to_their_cpus_and_blocking_threads_do_not() {
        let Some(all) = allowed_cpus() else { return };
        let runtime = build(&RuntimeConfig { pin_workers: true }).unwrap();
        // Let every worker go idle once, which is when it takes its CPU.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let (workers, blocking) = runtime.block_on(async {
            let mut workers = Vec::new();
            for _ in 0..64 {
                workers.push(
                    tokio::spawn(async {
                        tokio::task::yield_now().await;
                        allowed_cpus().unwrap()
                    })
                    .await
                    .unwrap(),
                );
            }
            // A blocking thread started from a worker.
            let blocking = tokio::spawn(async {
                tokio::task::spawn_blocking(|| allowed_cpus().unwrap())
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
            (workers, blocking)
        });
        assert_eq!(blocking, all, "blocking threads run on every CPU");
        let workers_n = std::thread::available_parallelism().unwrap().get();
        if pin_plan(&all, workers_n).is_some() {
            for w in &workers {
                assert_eq!(w.len(), 1, "a worker ran with affinity {w:?}");
            }
        } else {
            for w in &workers {
                assert_eq!(w, &all, "nothing is pinned on this machine");
            }
        }
    }
}
