//! A counting global allocator: the System allocator plus the bytes live now, the peak since
//! the last [`case_start`], and a hard cap that stops a runaway case before it takes the
//! machine down.
//!
//! Memory-mapped files are not heap and are not counted, which is what we want: a loader may
//! map a 100 GB file, but must not *allocate* in proportion to a length a header merely claims.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static PROCESS_PEAK: AtomicUsize = AtomicUsize::new(0);
/// Live bytes when the current case started (the case's peak is measured from here).
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Allocations that would take the case above `BASE + HARD_CAP` fail (0: no cap).
static HARD_CAP: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn grew(size: usize) -> bool {
    let now = CURRENT.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(now, Relaxed);
    PROCESS_PEAK.fetch_max(now, Relaxed);
    let cap = HARD_CAP.load(Relaxed);
    if cap != 0 && now.saturating_sub(BASE.load(Relaxed)) > cap {
        CURRENT.fetch_sub(size, Relaxed);
        // No allocation here: a fixed message, then the allocation fails (Rust aborts and the
        // supervising process saves the input).
        let _ = std::io::stderr()
            .write_all(b"\ndeltatune-fuzz: a case allocated past the hard memory cap; aborting\n");
        return false;
    }
    true
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !grew(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            CURRENT.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !grew(layout.size()) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            CURRENT.fetch_sub(layout.size(), Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = layout.size();
        if new_size > old && !grew(new_size - old) {
            return std::ptr::null_mut();
        }
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            if new_size > old {
                CURRENT.fetch_sub(new_size - old, Relaxed);
            }
        } else if new_size < old {
            CURRENT.fetch_sub(old - new_size, Relaxed);
        }
        p
    }
}

/// Starts measuring a case: its peak is counted from the bytes live now; `hard_cap` bytes
/// above that, allocations fail.
pub fn case_start(hard_cap: usize) {
    let now = CURRENT.load(Relaxed);
    BASE.store(now, Relaxed);
    PEAK.store(now, Relaxed);
    HARD_CAP.store(hard_cap, Relaxed);
}

/// Bytes above the case's starting point at its peak.
pub fn case_peak() -> usize {
    PEAK.load(Relaxed).saturating_sub(BASE.load(Relaxed))
}

/// Ends the case: no cap between cases.
pub fn case_end() {
    HARD_CAP.store(0, Relaxed);
}

/// The most heap this process ever held.
pub fn process_peak() -> usize {
    PROCESS_PEAK.load(Relaxed)
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
