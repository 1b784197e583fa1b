//! The async runtime: one worker thread per CPU the process may use, and, when there is
//! exactly one worker for each of them, each worker held to a CPU of its own while a
//! burst of work lasts (`runtime.spread_bursts`, on by default) or always
//! (`runtime.pin_workers`).
//!
//! Why: a message to a busy room wakes hundreds of waiting `/sync` requests at once.
//! Every worker then has work, but some kernels (those that pack the threads of a
//! lightly loaded virtual machine onto few CPUs) leave two workers time-sharing one
//! CPU while the other idles, for as long as the burst lasts. A worker that may run
//! only on its own CPU cannot be packed. Outside bursts the workers run anywhere, so
//! that none is held to a CPU another process (a proxy in front of Salon) is busy on.
//! Threads for blocking work (log syncs, password hashing) and RocksDB's own threads
//! always run anywhere.

use std::{
    cell::{Cell, OnceCell},
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::config::RuntimeConfig;

/// Waiters woken at once that make a burst worth spreading: 32 answers are about half a
/// millisecond of work, two orders above what holding and letting go the workers costs
/// (a few system calls).
pub const BURST_WAITERS: usize = 32;

/// How long after a burst began the workers stay held at the least; each lets go the
/// first time it goes idle or wakes after that, so a worker busy with the burst keeps
/// its CPU to the end, and a short pause in the middle (while the first of many
/// identical requests builds the answer the others share) does not let it go early.
const SPREAD_FOR: Duration = Duration::from_millis(3);

/// The multi-threaded runtime Salon serves on.
pub fn build(config: &RuntimeConfig) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if config.pin_workers || config.spread_bursts {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        if let Some(plan) = allowed_cpus().and_then(|cpus| pin_plan(&cpus, workers)) {
            builder.worker_threads(workers);
            if config.pin_workers {
                pin_workers(&mut builder, plan);
            } else {
                spread_bursts(&mut builder, plan);
            }
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
        if let Err(e) = set_affinity(0, &allowed) {
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
        if let Err(e) = set_affinity(0, &[cpu]) {
            tracing::warn!("cannot keep a runtime worker on CPU {cpu}: {e}");
        }
    });
}

thread_local! {
    /// The spreading of the runtime this thread belongs to, if it spreads bursts.
    static SPREAD: OnceCell<Arc<Spread>> = const { OnceCell::new() };
    /// For a worker: whether it has put itself on its runtime's list.
    static LISTED: Cell<bool> = const { Cell::new(false) };
    /// For a worker: the last burst it has let go of.
    static LET_GO: Cell<u64> = const { Cell::new(0) };
}

/// Tell the runtime that `waiters` requests were just woken at once. Called from one
/// of its threads, a burst of at least [`BURST_WAITERS`] holds each worker to a CPU of
/// its own for as long as the burst keeps it busy; elsewhere this does nothing.
pub fn burst(waiters: usize) {
    if waiters < BURST_WAITERS {
        return;
    }
    SPREAD.with(|s| {
        if let Some(spread) = s.get() {
            spread.begin();
        }
    });
}

/// The workers of one runtime, held to a CPU each while a burst lasts.
struct Spread {
    /// Every CPU the process may use, as many as there are workers.
    cpus: Vec<usize>,
    /// The workers' thread ids, each listed the first time it goes idle.
    workers: Mutex<Vec<libc::pid_t>>,
    /// Bursts that held the workers so far.
    bursts: AtomicU64,
    /// Until when, in nanoseconds from `epoch`, the current burst holds the workers.
    until: AtomicU64,
    epoch: Instant,
    /// Set when the kernel refused: spreading is then given up.
    refused: AtomicBool,
}

impl Spread {
    fn new(cpus: Vec<usize>) -> Self {
        Self {
            cpus,
            workers: Mutex::new(Vec::new()),
            bursts: AtomicU64::new(0),
            until: AtomicU64::new(0),
            epoch: Instant::now(),
            refused: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Hold every worker to a CPU of its own: the calling worker to the CPU it is on,
    /// the others to the rest.
    fn begin(&self) {
        if self.refused.load(Ordering::Relaxed) {
            return;
        }
        let now = self.now();
        let until = now.saturating_add(SPREAD_FOR.as_nanos() as u64);
        if self.until.fetch_max(until, Ordering::AcqRel) > now {
            // Already held for a burst still under way: only its end moved.
            return;
        }
        let held = {
            let workers = self.workers.lock();
            let me = current_tid();
            let here = current_cpu().filter(|c| workers.contains(&me) && self.cpus.contains(c));
            let mut free = self.cpus.iter().filter(|&&c| Some(c) != here);
            workers.iter().try_for_each(|&tid| {
                let cpu = match here {
                    Some(here) if tid == me => here,
                    _ => match free.next() {
                        Some(&cpu) => cpu,
                        None => return Ok(()),
                    },
                };
                set_affinity(tid, &[cpu])
            })
        };
        match held {
            Ok(()) => {
                self.bursts.fetch_add(1, Ordering::Release);
            }
            Err(e) => self.refuse(&e),
        }
    }

    /// Called by each worker as it goes idle or wakes: it lets go of its CPU once the
    /// burst that held it is over.
    fn worker_turns(&self) {
        if !LISTED.with(|l| l.replace(true)) {
            self.workers.lock().push(current_tid());
        }
        let burst = self.bursts.load(Ordering::Acquire);
        if LET_GO.with(Cell::get) == burst || self.now() < self.until.load(Ordering::Acquire) {
            return;
        }
        LET_GO.with(|l| l.set(burst));
        if let Err(e) = set_affinity(0, &self.cpus) {
            self.refuse(&e);
        }
    }

    fn refuse(&self, e: &io::Error) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot hold runtime workers to CPUs of their own: {e}");
        }
        // Whatever was held already goes back to every CPU.
        for &tid in self.workers.lock().iter() {
            let _ = set_affinity(tid, &self.cpus);
        }
    }
}

/// Let the runtime's workers be held to a CPU each during bursts (see [`burst`]).
fn spread_bursts(builder: &mut tokio::runtime::Builder, cpus: Vec<usize>) {
    let spread = Arc::new(Spread::new(cpus));
    let for_start = spread.clone();
    builder.on_thread_start(move || {
        SPREAD.with(|s| {
            let _ = s.set(for_start.clone());
        });
        // A thread starts with the affinity of the thread that spawned it: a blocking
        // thread started from a held worker would keep that worker's CPU.
        if !for_start.refused.load(Ordering::Relaxed) {
            let _ = set_affinity(0, &for_start.cpus);
        }
    });
    let for_park = spread.clone();
    builder.on_thread_park(move || for_park.worker_turns());
    builder.on_thread_unpark(move || spread.worker_turns());
}

/// The calling thread's id.
fn current_tid() -> libc::pid_t {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}

/// The CPU the calling thread is running on.
pub(crate) fn current_cpu() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sched_getcpu has no preconditions.
        usize::try_from(unsafe { libc::sched_getcpu() }).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The CPUs the calling thread may run on; `None` where that cannot be known.
pub fn allowed_cpus() -> Option<Vec<usize>> {
    affinity(0)
}

/// The CPUs thread `tid` (0: the calling thread) may run on.
fn affinity(tid: libc::pid_t) -> Option<Vec<usize>> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: an all-zero cpu_set_t is the empty set; sched_getaffinity fills at
        // most the size given.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::sched_getaffinity(tid, size_of::<libc::cpu_set_t>(), &mut set) };
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
        let _ = tid;
        None
    }
}

/// Let thread `tid` (0: the calling thread) run only on `cpus`.
pub(crate) fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in `allowed_cpus`; CPU_SET writes a bit within the set's size.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
            unsafe { libc::CPU_SET(c, &mut set) };
        }
        let r = unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (tid, cpus);
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
        let runtime = build(&RuntimeConfig {
            pin_workers: true,
            spread_bursts: false,
        })
        .unwrap();
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

    #[test]
    fn a_burst_holds_each_worker_to_a_cpu_of_its_own_until_it_is_over() {
        let Some(all) = allowed_cpus() else { return };
        let workers_n = std::thread::available_parallelism().unwrap().get();
        let spreads = pin_plan(&all, workers_n).is_some();
        let runtime = build(&RuntimeConfig::default()).unwrap();
        // Let every worker go idle once, which is when it is listed.
        std::thread::sleep(Duration::from_millis(200));
        runtime.block_on(async move {
            let all_ = all.clone();
            tokio::spawn(async move {
                burst(BURST_WAITERS - 1);
                assert_eq!(allowed_cpus().unwrap(), all_, "too few waiters for a burst");

                burst(1000);
                let Some(spread) = SPREAD.with(|s| s.get().cloned()) else {
                    assert!(!spreads, "the runtime should spread bursts");
                    assert_eq!(allowed_cpus().unwrap(), all_);
                    return;
                };
                let workers = spread.workers.lock().clone();
                assert_eq!(workers.len(), workers_n, "every worker is listed");
                let mut held: Vec<usize> = workers
                    .iter()
                    .map(|&tid| match affinity(tid).unwrap()[..] {
                        [cpu] => cpu,
                        ref cpus => panic!("worker {tid} may run on {cpus:?}"),
                    })
                    .collect();
                assert_eq!(
                    allowed_cpus().unwrap(),
                    vec![current_cpu().unwrap()],
                    "the worker that saw the burst stays where it is"
                );
                held.sort_unstable();
                assert_eq!(held, all_, "one CPU for each worker");

                // Busy past the burst's least length: still held.
                std::thread::sleep(SPREAD_FOR * 2);
                assert_eq!(allowed_cpus().unwrap().len(), 1);
                // Idle, then woken: let go.
                tokio::time::sleep(Duration::from_millis(20)).await;
                assert_eq!(allowed_cpus().unwrap(), all_, "a worker lets go once idle");
            })
            .await
            .unwrap();
            // Blocking threads run anywhere, even when started during a burst.
            let blocking = tokio::spawn(async {
                burst(1000);
                tokio::task::spawn_blocking(|| allowed_cpus().unwrap())
                    .await
                    .unwrap()
            })
            .await
            .unwrap();
            assert_eq!(blocking, all);
        });
    }

    #[test]
    fn a_refused_burst_gives_up_spreading_and_lets_go() {
        let Some(all) = allowed_cpus() else { return };
        let spread = Spread::new(all.clone());
        // A thread that is gone: the kernel refuses to hold it.
        spread.workers.lock().push(libc::pid_t::MAX);
        spread.begin();
        assert!(spread.refused.load(Ordering::Relaxed));
        assert_eq!(spread.bursts.load(Ordering::Relaxed), 0);
        // Given up for good: a later burst does nothing.
        spread.until.store(0, Ordering::Relaxed);
        spread.begin();
        assert_eq!(spread.bursts.load(Ordering::Relaxed), 0);
        assert_eq!(allowed_cpus().unwrap(), all);
    }
}
