//! Memory freed in the middle of the heap goes back to the system when Salon asks the
//! allocator for it, and what is still in use is untouched. A test binary of its own:
//! the resident size it reads is this process's alone.

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

#[test]
fn freed_pages_in_the_middle_of_the_heap_are_handed_back() {
    salon::allocator::tune();
    const BLOCK: usize = 16 * 1024;
    const BLOCKS: usize = 4096; // 64 MiB, below the mmap threshold block by block
    let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![(i % 251) as u8; BLOCK]).collect();
    let used_full = salon::allocator::in_use().expect("glibc reports its use");
    // Keep every sixteenth block: the heap's top stays in use, so glibc's own trimming
    // of the top cannot give any of the freed blocks back.
    let kept: Vec<(usize, Vec<u8>)> = blocks
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 16 == 15)
        .collect();
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
    for (i, b) in &kept {
        assert!(
            b.iter().all(|&x| x == (*i % 251) as u8),
            "block {i} changed"
        );
    }
}
