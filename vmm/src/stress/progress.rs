//! Progress lines of a long `vmm stress` run (a 10^6-event soak takes most of an
//! hour): every [`INTERVAL`], events fired and their rate, quiescent points,
//! violations so far and, for `--ops N`, the share done and the time left.

use std::time::{Duration, Instant};

/// Time between two progress lines.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// When the last line was printed, and what the run aims at.
pub struct Progress<'a> {
    started: Instant,
    next: Instant,
    ops: Option<u64>,
    sink: &'a mut dyn FnMut(&str),
}

impl<'a> Progress<'a> {
    /// A run that started now and fires `ops` events (if bounded by count),
    /// telling `sink` one line at a time.
    pub fn new(ops: Option<u64>, sink: &'a mut dyn FnMut(&str)) -> Self {
        let started = Instant::now();
        Progress {
            started,
            next: started.checked_add(INTERVAL).unwrap_or(started),
            ops,
            sink,
        }
    }

    /// After an event: a line when one is due.
    pub fn tick(&mut self, fired: u64, points: usize, violations: usize) {
        let now = Instant::now();
        if now < self.next {
            return;
        }
        self.next = now.checked_add(INTERVAL).unwrap_or(now);
        let line = line(now - self.started, fired, points, violations, self.ops);
        (self.sink)(&line);
    }
}

/// One progress line.
pub fn line(
    elapsed: Duration,
    fired: u64,
    points: usize,
    violations: usize,
    ops: Option<u64>,
) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { fired as f64 / secs } else { 0.0 };
    let mut s = format!(
        "{secs:.0} s: {fired} events ({rate:.0}/s), {points} quiescent points, {violations} violations"
    );
    if let Some(n) = ops.filter(|&n| n > 0) {
        let done = fired.min(n);
        s.push_str(&format!("; {:.1}% of {n}", 100.0 * done as f64 / n as f64));
        if rate > 0.0 {
            let left = (n - done) as f64 / rate;
            s.push_str(&format!(", about {:.0} min left", left / 60.0));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_says_rate_share_and_time_left() {
        let l = line(Duration::from_secs(100), 40_000, 40, 0, Some(1_000_000));
        assert_eq!(
            l,
            "100 s: 40000 events (400/s), 40 quiescent points, 0 violations; 4.0% of 1000000, about 40 min left"
        );
        let l = line(Duration::from_secs(10), 5, 3, 1, None);
        assert_eq!(l, "10 s: 5 events (0/s), 3 quiescent points, 1 violations");
    }

    #[test]
    fn tick_prints_only_when_due() {
        let mut lines = Vec::new();
        {
            let mut sink = |l: &str| lines.push(l.to_string());
            let mut p = Progress::new(Some(10), &mut sink);
            p.tick(1, 0, 0);
            p.next = Instant::now();
            p.tick(2, 1, 0);
            p.tick(3, 1, 0);
        }
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].contains("2 events"), "{lines:?}");
    }
}
