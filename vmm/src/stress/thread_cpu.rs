//! The injector thread's own CPU time: how much of an event's latency is
//! work on a CPU (user and kernel: the system calls it makes) and how much
//! is waiting (for the vCPUs to park, for guest progress, for a CPU). The
//! work is what bounds the event rate: an injector that never waited would
//! still fire at most one event per its CPU time per event.

use std::time::Duration;

/// CPU time the calling thread has run so far (`CLOCK_THREAD_CPUTIME_ID`:
/// the scheduler's exact runtime, user and kernel), or `None` if the clock
/// is unavailable.
pub fn now() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // clock_gettime writes only it.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

/// The calling thread's user and system CPU time so far
/// (`getrusage(RUSAGE_THREAD)`: sampled at the scheduler tick, so only
/// meaningful over many ticks), or `None` if the call fails.
pub fn user_system() -> Option<(Duration, Duration)> {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; getrusage writes only it.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return None;
    }
    let tv = |t: libc::timeval| {
        Some(
            Duration::from_secs(u64::try_from(t.tv_sec).ok()?)
                + Duration::from_micros(u64::try_from(t.tv_usec).ok()?),
        )
    };
    Some((tv(ru.ru_utime)?, tv(ru.ru_stime)?))
}

/// CPU time spent since `start` (a value of [`now`] on this thread); zero
/// when either reading is missing.
pub fn since(start: Option<Duration>) -> Duration {
    match (start, now()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// Busy work until `done` (checked every 1,000 rounds) or 10 s since
    /// `t`.
    fn spin_until(done: impl Fn() -> bool, t: &Instant) {
        let mut x = 0u64;
        while !done() && t.elapsed() < Duration::from_secs(10) {
            for _ in 0..1_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
    }

    #[test]
    fn busy_work_counts_and_sleep_does_not() {
        let start = now();
        assert!(start.is_some(), "CLOCK_THREAD_CPUTIME_ID unavailable");
        std::thread::sleep(Duration::from_millis(50));
        let slept = since(start);
        assert!(slept < Duration::from_millis(25), "sleeping used {slept:?}");
        // Spin until the clock shows 20 ms of this thread's CPU time (a
        // loaded host only makes that take longer), at most 10 s.
        let start = now();
        let t = Instant::now();
        spin_until(|| since(start) >= Duration::from_millis(20), &t);
        let busy = since(start);
        assert!(
            busy >= Duration::from_millis(20),
            "spinning {:?} used {busy:?}",
            t.elapsed()
        );
        assert!(busy <= t.elapsed() + Duration::from_millis(5), "{busy:?}");
    }

    #[test]
    fn user_and_system_time_follow_busy_work() {
        let (u0, s0) = user_system().expect("getrusage(RUSAGE_THREAD)");
        let start = now();
        let t = Instant::now();
        spin_until(|| since(start) >= Duration::from_millis(60), &t);
        let (u1, s1) = user_system().expect("getrusage(RUSAGE_THREAD)");
        let used = (u1 + s1).saturating_sub(u0 + s0);
        assert!(
            used >= Duration::from_millis(20) && used <= t.elapsed() + Duration::from_millis(10),
            "spinning {:?} accounted {used:?}",
            t.elapsed()
        );
    }
}
