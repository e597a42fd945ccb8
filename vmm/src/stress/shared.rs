//! The VMM's side of the shared log with the stress guest (protocol in
//! [`crate::testguest::guests::stress`]): expect-zero flags, discard epochs,
//! the stop request, and the guest's counters.

use std::ops::Range;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::testguest::guests::stress::{
    SharedArea, OFF_BAD_ACTUAL, OFF_BAD_EXPECTED, OFF_BAD_GEN, OFF_BAD_GFN, OFF_BAD_INDEX,
    OFF_BAD_PASS, OFF_CURSOR, OFF_EPOCH, OFF_PAGES, OFF_PASSES, OFF_RETRIES, OFF_STOP,
    OFF_VIOLATIONS,
};

/// Accessing guest memory failed (a VMM bug: the area is inside RAM).
#[derive(Debug, thiserror::Error)]
#[error("shared log at {gpa:#x}: {source}")]
pub struct SharedError {
    /// Where.
    pub gpa: u64,
    /// Cause.
    pub source: vm_memory::GuestMemoryError,
}

/// One vCPU's counters as the guest left them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GuestCounters {
    /// Passes completed.
    pub passes: u64,
    /// Pages checked.
    pub pages: u64,
    /// Violations found.
    pub violations: u64,
    /// Steps restarted because a discard hit the page being worked on.
    pub retries: u64,
    /// Page being worked on.
    pub cursor: u64,
}

/// The first violation a vCPU found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestViolation {
    /// vCPU.
    pub vcpu: usize,
    /// Guest frame number of the bad page.
    pub gfn: u64,
    /// First bad qword.
    pub index: u64,
    /// Expected value.
    pub expected: u64,
    /// Value read.
    pub actual: u64,
    /// Expected generation (0: the page was logged as discarded, zero due).
    pub generation: u64,
    /// Pass of the vCPU then.
    pub pass: u64,
}

impl GuestViolation {
    /// What kind of violation this is, in words.
    pub fn describe(&self) -> String {
        let what = if self.generation == 0 {
            "stale read: the page was discarded (logged) and must read zero, but holds old data"
        } else if self.actual == 0 {
            "lost write: the page reads zero where the last stamp must be (not logged as discarded)"
        } else {
            "lost write / corruption: the page does not hold its last stamp"
        };
        format!(
            "{what}; vCPU {} pass {}: gfn {:#x} (gpa {:#x}) qword {}: expected {:#x} (generation {}), read {:#x}",
            self.vcpu,
            self.pass,
            self.gfn,
            self.gfn << 12,
            self.index,
            self.expected,
            self.generation,
            self.actual
        )
    }
}

/// The shared area of one run.
#[derive(Debug, Clone)]
pub struct SharedLog {
    area: SharedArea,
    slices: Vec<Range<u64>>,
}

impl SharedLog {
    /// For `area` and the vCPUs' slices.
    pub fn new(area: SharedArea, slices: Vec<Range<u64>>) -> SharedLog {
        SharedLog { area, slices }
    }

    fn read(mem: &GuestMemoryMmap, gpa: u64) -> Result<u64, SharedError> {
        mem.read_obj(GuestAddress(gpa))
            .map_err(|source| SharedError { gpa, source })
    }

    fn write<T: vm_memory::ByteValued>(
        mem: &GuestMemoryMmap,
        gpa: u64,
        v: T,
    ) -> Result<(), SharedError> {
        mem.write_obj(v, GuestAddress(gpa))
            .map_err(|source| SharedError { gpa, source })
    }

    fn field(&self, cpu: usize, off: u64) -> u64 {
        self.area.ctrl_block(cpu) + off
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.slices.len()
    }

    /// The vCPU whose slice holds `gpa`.
    pub fn owner(&self, gpa: u64) -> Option<usize> {
        self.slices.iter().position(|s| s.contains(&gpa))
    }

    /// Log the pages of `[gpa, gpa + len)` as discarded: expect-zero flags
    /// set, owners' epochs bumped. Call with the vCPUs paused, before the
    /// discard.
    pub fn log_discard(
        &self,
        mem: &GuestMemoryMmap,
        gpa: u64,
        len: u64,
    ) -> Result<(), SharedError> {
        let pages = len / 4096;
        let ones = vec![1u8; pages as usize];
        // The guest's slices and flags are in its virtual space (RAM above
        // the 32-bit MMIO hole continues it); a discard never crosses the hole.
        let gpa = crate::testguest::layout::Layout::va_of(gpa);
        let at = self.area.flag(gpa);
        mem.write_slice(&ones, GuestAddress(at))
            .map_err(|source| SharedError { gpa: at, source })?;
        let mut bumped = Vec::new();
        for p in 0..pages {
            if let Some(o) = self.owner(gpa + p * 4096) {
                if !bumped.contains(&o) {
                    bumped.push(o);
                    let e = self.field(o, OFF_EPOCH);
                    Self::write(mem, e, Self::read(mem, e)? + 1)?;
                }
            }
        }
        Ok(())
    }

    /// Ask every vCPU to stop at the end of its pass.
    pub fn request_stop(&self, mem: &GuestMemoryMmap) -> Result<(), SharedError> {
        for cpu in 0..self.vcpus() {
            Self::write(mem, self.field(cpu, OFF_STOP), 1u64)?;
        }
        Ok(())
    }

    /// vCPU `cpu`'s counters.
    pub fn counters(
        &self,
        mem: &GuestMemoryMmap,
        cpu: usize,
    ) -> Result<GuestCounters, SharedError> {
        Ok(GuestCounters {
            passes: Self::read(mem, self.field(cpu, OFF_PASSES))?,
            pages: Self::read(mem, self.field(cpu, OFF_PAGES))?,
            violations: Self::read(mem, self.field(cpu, OFF_VIOLATIONS))?,
            retries: Self::read(mem, self.field(cpu, OFF_RETRIES))?,
            cursor: Self::read(mem, self.field(cpu, OFF_CURSOR))?,
        })
    }

    /// Every vCPU's counters.
    pub fn all_counters(&self, mem: &GuestMemoryMmap) -> Result<Vec<GuestCounters>, SharedError> {
        (0..self.vcpus()).map(|c| self.counters(mem, c)).collect()
    }

    /// The first violation of each vCPU that found one.
    pub fn violations(&self, mem: &GuestMemoryMmap) -> Result<Vec<GuestViolation>, SharedError> {
        let mut v = Vec::new();
        for cpu in 0..self.vcpus() {
            if Self::read(mem, self.field(cpu, OFF_VIOLATIONS))? == 0 {
                continue;
            }
            let f = |off| Self::read(mem, self.field(cpu, off));
            v.push(GuestViolation {
                vcpu: cpu,
                gfn: f(OFF_BAD_GFN)?,
                index: f(OFF_BAD_INDEX)?,
                expected: f(OFF_BAD_EXPECTED)?,
                actual: f(OFF_BAD_ACTUAL)?,
                generation: f(OFF_BAD_GEN)?,
                pass: f(OFF_BAD_PASS)?,
            });
        }
        Ok(v)
    }
}
