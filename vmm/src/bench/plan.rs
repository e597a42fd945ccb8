//! The configurations of `vmm bench tlb`, guest memory sizing and run order.

use guest_mem::{Backing, HPAGE_SIZE};

use crate::testguest::layout::{Layout, MAX_RAM};
use crate::testguest::GuestPageSize;

use super::error::BenchError;

/// One measured configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Working set in bytes.
    pub working_set: u64,
    /// Guest page size (for native: the host page size that matches it).
    pub guest_pages: GuestPageSize,
    /// Host backing of guest RAM; `None` = native.
    pub backing: Option<Backing>,
}

impl Config {
    /// Short name for progress lines and errors.
    pub fn name(&self) -> String {
        format!(
            "ws {} guest-pages {} {}",
            size_name(self.working_set),
            self.guest_pages,
            match self.backing {
                Some(b) => format!("backing {b}"),
                None => "native".to_string(),
            }
        )
    }
}

/// `64M`, `2G`, `1536K` ...
pub fn size_name(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{}G", bytes >> 30)
    } else if bytes.is_multiple_of(1 << 20) {
        format!("{}M", bytes >> 20)
    } else if bytes.is_multiple_of(1 << 10) {
        format!("{}K", bytes >> 10)
    } else {
        format!("{bytes}B")
    }
}

/// Guest RAM for a working set: reserved region + working set (rounded to
/// 2M) + one 2M frame of slack; `Err` if that exceeds the largest guest RAM.
pub fn guest_memory(working_set: u64, pages: GuestPageSize) -> Result<u64, BenchError> {
    let ws = working_set.div_ceil(HPAGE_SIZE) * HPAGE_SIZE;
    let mut ram = ws + HPAGE_SIZE;
    while ram <= MAX_RAM {
        if let Ok(l) = Layout::new(ram, 1, pages) {
            if l.slices[0].end - l.slices[0].start >= ws {
                return Ok(ram + HPAGE_SIZE);
            }
        }
        ram += HPAGE_SIZE;
    }
    Err(BenchError::Usage(format!(
        "--working-set {}: with the test guest's reserved region it does not fit the largest guest RAM ({} MiB)",
        size_name(working_set),
        MAX_RAM >> 20
    )))
}

/// Checks the working sets.
pub fn check_working_sets(sets: &[u64]) -> Result<(), BenchError> {
    if sets.is_empty() {
        return Err(BenchError::Usage(
            "--working-set needs at least one size".into(),
        ));
    }
    for &ws in sets {
        if !ws.is_multiple_of(4096) {
            return Err(BenchError::Usage(format!(
                "--working-set {ws}: must be a multiple of 4 KiB (one chase slot per page)"
            )));
        }
        for p in [GuestPageSize::Size4K, GuestPageSize::Size2M] {
            guest_memory(ws, p)?;
        }
    }
    Ok(())
}

/// Every configuration of one repeat, in run order: working set, then guest
/// page size, native first, then the backings.
pub fn configs(
    sets: &[u64],
    pages: &[GuestPageSize],
    backings: &[Backing],
    native: bool,
) -> Vec<Config> {
    let mut v = Vec::new();
    for &working_set in sets {
        for &guest_pages in pages {
            if native {
                v.push(Config {
                    working_set,
                    guest_pages,
                    backing: None,
                });
            }
            for &b in backings {
                v.push(Config {
                    working_set,
                    guest_pages,
                    backing: Some(b),
                });
            }
        }
    }
    v
}

/// Hugetlb 2M pages the largest run needs (guest RAM or native table).
pub fn hugetlb_pages_needed(cfgs: &[Config]) -> u64 {
    cfgs.iter()
        .map(|c| match c.backing {
            Some(Backing::Hugetlb) => guest_memory(c.working_set, c.guest_pages)
                .map(|m| m / HPAGE_SIZE)
                .unwrap_or(0),
            // 1g native falls back to 2M hugetlb pages without a 1G pool.
            None if c.guest_pages != GuestPageSize::Size4K => c.working_set.div_ceil(HPAGE_SIZE),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_covers_working_set_and_reserved_region() {
        for p in [GuestPageSize::Size4K, GuestPageSize::Size2M] {
            for ws in [16u64 << 20, 64 << 20, 512 << 20, 2 << 30, (5 << 20) + 4096] {
                let m = guest_memory(ws, p).unwrap();
                assert!(m.is_multiple_of(HPAGE_SIZE));
                let l = Layout::new(m, 1, p).unwrap();
                assert!(l.slices[0].end - l.slices[0].start >= ws);
                assert!(
                    m <= ws + l.reserved.end + 4 * HPAGE_SIZE,
                    "{m:#x} for {ws:#x}"
                );
            }
        }
        // Above the 32-bit MMIO hole too; not beyond the largest guest RAM.
        let m = guest_memory(8 << 30, GuestPageSize::Size2M).unwrap();
        assert!(m > 8 << 30 && m <= (8 << 30) + 8 * HPAGE_SIZE, "{m:#x}");
        assert!(guest_memory(MAX_RAM, GuestPageSize::Size2M).is_err());
    }

    #[test]
    fn order_and_hugetlb_need() {
        let c = configs(
            &[64 << 20, 2 << 30],
            &[GuestPageSize::Size2M],
            &[Backing::Small4k, Backing::Hugetlb],
            true,
        );
        assert_eq!(c.len(), 6);
        assert_eq!(c[0].backing, None);
        assert_eq!(c[2].backing, Some(Backing::Hugetlb));
        let need = hugetlb_pages_needed(&c);
        assert!((1025..1040).contains(&need), "{need}");
        assert!(check_working_sets(&[4097]).is_err());
        assert!(check_working_sets(&[]).is_err());
    }

    #[test]
    fn size_names() {
        assert_eq!(size_name(2 << 30), "2G");
        assert_eq!(size_name(512 << 20), "512M");
        assert_eq!(size_name(4096), "4K");
    }
}
