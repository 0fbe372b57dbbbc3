//! A persistent worker pool for the per-token hot loops.
//!
//! A decode step runs about 7 matrix products per layer (210 for 2B4T) plus attention and the
//! head, each a few tens of microseconds: the pool must start a job in well under a
//! microsecond. Workers spin on an epoch counter for a while after each job (so back-to-back
//! jobs start at once), then sleep on a condition variable. A job is `f(part)` for `part` in
//! `0..n_parts`, with a static partition chosen by the caller. The calling thread works too,
//! and parts are claimed atomically, so a part whose worker is slow to wake (a busy machine)
//! is simply run by the caller.
//!
//! The thread count is `rayon::current_num_threads()` at the time of the call, so
//! `ThreadPoolBuilder::build_global` (`-t N`) and `ThreadPool::install` (benchmarks running
//! several thread counts in one process) both decide it. Workers are started lazily up to the
//! largest count asked for. A call made while the pool is busy (another thread's job, or a
//! nested call from inside a job) simply runs all its parts on the calling thread.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_micros(300);

/// The job being run: a borrowed closure (lifetime erased; the caller waits for every part).
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
}

/// Most parts in one job (they share the claim word with the epoch and worker limit).
pub const MAX_PARTS: usize = 0xFFF;

/// The claim word: epoch (high 32 bits), how many workers may take part (8 bits), number of
/// parts (12 bits), next unclaimed part (low 12 bits). Parts are claimed with a
/// compare-and-swap that also checks the epoch, so a worker that wakes up late can never claim
/// a part of a newer job than the one it looked at.
fn word(epoch: u64, workers: usize, n_parts: usize, next: usize) -> u64 {
    (epoch << 32) | ((workers as u64) << 24) | ((n_parts as u64) << 12) | next as u64
}

fn unpack(w: u64) -> (u64, usize, usize, usize) {
    let f = |shift: u32, mask: u64| ((w >> shift) & mask) as usize;
    (w >> 32, f(24, 0xFF), f(12, 0xFFF), f(0, 0xFFF))
}

struct Shared {
    claim: AtomicU64,
    job: UnsafeCell<Job>,
    /// Parts finished in the current job.
    done: AtomicUsize,
    /// A part panicked.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only by the thread holding `Pool::busy`, before the new epoch is
// published and while no part of the previous job runs; it is read only after a successful
// claim in that epoch, which the caller outlives (it waits for every claimed part).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

struct Pool {
    shared: &'static Shared,
    busy: AtomicBool,
    /// Workers started.
    started: Mutex<usize>,
    n_started: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        fn noop(_: usize) {}
        let f: &'static (dyn Fn(usize) + Sync) = &noop;
        Pool {
            shared: Box::leak(Box::new(Shared {
                claim: AtomicU64::new(0),
                job: UnsafeCell::new(Job { f }),
                done: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                sleepers: AtomicUsize::new(0),
                lock: Mutex::new(()),
                wake: Condvar::new(),
            })),
            busy: AtomicBool::new(false),
            started: Mutex::new(0),
            n_started: AtomicUsize::new(0),
        }
    })
}

/// Claim and run parts of the job of `epoch` until none is left. `index` is 0 for the caller,
/// i >= 1 for worker i (which takes part only if the job allows that many workers).
fn run_parts(s: &Shared, epoch: u64, index: usize) {
    let mut cur = s.claim.load(Ordering::Acquire);
    loop {
        let (e, workers, n, next) = unpack(cur);
        if e != epoch || next >= n || index > workers {
            return;
        }
        match s.claim.compare_exchange_weak(
            cur,
            word(e, workers, n, next + 1),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // SAFETY: a part of this epoch is claimed, so the job is the one published with
                // it and stays alive until `done` counts this part.
                let f = unsafe { &*(*s.job.get()).f };
                if catch_unwind(AssertUnwindSafe(|| f(next))).is_err() {
                    s.panicked.store(true, Ordering::Relaxed);
                }
                s.done.fetch_add(1, Ordering::AcqRel);
                cur = s.claim.load(Ordering::Acquire);
            }
            Err(now) => cur = now,
        }
    }
}

/// A worker: wait for a new epoch (spinning for `SPIN`, then sleeping), claim parts, repeat.
/// `seen` is the epoch when it was spawned.
fn worker(s: &'static Shared, index: usize, mut seen: u64) {
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let e = s.claim.load(Ordering::Acquire) >> 32;
            if e != seen {
                break e;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.claim.load(Ordering::SeqCst) >> 32 == seen {
                guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
        };
        seen = epoch;
        run_parts(s, epoch, index);
    }
}

/// The number of parts a job started now would use (rayon's current thread count).
pub fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Waits on drop until every part of the current job is done, so a panic on the calling
/// thread cannot free the closure while a worker still runs it; then frees the pool.
struct WaitGuard {
    pool: &'static Pool,
    n_parts: usize,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let s = self.pool.shared;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < self.n_parts {
            spins = spins.wrapping_add(1);
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                // Oversubscribed machine: let the worker that holds the last part run.
                std::thread::yield_now();
            }
        }
        self.pool.busy.store(false, Ordering::Release);
    }
}

/// Run `f(part)` for every part in `0..n_parts`, in parallel on the pool with at most
/// [`threads`] threads; the calling thread takes part too. Parts are claimed one at a time, so
/// more parts than threads balance uneven work, and a part whose worker is slow to wake is run
/// by whoever is free. Returns when all parts are done; a panic in any part is resumed here.
pub fn run(n_parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let n_threads = threads().min(n_parts).min(256);
    if n_threads <= 1 || n_parts > MAX_PARTS {
        (0..n_parts).for_each(f);
        return;
    }
    let p = pool();
    if p.busy
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        // Busy (another thread's job, or nested): run everything here.
        (0..n_parts).for_each(f);
        return;
    }
    let s = p.shared;
    let n_workers = n_threads - 1;
    if p.n_started.load(Ordering::Relaxed) < n_workers {
        let mut started = p.started.lock().unwrap_or_else(|e| e.into_inner());
        while *started < n_workers {
            // Stable: only the holder of `busy` changes the claim word.
            let seen = s.claim.load(Ordering::Relaxed) >> 32;
            let index = *started + 1;
            let ok = std::thread::Builder::new()
                .name(format!("bitnet-worker-{index}"))
                .spawn(move || worker(s, index, seen))
                .is_ok();
            if !ok {
                break; // The caller runs the parts no worker takes.
            }
            *started += 1;
        }
        p.n_started.store(*started, Ordering::Relaxed);
    }
    // SAFETY: lifetime erasure; `WaitGuard` waits for every part before this function returns
    // or unwinds, so the closure outlives every use.
    let f_static: *const (dyn Fn(usize) + Sync) = unsafe {
        std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), *const (dyn Fn(usize) + Sync)>(
            f as *const _,
        )
    };
    // SAFETY: we hold `busy`, and every part of the previous job is done.
    unsafe { *s.job.get() = Job { f: f_static } };
    s.panicked.store(false, Ordering::Relaxed);
    s.done.store(0, Ordering::Relaxed);
    let epoch = ((s.claim.load(Ordering::Relaxed) >> 32) + 1) & 0xFFFF_FFFF;
    s.claim
        .store(word(epoch, n_workers, n_parts, 0), Ordering::SeqCst);
    if s.sleepers.load(Ordering::SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    let guard = WaitGuard { pool: p, n_parts };
    run_parts(s, epoch, 0);
    drop(guard);
    if s.panicked.load(Ordering::Relaxed) {
        resume_unwind(Box::new("a part of a pool job panicked"));
    }
}

/// Split `0..n` into `parts` contiguous ranges whose boundaries are multiples of `align`
/// (except the end), as evenly as possible. Part `i` of `parts`.
pub fn split(n: usize, parts: usize, align: usize, i: usize) -> Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let (q, r) = (units / parts, units % parts);
    let start = i * q + i.min(r);
    let end = start + q + usize::from(i < r);
    (start * align).min(n)..(end * align).min(n)
}

/// Run `f` over a static partition of `0..n` (boundaries multiples of `align`), one range per
/// thread; empty ranges are skipped. Uses fewer parts when `n` is small (`min_per_part`).
pub fn for_ranges<F>(n: usize, align: usize, min_per_part: usize, f: F)
where
    F: Fn(Range<usize>) + Sync,
{
    for_ranges_split(n, align, min_per_part, 1, f)
}

/// [`for_ranges`] with `per_thread` ranges per thread, claimed dynamically: for uneven work
/// (causal attention).
pub fn for_ranges_split<F>(n: usize, align: usize, min_per_part: usize, per_thread: usize, f: F)
where
    F: Fn(Range<usize>) + Sync,
{
    let parts = (threads() * per_thread.max(1))
        .min(n.div_ceil(min_per_part.max(1)))
        .clamp(1, MAX_PARTS);
    run(parts, &|i| {
        let r = split(n, parts, align, i);
        if !r.is_empty() {
            f(r)
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        for n in [0, 1, 7, 64, 1000] {
            for parts in 1..5 {
                for align in [1, 2, 4, 16] {
                    let mut next = 0;
                    for i in 0..parts {
                        let r = split(n, parts, align, i);
                        assert_eq!(r.start, next);
                        assert!(r.start.is_multiple_of(align) || r.start == n);
                        next = r.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }

    #[test]
    fn every_part_runs_once_on_any_thread_count() {
        for threads in [1, 2, 3, 5] {
            let tp = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            tp.install(|| {
                for round in 0..200u64 {
                    let sum = AtomicU64::new(0);
                    for_ranges(1000, 3, 1, |r| {
                        let s: u64 = r.map(|v| v as u64 + round).sum();
                        sum.fetch_add(s, Ordering::Relaxed);
                    });
                    assert_eq!(sum.into_inner(), 999 * 1000 / 2 + 1000 * round);
                }
            });
        }
    }

    #[test]
    fn concurrent_and_nested_calls_fall_back_to_the_caller() {
        let tp = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    tp.install(|| {
                        for _ in 0..100 {
                            let count = AtomicU64::new(0);
                            run(2, &|_| {
                                run(3, &|_| {
                                    count.fetch_add(1, Ordering::Relaxed);
                                });
                            });
                            assert_eq!(count.into_inner(), 6);
                        }
                    })
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_is_reported_to_the_caller() {
        let tp = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        tp.install(|| {
            let r = catch_unwind(AssertUnwindSafe(|| {
                run(2, &|i| {
                    if i == 1 {
                        panic!("part 1 fails");
                    }
                })
            }));
            assert!(r.is_err());
            // The pool still works afterwards.
            let count = AtomicU64::new(0);
            run(2, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.into_inner(), 2);
        });
    }
}
