//! The injector thread's scheduling priority. The vCPU threads of a stress
//! guest never sleep (the guest checks pages flat out), so on a host with
//! few CPUs the injector waits for a CPU after every wake-up: after each
//! pause (the vCPUs park, it must run to do the event and resume them) and
//! after each system call that blocks. Raising its priority over the vCPU
//! threads shortens those waits; the vCPUs get the CPUs whenever the
//! injector sleeps (waiting for guest progress or for the vCPUs to park).
//! Nothing checked changes: only who runs first.

/// The nice value the injector asks for (the vCPU threads keep theirs).
const INJECTOR_NICE: i32 = -10;

/// Restores the calling thread's nice value when dropped.
#[derive(Debug)]
pub struct Raised {
    previous: Option<i32>,
}

/// The calling thread's nice value.
fn nice_of_this_thread() -> Result<i32, std::io::Error> {
    // SAFETY: `__errno_location` returns this thread's errno slot, valid for
    // the thread's life; getpriority has no memory preconditions (`who` 0:
    // the calling thread on Linux, where nice values are per thread).
    let v = unsafe {
        *libc::__errno_location() = 0;
        libc::getpriority(libc::PRIO_PROCESS, 0)
    };
    // -1 is also a valid nice value: errno tells.
    if v == -1 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error().is_some_and(|n| n != 0) {
            return Err(e);
        }
    }
    Ok(v)
}

fn set_nice_of_this_thread(nice: i32) -> Result<(), std::io::Error> {
    // SAFETY: setpriority has no memory preconditions; `who` 0 is the
    // calling thread only (Linux nice values are per thread).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Raise the calling thread (the injector) to [`INJECTOR_NICE`] until the
/// guard drops. Call it after the vCPU threads started (threads created
/// later inherit the value). Without the privilege (`CAP_SYS_NICE` or
/// `RLIMIT_NICE`) the run goes on at the priority it has, slower.
pub fn raise_injector() -> Raised {
    let previous = match nice_of_this_thread() {
        Ok(p) if p > INJECTOR_NICE => p,
        Ok(_) => return Raised { previous: None },
        Err(e) => {
            log::debug!("reading the injector's nice value: {e}");
            return Raised { previous: None };
        }
    };
    match set_nice_of_this_thread(INJECTOR_NICE) {
        Ok(()) => Raised {
            previous: Some(previous),
        },
        Err(e) => {
            log::info!(
                "could not raise the injector thread to nice {INJECTOR_NICE} ({e}): \
                 events wait longer for a CPU"
            );
            Raised { previous: None }
        }
    }
}

impl Drop for Raised {
    fn drop(&mut self) {
        if let Some(p) = self.previous {
            if let Err(e) = set_nice_of_this_thread(p) {
                log::warn!("restoring the thread's nice value {p}: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_restores_the_nice_value() {
        // On a thread of its own: the test harness's threads keep theirs.
        std::thread::spawn(|| {
            let before = nice_of_this_thread().unwrap();
            {
                let g = raise_injector();
                let during = nice_of_this_thread().unwrap();
                match g.previous {
                    Some(p) => assert_eq!((p, during), (before, INJECTOR_NICE)),
                    None => assert_eq!(during, before),
                }
            }
            assert_eq!(nice_of_this_thread().unwrap(), before);
        })
        .join()
        .unwrap();
    }
}
