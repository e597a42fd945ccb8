//! The reserve worker (`hugetlb` backings): a thread that keeps a few
//! blocks of small pages allocated ahead for splits
//! (`guest_mem::GuestRam::split_block_to_prepare`), so a split (a guest
//! give-back, a `vmm ctl split`, a stress event) does not allocate 511 shmem
//! pages on its path, and a few huge pages allocated ahead for collapses
//! (`guest_mem::GuestRam::huge_page_to_prepare`, at most one per split
//! frame), so a collapse does not take and zero a huge page on its path.
//! Each block or page is allocated without the RAM lock (see `guest-mem`'s
//! `split_reserve` and `collapse_reserve` for why that is safe); the lock is
//! held only to set it aside and to mark it ready. Each split or collapse
//! made with the vCPUs running wakes it (`guest_mem::SplitWindows`); it
//! starts once they have been quiet for 2 ms (a burst of splits runs
//! alone), so the split frame's huge page is ready before its collapse.
//! [`SplitReserve::wait_caught_up`] waits for a round that finds nothing
//! left to do (a test guest's checkpoint, before its collapse pass).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ram_handle::RamHandle;
use crate::stop_signal::StopSignal;

/// How often the worker looks for blocks a split took, right after work.
const POLL: Duration = Duration::from_millis(2);
/// The longest it sleeps when rounds keep finding nothing to do (the poll
/// doubles from [`POLL`] up to this: an idle guest costs a lock every 64 ms).
const IDLE_POLL: Duration = Duration::from_millis(64);
/// After a wake (a split or collapse was made): how long no other may come
/// before the worker allocates (at most [`IDLE_POLL`] after the wake), so a
/// burst of splits (a guest giving back several frames at once) does not
/// compete with it for the CPUs and the mmap lock.
const QUIET: Duration = Duration::from_millis(2);
/// How long it waits after the host refused to allocate a block.
const BACK_OFF: Duration = Duration::from_secs(1);

/// What the worker keeps ready.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReserveSizes {
    /// Split blocks (2 MiB of small pages each).
    pub split_blocks: usize,
    /// Huge pages for collapses (`hugetlb` only; at most one per split
    /// frame).
    pub huge_pages: usize,
}

/// The worker of one machine.
#[derive(Debug)]
pub struct SplitReserve {
    sizes: ReserveSizes,
    stop: StopSignal,
    rounds: Mutex<Rounds>,
    /// Signalled when a round ends with nothing left to do, or the thread
    /// ends.
    caught_up: Condvar,
}

/// The worker's rounds, for [`SplitReserve::wait_caught_up`].
#[derive(Debug, Default)]
struct Rounds {
    /// Rounds begun so far.
    begun: u64,
    /// The last round that ended with nothing left to do (or with the
    /// host's refusal: it cannot get further until its back-off).
    caught_up: u64,
    /// The thread ended.
    ended: bool,
}

/// A started worker: [`Running::shutdown`] ends it and joins its thread.
#[derive(Debug)]
pub struct Running {
    reserve: Arc<SplitReserve>,
    thread: JoinHandle<()>,
}

impl Running {
    /// Wake the thread after every split or collapse made with the vCPUs
    /// running (`windows` records them): once none came for [`QUIET`] it
    /// refills the block the split took and allocates the split frame's
    /// huge page, instead of after its idle poll (up to [`IDLE_POLL`]). A
    /// no-op once it ended.
    fn wake_on_splits(&self, windows: &guest_mem::SplitWindows) {
        let reserve = Arc::downgrade(&self.reserve);
        windows.set_on_record(move || {
            if let Some(r) = reserve.upgrade() {
                r.stop.wake();
            }
        });
    }

    /// The worker (to wait until it caught up).
    pub fn worker(&self) -> &Arc<SplitReserve> {
        &self.reserve
    }

    /// Ask the thread to end and wait for it (a panic in it is logged).
    pub fn shutdown(self) {
        self.reserve.stop();
        if self.thread.join().is_err() {
            log::error!("the split-reserve thread panicked");
        }
    }
}

impl SplitReserve {
    /// The worker a machine on `backing` runs with `--split-reserve` and
    /// `--collapse-reserve`: none when both are 0 or on a backing without a
    /// hugetlb pool (its splits and collapses are the kernel's), else
    /// started ([`Self::start`]).
    pub fn start_for(
        sizes: ReserveSizes,
        backing: guest_mem::Backing,
        m: &Arc<impl RamHandle + 'static>,
    ) -> std::io::Result<Option<Running>> {
        if sizes == ReserveSizes::default() || !backing.is_hugetlb() {
            return Ok(None);
        }
        let reserve = SplitReserve::new(sizes);
        let thread = reserve.start(m)?;
        let running = Running { reserve, thread };
        let windows = m.ram().split_windows();
        running.wake_on_splits(&windows);
        Ok(Some(running))
    }

    /// A worker keeping `sizes` ready (2 MiB of host memory each).
    pub fn new(sizes: ReserveSizes) -> Arc<SplitReserve> {
        Arc::new(SplitReserve {
            sizes,
            stop: StopSignal::default(),
            rounds: Mutex::new(Rounds::default()),
            caught_up: Condvar::new(),
        })
    }

    fn rounds(&self) -> MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the thread and waits, at most `timeout`, for a round begun
    /// after this call to end with nothing left to do: the blocks and huge
    /// pages splits and collapses took so far are replaced. `false` when
    /// the time ran out or the thread ended first. Blocks the caller: only
    /// for a test guest's checkpoint, whose collapse pass is meant to be
    /// deterministic (splits made just before it would otherwise race the
    /// worker for the huge pages it allocates).
    pub fn wait_caught_up(&self, timeout: Duration) -> bool {
        let after = self.rounds().begun;
        self.stop.wake();
        let (r, _) = self
            .caught_up
            .wait_timeout_while(self.rounds(), timeout, |r| !r.ended && r.caught_up <= after)
            .unwrap_or_else(|p| p.into_inner());
        r.caught_up > after
    }

    /// Tops the reserve up once: maps the blocks collapses kept, sets aside
    /// and allocates blocks until `split_blocks` are ready, gives back the
    /// huge pages no split frame wants any more and allocates them up to
    /// what is wanted. Returns how many blocks and pages it mapped,
    /// allocated or gave back, or the host's refusal (logged by the
    /// caller).
    pub fn top_up(&self, m: &dyn RamHandle) -> Result<usize, guest_mem::GuestMemError> {
        // Unmapped here, not under the RAM lock nor on a split's path.
        let used = m.ram().take_used_split_maps();
        drop(used);
        let mut n = 0;
        // Blocks a collapse kept: mapped here, away from the RAM lock.
        loop {
            // Bound first: a guard in a `while let` scrutinee would live
            // through the body and deadlock on the second lock.
            let next = m.ram().split_block_needing_map()?;
            let Some(k) = next else { break };
            let made = k.make();
            m.ram().split_block_mapped(k, made)?;
            n += 1;
        }
        loop {
            let Some(prep) = m.ram().split_block_to_prepare(self.sizes.split_blocks)? else {
                break;
            };
            let r = prep.allocate();
            if m.ram().split_block_allocated(prep, r)? {
                n += 1;
            }
        }
        let released = m.ram().release_surplus_warm_huge(self.sizes.huge_pages)?;
        n += released;
        loop {
            let Some(prep) = m.ram().huge_page_to_prepare(self.sizes.huge_pages)? else {
                return Ok(n);
            };
            let r = prep.allocate();
            if m.ram().huge_page_allocated(prep, r)? {
                n += 1;
            }
        }
    }

    /// Tops the reserve up on the caller's thread (before any vCPU runs,
    /// the first splits find it ready), then starts the thread; it ends on
    /// [`Self::stop`] or when the machine is gone.
    pub fn start(
        self: &Arc<Self>,
        m: &Arc<impl RamHandle + 'static>,
    ) -> std::io::Result<JoinHandle<()>> {
        if let Err(e) = self.top_up(m.as_ref()) {
            log::warn!("split reserve: {e}; splits allocate their pages themselves for now");
        }
        let me = Arc::clone(self);
        let weak = Arc::downgrade(m);
        std::thread::Builder::new()
            .name("split-reserve".into())
            .spawn(move || me.run(weak))
    }

    fn run(&self, m: Weak<impl RamHandle>) {
        self.run_rounds(m);
        self.rounds().ended = true;
        self.caught_up.notify_all();
    }

    /// One top-up round on `machine`, counted for
    /// [`Self::wait_caught_up`].
    fn round(&self, machine: &dyn RamHandle) -> Result<usize, guest_mem::GuestMemError> {
        let n = {
            let mut r = self.rounds();
            r.begun += 1;
            r.begun
        };
        let done = self.top_up(machine);
        if matches!(done, Ok(0) | Err(_)) {
            self.rounds().caught_up = n;
            self.caught_up.notify_all();
        }
        done
    }

    fn run_rounds(&self, m: Weak<impl RamHandle>) {
        let mut wait = Duration::ZERO;
        loop {
            let (stopped, mut woken) = self.stop.wait_for_wake(wait);
            if stopped {
                return;
            }
            // Splits that never pause for QUIET still get a top-up after
            // IDLE_POLL.
            let since = std::time::Instant::now();
            while woken && since.elapsed() < IDLE_POLL {
                let (stopped, w) = self.stop.wait_for_wake(QUIET);
                if stopped {
                    return;
                }
                woken = w;
            }
            let Some(machine) = m.upgrade() else {
                return;
            };
            if machine.vcpus().stopping() {
                return;
            }
            wait = match self.round(machine.as_ref()) {
                Ok(0) => (wait * 2).clamp(POLL, IDLE_POLL),
                Ok(_) => POLL,
                Err(e) => {
                    log::warn!("split reserve: {e}; trying again in {BACK_OFF:?}");
                    BACK_OFF
                }
            };
        }
    }

    /// Ask the thread to end.
    pub fn stop(&self) {
        self.stop.stop();
    }
}
