//! Guest-physical layout of guest RAM around the 32-bit MMIO hole, and the
//! KVM memslots over it.
//!
//! RAM fills guest-physical `[0, MMIO_HOLE_START)` first; whatever does not
//! fit there starts at 4 GiB ([`HIGH_RAM_START`]), as on a PC (Firecracker,
//! Cloud Hypervisor and QEMU do the same). The hole `[3 GiB, 4 GiB)` holds
//! the virtio-mmio devices and the LAPIC/IOAPIC.
//!
//! The host range of guest RAM mirrors guest-physical space one to one:
//! guest-physical `gpa` lives at host `base + gpa`, hole included (never
//! populated, in no memslot). So frame `f` is guest-physical
//! `[f * 2M, (f + 1) * 2M)` whichever side of the hole it is on, guest and
//! host addresses are congruent modulo 2M in every memslot, and the host
//! range costs only address space for the hole.

use std::ops::Range;

use crate::error::GuestMemError;
use crate::{HPAGE_SIZE, PAGE_SIZE};

/// Start of the 32-bit MMIO hole: RAM below it ends here.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Where RAM resumes above the hole (4 GiB).
pub const HIGH_RAM_START: u64 = 1 << 32;
/// Largest guest RAM: 511 GiB, so that RAM (3 GiB below the hole, the rest
/// from 4 GiB) ends at 512 GiB: the guest-physical space one page-directory
/// pointer table of the test guests maps, and far below the 39-bit physical
/// address width of any x86-64 CPU KVM runs on. What a host can really back
/// is usually less (see `--help` of `vmm run`).
pub const MAX_RAM_SIZE: u64 = 511 << 30;
/// Most memslots guest RAM may be cut into (`--memslot-size`): KVM allows
/// thousands, a mirror test needs a few.
pub const MAX_MEMSLOTS: usize = 4096;

/// One contiguous piece of guest RAM in guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    /// First guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

impl RamRegion {
    /// `[gpa, gpa + size)`.
    pub fn range(&self) -> Range<u64> {
        self.gpa..self.gpa + self.size
    }
}

/// A KVM memslot over guest RAM (`KVM_SET_USER_MEMORY_REGION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamSlot {
    /// Slot id.
    pub id: u32,
    /// First guest-physical address (4K aligned).
    pub gpa: u64,
    /// Bytes (4K multiple).
    pub size: u64,
    /// Host virtual address of `gpa`.
    pub host_addr: u64,
}

impl RamSlot {
    /// `[gpa, gpa + size)`.
    pub fn range(&self) -> Range<u64> {
        self.gpa..self.gpa + self.size
    }
}

/// Where guest RAM lies in guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamLayout {
    size: u64,
}

impl RamLayout {
    /// The layout of `size` bytes of RAM (a positive multiple of 2M, at most
    /// [`MAX_RAM_SIZE`]).
    pub fn new(size: u64) -> Result<RamLayout, GuestMemError> {
        if size == 0 || !size.is_multiple_of(HPAGE_SIZE) {
            return Err(GuestMemError::SizeNotMultipleOf2M { size });
        }
        if size > MAX_RAM_SIZE {
            return Err(GuestMemError::SizeTooLarge {
                size,
                max: MAX_RAM_SIZE,
            });
        }
        Ok(RamLayout { size })
    }

    /// Bytes of RAM.
    pub fn ram_size(&self) -> u64 {
        self.size
    }

    /// Bytes of RAM below the hole.
    pub fn low_size(&self) -> u64 {
        self.size.min(MMIO_HOLE_START)
    }

    /// Bytes of RAM from 4 GiB up.
    pub fn high_size(&self) -> u64 {
        self.size - self.low_size()
    }

    /// End of guest-physical RAM (exclusive): the size of the host range.
    pub fn span(&self) -> u64 {
        match self.high_size() {
            0 => self.size,
            h => HIGH_RAM_START + h,
        }
    }

    /// Number of 2M frames of the span (hole included).
    pub fn span_frames(&self) -> usize {
        (self.span() / HPAGE_SIZE) as usize
    }

    /// Number of 2M frames of RAM.
    pub fn ram_frames(&self) -> usize {
        (self.size / HPAGE_SIZE) as usize
    }

    /// The RAM regions, in guest-physical order (one or two).
    pub fn regions(&self) -> Vec<RamRegion> {
        let mut v = vec![RamRegion {
            gpa: 0,
            size: self.low_size(),
        }];
        if self.high_size() > 0 {
            v.push(RamRegion {
                gpa: HIGH_RAM_START,
                size: self.high_size(),
            });
        }
        v
    }

    /// Frame indices of RAM (the hole's frames left out).
    pub fn ram_frame_indices(&self) -> impl Iterator<Item = usize> + '_ {
        let hpage = HPAGE_SIZE;
        self.regions()
            .into_iter()
            .flat_map(move |r| (r.gpa / hpage) as usize..(r.range().end / hpage) as usize)
    }

    /// Whether frame `f` is RAM.
    pub fn frame_is_ram(&self, f: usize) -> bool {
        let gpa = f as u64 * HPAGE_SIZE;
        self.regions().iter().any(|r| r.range().contains(&gpa))
    }

    /// Whether `[gpa, gpa + len)` lies inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        self.regions()
            .iter()
            .any(|r| gpa >= r.gpa && end <= r.range().end)
    }

    /// The guest-physical address of RAM offset `off` (RAM counted without
    /// the hole): `off` below the hole, `off + 1 GiB` above it.
    pub fn gpa_of_offset(&self, off: u64) -> u64 {
        if off < MMIO_HOLE_START {
            off
        } else {
            off - MMIO_HOLE_START + HIGH_RAM_START
        }
    }

    /// The memslots over RAM at host address `base` (`base + gpa`): one per
    /// region, or pieces of at most `max_slot` bytes (a 4K multiple; a piece
    /// that is not a 2M multiple leaves partial 2M frames at slot edges,
    /// where KVM maps 4K only).
    pub fn memslots(
        &self,
        base: u64,
        max_slot: Option<u64>,
    ) -> Result<Vec<RamSlot>, GuestMemError> {
        if let Some(m) = max_slot {
            if m == 0 || !m.is_multiple_of(PAGE_SIZE) {
                return Err(GuestMemError::BadMemslotSize {
                    size: m,
                    why: "it must be a positive multiple of 4 KiB",
                });
            }
        }
        let mut v = Vec::new();
        for r in self.regions() {
            let piece = max_slot.unwrap_or(r.size);
            let mut gpa = r.gpa;
            while gpa < r.range().end {
                let size = piece.min(r.range().end - gpa);
                if v.len() >= MAX_MEMSLOTS {
                    return Err(GuestMemError::BadMemslotSize {
                        size: piece,
                        why: "it cuts guest RAM into more than 4096 memslots",
                    });
                }
                v.push(RamSlot {
                    id: v.len() as u32,
                    gpa,
                    size,
                    host_addr: base + gpa,
                });
                gpa += size;
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;

    #[test]
    fn small_ram_is_one_region_below_the_hole() {
        let l = RamLayout::new(256 * M).unwrap();
        assert_eq!(
            l.regions(),
            vec![RamRegion {
                gpa: 0,
                size: 256 * M
            }]
        );
        assert_eq!(l.span(), 256 * M);
        assert_eq!(l.ram_frame_indices().count(), 128);
        let l = RamLayout::new(3 * G).unwrap();
        assert_eq!(l.regions().len(), 1);
        assert_eq!(l.span(), 3 * G);
    }

    #[test]
    fn large_ram_continues_at_4g() {
        let l = RamLayout::new(8 * G).unwrap();
        assert_eq!(
            l.regions(),
            vec![
                RamRegion {
                    gpa: 0,
                    size: 3 * G
                },
                RamRegion {
                    gpa: 4 * G,
                    size: 5 * G
                }
            ]
        );
        assert_eq!(l.span(), 9 * G);
        assert_eq!(l.span_frames(), 9 * 512);
        assert_eq!(l.ram_frames(), 8 * 512);
        let frames: Vec<usize> = l.ram_frame_indices().collect();
        assert_eq!(frames.len(), 8 * 512);
        assert_eq!(frames[1535], 1535);
        assert_eq!(frames[1536], 2048);
        assert!(!l.frame_is_ram(1536) && !l.frame_is_ram(2047) && l.frame_is_ram(2048));
        assert!(l.contains(4 * G, 5 * G) && !l.contains(3 * G - 4096, 8192));
        assert!(!l.contains(9 * G, 4096) && !l.contains(u64::MAX, 2));
        assert_eq!(l.gpa_of_offset(3 * G), 4 * G);
        assert_eq!(l.gpa_of_offset(3 * G - 1), 3 * G - 1);
    }

    #[test]
    fn memslots_per_region_or_per_piece() {
        let l = RamLayout::new(4 * G).unwrap();
        let s = l.memslots(0x7f00_0000_0000, None).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].id, s[1].gpa, s[1].size), (1, 4 * G, G));
        assert_eq!(s[1].host_addr, 0x7f00_0000_0000 + 4 * G);
        let s = l.memslots(0, Some(G + 3 * M)).unwrap();
        let sizes: Vec<u64> = s.iter().map(|s| s.size).collect();
        assert_eq!(sizes, vec![G + 3 * M, G + 3 * M, G - 6 * M, G]);
        assert!(l.memslots(0, Some(0)).is_err());
        assert!(l.memslots(0, Some(4097)).is_err());
        assert!(l.memslots(0, Some(4096)).is_err());
    }

    #[test]
    fn sizes_are_checked() {
        assert!(RamLayout::new(0).is_err());
        assert!(RamLayout::new(3 * M).is_err());
        assert!(RamLayout::new(MAX_RAM_SIZE).is_ok());
        assert!(RamLayout::new(MAX_RAM_SIZE + 2 * M).is_err());
        assert_eq!(RamLayout::new(MAX_RAM_SIZE).unwrap().span(), 512 * G);
    }
}
