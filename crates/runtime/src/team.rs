//! A small team of helper threads for splitting one small batch's layers (a single image's
//! convolution, say) over the cores with a hand-off of a few hundred nanoseconds.
//!
//! Rayon parks its idle workers, and waking them (and then the waiting caller) costs tens of
//! microseconds on a virtual machine: as much as a whole layer of a one-image forward pass.
//! The team's helpers instead spin for a short while after each piece of work (the next
//! layer, or the next call of a latency-bound loop, usually comes within microseconds), and
//! only then park. Shares are claimed, not assigned: the caller claims shares too, so a
//! helper that the operating system has not scheduled (a busy machine) delays nothing but
//! the shares it has already started. XNNPACK's thread pool works much the same way.

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a helper spins for new work before it parks.
const SPIN: Duration = Duration::from_micros(200);

thread_local! {
    /// Set on the team's helpers, and on a caller while it runs its share: kernels called
    /// from a share must not split their work again.
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is running a share of team work.
pub(crate) fn in_team() -> bool {
    IN_TEAM.with(Cell::get)
}

/// A job: the function every share calls with its index, lifetime erased (the caller waits
/// until every share is done before the function goes out of scope).
type Job = *const (dyn Fn(usize) + Sync);

/// A published job: its generation, the function and the number of shares.
#[derive(Clone, Copy)]
struct Published {
    generation: usize,
    job: Job,
    shares: usize,
}

struct Shared {
    /// The generation (high 32 bits) and the next unclaimed share (low 32 bits): claims are
    /// made with a compare-and-swap that fails once the generation has moved on, so a late
    /// helper can never start a share of a job that is over.
    claim: AtomicU64,
    /// The job of the current generation, while its caller waits for it.
    job: Mutex<Option<Published>>,
    /// Shares of the current job finished.
    done: AtomicUsize,
    /// A share panicked.
    panicked: AtomicBool,
    /// Helpers that are parked (or about to park) and need an unpark.
    parked: AtomicUsize,
    helpers: OnceLock<Vec<Thread>>,
}

// SAFETY: the raw job pointer is only dereferenced by a thread that claimed a share of it
// while its publisher waits for that share, and the function it points to is `Sync`.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn generation(&self) -> usize {
        (self.claim.load(Ordering::SeqCst) >> 32) as usize
    }

    /// Claims the next share of `generation`'s job of `shares` shares, if any is left.
    fn claim(&self, generation: usize, shares: usize) -> Option<usize> {
        let mut current = self.claim.load(Ordering::Acquire);
        loop {
            let (g, next) = ((current >> 32) as usize, (current & 0xffff_ffff) as usize);
            if g != generation & 0xffff_ffff || next >= shares {
                return None;
            }
            match self.claim.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(next),
                Err(seen) => current = seen,
            }
        }
    }

    /// Runs claimed shares of a job until none is left.
    fn work(&self, published: Published) {
        while let Some(share) = self.claim(published.generation, published.shares) {
            // SAFETY: the publisher keeps the function alive until `done` counts every
            // share, this one included.
            let result = catch_unwind(AssertUnwindSafe(|| unsafe { (*published.job)(share) }));
            if result.is_err() {
                self.panicked.store(true, Ordering::Release);
            }
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// The process-wide team: one helper per core beyond the first.
pub(crate) struct Team {
    shared: Arc<Shared>,
    /// Held while a caller uses the team: concurrent callers run alone instead.
    busy: Mutex<()>,
}

static TEAM: OnceLock<Option<Team>> = OnceLock::new();

impl Team {
    /// The process-wide team, started on first use; `None` on a single core (or where a
    /// helper thread cannot be started).
    pub(crate) fn get() -> Option<&'static Team> {
        TEAM.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            Team::start(cores.saturating_sub(1))
        })
        .as_ref()
    }

    /// Threads available to a job: the caller and the helpers.
    pub(crate) fn size(&self) -> usize {
        self.shared.helpers.get().map_or(0, Vec::len) + 1
    }

    fn start(helpers: usize) -> Option<Self> {
        if helpers == 0 {
            return None;
        }
        let shared = Arc::new(Shared {
            claim: AtomicU64::new(0),
            job: Mutex::new(None),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            helpers: OnceLock::new(),
        });
        let mut threads = Vec::with_capacity(helpers);
        for index in 1..=helpers {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("runtime-team-{index}"))
                .spawn(move || helper(&shared));
            match handle {
                Ok(handle) => threads.push(handle.thread().clone()),
                Err(_) => break,
            }
        }
        if threads.is_empty() {
            return None;
        }
        let _ = shared.helpers.set(threads);
        Some(Self {
            shared,
            busy: Mutex::new(()),
        })
    }

    /// Calls `f(share)` once for every `share` in `0..shares` (at most [`Team::size`]), on
    /// the calling thread and the helpers, and returns when all are done. Returns `false`
    /// without calling anything when the team is busy with another caller (the caller then
    /// does the work alone). A panic in a share is raised again here.
    pub(crate) fn run(&self, shares: usize, f: &(dyn Fn(usize) + Sync)) -> bool {
        let shares = shares.clamp(1, self.size());
        // A panic raised here earlier poisons the lock; the team is still sound.
        let _guard = match self.busy.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        let shared = &self.shared;
        // SAFETY (lifetime erasure only): the pointer is dereferenced only by threads that
        // claimed a share of this job, and this function does not return before `done`
        // counts every share, that is before every such call has finished.
        let job: Job = unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        };
        let generation = (shared.generation() + 1) & 0xffff_ffff;
        let published = Published {
            generation,
            job,
            shares,
        };
        shared.panicked.store(false, Ordering::Relaxed);
        shared.done.store(0, Ordering::SeqCst);
        if let Ok(mut slot) = shared.job.lock() {
            *slot = Some(published);
        }
        // Publishing: the new generation with no share claimed yet.
        shared
            .claim
            .store((generation as u64) << 32, Ordering::SeqCst);
        if shared.parked.load(Ordering::SeqCst) > 0 {
            for thread in shared.helpers.get().into_iter().flatten() {
                thread.unpark();
            }
        }
        let was = IN_TEAM.with(|t| t.replace(true));
        shared.work(published);
        IN_TEAM.with(|t| t.set(was));
        // Only shares that a helper has started are left.
        let start = Instant::now();
        while shared.done.load(Ordering::Acquire) < shares {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Ok(mut slot) = shared.job.lock() {
            *slot = None;
        }
        if shared.panicked.load(Ordering::Acquire) {
            std::panic::resume_unwind(Box::new("a share of a team job panicked"));
        }
        true
    }
}

/// A helper's loop: wait for a new generation (spinning, then parked) and claim shares of
/// its job.
fn helper(shared: &Shared) {
    IN_TEAM.with(|t| t.set(true));
    // The generation the team started with: a job published before this thread first runs
    // is still seen as new.
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let now = shared.generation();
            if now != seen {
                seen = now;
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            shared.parked.fetch_add(1, Ordering::SeqCst);
            // Checked again after announcing: a publisher that did not see the
            // announcement had already moved the generation on.
            if shared.generation() == seen {
                std::thread::park();
            }
            shared.parked.fetch_sub(1, Ordering::SeqCst);
        }
        let published = shared.job.lock().ok().and_then(|slot| *slot);
        // The claims check the generation: a job that is already over has none left.
        if let Some(published) = published
            && published.generation == seen
        {
            shared.work(published);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_runs_once_per_job_from_many_callers() {
        let Some(team) = Team::get() else {
            return; // one core: no team, the engine runs everything on the caller
        };
        let callers: Vec<_> = (0..4)
            .map(|caller| {
                std::thread::spawn(move || {
                    for job in 0..2_000usize {
                        let counts: Vec<AtomicUsize> =
                            (0..team.size()).map(|_| AtomicUsize::new(0)).collect();
                        let shares = 1 + (job + caller) % team.size();
                        let ran = team.run(shares, &|s| {
                            counts[s].fetch_add(1, Ordering::Relaxed);
                        });
                        if !ran {
                            continue; // another caller had the team
                        }
                        for (s, count) in counts.iter().enumerate() {
                            let expected = usize::from(s < shares);
                            assert_eq!(count.load(Ordering::Relaxed), expected, "share {s}");
                        }
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
    }

    #[test]
    fn a_panicking_share_panics_the_caller_and_the_team_goes_on() {
        let Some(team) = Team::get() else {
            return;
        };
        if team.size() < 2 {
            return;
        }
        // Another test may hold the team for a moment: retry until this job ran.
        let result = loop {
            let ran = std::cell::Cell::new(false);
            let result = catch_unwind(AssertUnwindSafe(|| {
                ran.set(team.run(2, &|s| assert!(s != 1, "share 1 fails")));
            }));
            if result.is_err() || ran.get() {
                break result;
            }
        };
        assert!(result.is_err());
        let total = AtomicUsize::new(0);
        while !team.run(2, &|s| {
            total.fetch_add(s + 1, Ordering::Relaxed);
        }) {}
        assert_eq!(total.load(Ordering::Relaxed), 3);
    }
}
