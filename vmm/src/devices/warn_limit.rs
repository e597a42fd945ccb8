//! Rate limit for warnings a guest can trigger (bad register accesses,
//! malformed descriptors, bad PFNs): without it a guest floods the host's
//! stderr with one line per access. Each cause (the call site of
//! [`guest_warn!`]) is logged the first [`FIRST`] times per vCPU thread,
//! then only at its 100th, 1000th, … occurrence, saying how many there were.

use std::cell::RefCell;
use std::collections::HashMap;

/// Occurrences of one cause logged in full, per thread.
pub const FIRST: u64 = 10;

thread_local! {
    static SEEN: RefCell<HashMap<&'static str, u64>> = RefCell::new(HashMap::new());
}

/// Count one occurrence of `site`; `Some(suffix)` if it is to be logged
/// (the suffix says when later ones will be), `None` if it is suppressed.
pub fn admit(site: &'static str) -> Option<String> {
    let n = SEEN.with(|s| {
        let mut s = s.borrow_mut();
        let n = s.entry(site).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    if n < FIRST {
        Some(String::new())
    } else if n == FIRST {
        Some(format!(
            " (the {FIRST}th time; from now on logged at the 100th, 1000th, ... occurrence)"
        ))
    } else if is_power_of_ten(n) {
        Some(format!(" ({n} times from this thread)"))
    } else {
        None
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// `log::warn!` for guest-triggered conditions, rate-limited per call site
/// (see the module documentation).
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        if let Some(note) =
            $crate::devices::warn_limit::admit(concat!(file!(), ":", line!(), ":", column!()))
        {
            log::warn!("{}{}", format_args!($($arg)+), note);
        }
    }};
}
pub(crate) use guest_warn;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ten_then_powers_of_ten() {
        let logged: Vec<u64> = (1..=100_000u64)
            .filter(|_| admit("test-site").is_some())
            .collect::<Vec<_>>();
        let want: Vec<u64> = (1..=10).chain([100, 1000, 10_000, 100_000]).collect();
        assert_eq!(logged, want);
        // Another site has its own budget.
        assert_eq!(admit("other-site"), Some(String::new()));
    }
}
