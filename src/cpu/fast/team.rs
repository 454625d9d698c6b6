//! The threads the engine's loops run on: one helper per core beyond the caller's, each
//! spinning for a while after a loop ends before it sleeps.
//!
//! A decoding step is some 150 loops of 0.1-0.3 ms each (a product, the heads' attention),
//! with a few microseconds of one-thread work between them. `rayon`'s workers go to sleep in
//! those gaps and each loop waits for one to wake: a sixth of a 2-thread step went idle that
//! way (`perf stat`: 600 context switches per token). Helpers that are still spinning when the
//! next loop comes start at once; after [`SPIN`] without work they sleep, so an idle process
//! costs nothing.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper waits for the next loop before it sleeps.
const SPIN: Duration = Duration::from_millis(2);
/// `state`'s low bits: the helpers that joined the current loop.
const JOINED: u64 = (1 << 31) - 1;
/// `state`'s bit that closes the current loop to helpers arriving late.
const CLOSED: u64 = 1 << 31;

/// The loop being run: `run(i)` for every `i` below `count`.
#[derive(Clone, Copy)]
struct Job {
    run: *const (dyn Fn(usize) + Sync),
    count: usize,
}

// SAFETY: `run` points at a `Sync` closure that outlives every use of it (`Team::run` waits for
// every helper that joined before it returns).
unsafe impl Send for Job {}

struct Team {
    /// `generation << 32 | CLOSED? | joined`: a new generation opens a loop.
    state: AtomicU64,
    job: Mutex<Option<Job>>,
    /// The next index to take.
    next: AtomicUsize,
    /// Helpers done with the current loop.
    finished: AtomicUsize,
    panicked: AtomicBool,
    /// One submitter at a time; the others (a nested loop, another thread's) go to `rayon`.
    busy: Mutex<()>,
    /// Each helper's thread, and whether it is asleep (to be woken by the next loop).
    helpers: OnceLock<Vec<(Thread, &'static AtomicBool)>>,
}

/// The team for `threads` threads (the caller and `threads - 1` helpers), made on first use.
fn team(threads: usize) -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let team: &'static Team = Box::leak(Box::new(Team {
            state: AtomicU64::new(CLOSED),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: Mutex::new(()),
            helpers: OnceLock::new(),
        }));
        let helpers = (1..threads)
            .filter_map(|i| {
                let asleep: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
                std::thread::Builder::new()
                    .name(format!("bitnet-cpu-{i}"))
                    .spawn(move || team.help(asleep))
                    .ok()
                    .map(|handle| (handle.thread().clone(), asleep))
            })
            .collect();
        team.helpers.get_or_init(|| helpers);
        team
    })
}

/// Runs `f(i)` for every `i` below `count` on the calling thread and the team's helpers, each
/// index once; `false` (nothing run) when the team is busy with another caller's loop.
pub(super) fn run(threads: usize, count: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
    let team = team(threads);
    // A loop that panicked left the lock poisoned; the team itself is whole again by then.
    let _guard = match team.busy.try_lock() {
        Ok(guard) => guard,
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => return false,
    };
    team.run(count, f);
    true
}

impl Team {
    fn run(&self, count: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: the lifetime is erased for the helpers; every helper that joins this loop
        // finishes with `f` before this function returns (the wait below), and none can join
        // after the loop is closed.
        let run: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
        *self.job.lock().expect("team job") = Some(Job { run, count });
        self.next.store(0, Ordering::Relaxed);
        self.finished.store(0, Ordering::Relaxed);
        let generation = ((self.state.load(Ordering::Relaxed) >> 32) + 1) & u64::from(u32::MAX);
        // SeqCst here and in `wait_for_loop`: a helper going to sleep either sees this loop or
        // is seen asleep and woken.
        self.state.store(generation << 32, Ordering::SeqCst);
        for (thread, asleep) in self.helpers.get().into_iter().flatten() {
            if asleep.load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        let mine = catch_unwind(AssertUnwindSafe(|| self.take_indices(f, count)));
        let joined = self.state.fetch_or(CLOSED, Ordering::AcqRel) & JOINED;
        while (self.finished.load(Ordering::Acquire) as u64) < joined {
            std::hint::spin_loop();
        }
        *self.job.lock().expect("team job") = None;
        if let Err(panic) = mine {
            resume_unwind(panic);
        }
        if self.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of the CPU engine's loop panicked on a helper thread");
        }
    }

    fn take_indices(&self, f: &(dyn Fn(usize) + Sync), count: usize) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return;
            }
            f(i);
        }
    }

    /// A helper's life: wait for a loop (spinning, then asleep), join it while it is open, take
    /// indices until none is left, say so.
    fn help(&self, asleep: &AtomicBool) {
        let mut seen = 0;
        loop {
            let state = self.wait_for_loop(seen, asleep);
            seen = state >> 32;
            if !self.join(state) {
                continue;
            }
            let job = self
                .job
                .lock()
                .expect("team job")
                .expect("an open loop's job");
            // SAFETY: the submitter keeps the closure alive until this helper is finished.
            let f = unsafe { &*job.run };
            if catch_unwind(AssertUnwindSafe(|| self.take_indices(f, job.count))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.finished.fetch_add(1, Ordering::Release);
        }
    }

    /// Counts this helper in the loop `state` opened, unless it has closed meanwhile.
    fn join(&self, mut state: u64) -> bool {
        loop {
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) if now >> 32 == state >> 32 && now & CLOSED == 0 => state = now,
                Err(now) if now == state => {}
                Err(_) => return false,
            }
        }
    }

    /// The state of a loop newer than generation `seen` that is still open.
    fn wait_for_loop(&self, seen: u64, asleep: &AtomicBool) -> u64 {
        let open = |state: u64| state >> 32 != seen && state & CLOSED == 0;
        let start = Instant::now();
        loop {
            for _ in 0..256 {
                let state = self.state.load(Ordering::Acquire);
                if open(state) {
                    return state;
                }
                std::hint::spin_loop();
            }
            if start.elapsed() > SPIN {
                asleep.store(true, Ordering::SeqCst);
                if !open(self.state.load(Ordering::SeqCst)) {
                    std::thread::park();
                }
                asleep.store(false, Ordering::Relaxed);
            }
        }
    }
}
