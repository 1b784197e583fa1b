//! Memory freed in the middle of the heap goes back to the system when Salon asks the
//! allocator for it, and by itself once a burst of work is over; what is still in use
//! is untouched. A test binary of its own: the resident size it reads is this
//! process's alone (and its tests take turns).

#![cfg(all(target_os = "linux", target_env = "gnu"))]

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb / 1024.0
}

/// The tests read the whole process's resident size: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// 64 MiB allocated in blocks below the mmap threshold, each filled with its number.
fn fill() -> Vec<Vec<u8>> {
    const BLOCK: usize = 16 * 1024;
    const BLOCKS: usize = 4096;
    (0..BLOCKS).map(|i| vec![(i % 251) as u8; BLOCK]).collect()
}

/// Free all blocks but every sixteenth: the heap's top stays in use, so glibc's own
/// trimming of the top cannot give any of the freed blocks back. The blocks kept, with
/// their numbers.
fn free_most(blocks: Vec<Vec<u8>>) -> Vec<(usize, Vec<u8>)> {
    blocks
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 16 == 15)
        .collect()
}

/// A burst: [`fill`], then [`free_most`].
fn burst() -> Vec<(usize, Vec<u8>)> {
    free_most(fill())
}

fn check_kept(kept: &[(usize, Vec<u8>)]) {
    for (i, b) in kept {
        assert!(
            b.iter().all(|&x| x == (*i % 251) as u8),
            "block {i} changed"
        );
    }
}

#[test]
fn memory_freed_by_a_burst_goes_back_once_the_process_is_quiet() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    salon::allocator::tune();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let trimmer = tokio::spawn(salon::allocator::trim_after_bursts());
        // The burst: the allocations, and some more work on top.
        let kept = burst();
        let busy_until = std::time::Instant::now() + std::time::Duration::from_millis(150);
        let mut x = 0u64;
        while std::time::Instant::now() < busy_until {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
        }
        let after_burst = rss_mib();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            let now = rss_mib();
            if after_burst - now >= 40.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still {now:.1} MiB resident 10 s after the burst ({after_burst:.1} MiB right after it)"
            );
        }
        check_kept(&kept);
        trimmer.abort();
    });
}

#[test]
fn freed_pages_in_the_middle_of_the_heap_are_handed_back() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    salon::allocator::tune();
    let blocks = fill();
    let used_full = salon::allocator::in_use().expect("glibc reports its use");
    let kept = free_most(blocks);
    let used_after_free = salon::allocator::in_use().unwrap();
    assert!(
        used_full - used_after_free >= 56 * 1024 * 1024,
        "in use: {used_full} before freeing, {used_after_free} after"
    );
    let before = rss_mib();
    salon::allocator::release_free_memory();
    let after = rss_mib();
    assert!(
        before - after >= 40.0,
        "resident size {before:.1} MiB before the trim, {after:.1} MiB after"
    );
    check_kept(&kept);
}
