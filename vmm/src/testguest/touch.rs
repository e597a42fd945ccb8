//! What a built-in test guest touches, for the KVM mirror: its page tables
//! (write-tracked by the shadow MMU), what its CPL3 code reads, writes and
//! executes in the reserved region, and which work pages it touched before
//! each checkpoint.
//!
//! On a paravirtual (shadow-paging) host the guest's CPL0 code is emulated
//! instruction by instruction: its accesses go through KVM's emulator and
//! install no SPTE. Only CPL3 code (native) faults pages in. On a TDP host
//! CPL0 runs natively too, and the CPU's own accesses (page-table walks,
//! IDT, GDT, TSS) go through the TDP page tables: every reserved frame that
//! holds any of these is touched.

use std::ops::Range;

use super::guests::stress::SharedArea;
use super::layout::{self, Layout, IMAGE_ADDR, PAGE, USTACK_ADDR, USTACK_SHIFT};
use super::{GuestPageSize, TestGuestImage, TestGuestName};
use crate::boot::long_mode::{BOOT_PD_ADDR, BOOT_PD_COUNT, BOOT_PML4_ADDR};

/// Where a test guest's accesses land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTouches {
    /// Page size of the guest's final page tables.
    pub guest_pages: GuestPageSize,
    /// Gpa ranges of guest page tables: the VMM's boot identity map and the
    /// guest's own tables (the shadow MMU shadows and write-tracks them).
    pub page_tables: Vec<Range<u64>>,
    /// The guest's code (CPL0 and CPL3).
    pub code: Range<u64>,
    /// The parts of it CPL3 executes (on a shadow-paging host only these
    /// are faulted in: CPL0 is emulated).
    pub user_code: Vec<Range<u64>>,
    /// The IDT and TSS pages: CPL3 never touches them; the host reads them
    /// to deliver an exception (no SPTE on a shadow-paging host, where that
    /// read is emulated), which sets the accessed bits of their guest PTEs.
    pub descriptor_tables: Range<u64>,
    /// Reserved-region data CPL3 reads or writes (or the host's event
    /// delivery reads for it): the pages from the image start to the code
    /// (GDT with sync words and slice table, IDT, TSS, command blocks,
    /// strings), the stress guest's shared area.
    pub data: Vec<Range<u64>>,
    /// The top page of each user stack (touched only in the phases
    /// [`Self::stack_touched_before`] says).
    pub stacks: Vec<Range<u64>>,
    /// The 4K page tables vCPU 0 writes at CPL3 through the bootstrap 2M map
    /// (`guest_pages = 4k` only).
    pub built_tables: Option<Range<u64>>,
    /// Guest-physical ranges the guest's tables (bootstrap and final) map
    /// with 1G pages (`guest_pages = 1g`: every whole GiB of RAM); 2M pages
    /// elsewhere.
    pub gig_pages: Vec<Range<u64>>,
    /// Guest-physical ranges of the work pages each vCPU touches in a phase
    /// that touches work (per vCPU; a slice that runs past the 32-bit MMIO
    /// hole in the guest's virtual space is two ranges).
    pub work: Vec<Vec<Range<u64>>>,
    /// The guest's name (phases differ per guest).
    pub name: TestGuestName,
    /// Every reserved frame (TDP hosts: the CPU walks tables and descriptor
    /// tables there).
    pub reserved: Range<u64>,
    /// Ranges CPL3 reads one byte of per page at the end of every pass
    /// through its final page tables (`stress`: the whole reserved region).
    pub swept: Vec<Range<u64>>,
}

impl GuestTouches {
    /// What `img` touches.
    pub fn of(img: &TestGuestImage) -> GuestTouches {
        let l = &img.layout;
        let mut page_tables = Vec::from([
            BOOT_PML4_ADDR..BOOT_PD_ADDR + BOOT_PD_COUNT * PAGE,
            layout::BOOT_PML4..l.boot_tables_end(),
        ]);
        let built_tables = match l.guest_pages {
            GuestPageSize::Size4K => {
                let r = l.pt4k_pml4()..l.tables_end;
                page_tables.push(r.clone());
                Some(r)
            }
            GuestPageSize::Size2M | GuestPageSize::Size1G => None,
        };
        // GDT page (sync words, slice table), IDT, TSS, command blocks and
        // strings: everything between the image start and the code.
        let mut data = Vec::with_capacity(3);
        data.push(IMAGE_ADDR..layout::CODE_ADDR);
        let stacks = (0..l.vcpus as u64)
            .map(|cpu| {
                let top = USTACK_ADDR + ((cpu + 1) << USTACK_SHIFT);
                top - PAGE..top
            })
            .collect();
        if img.name == TestGuestName::Stress {
            if let Ok(a) = SharedArea::new(l) {
                data.push(a.ctrl..a.ctrl + PAGE);
                data.push(a.flags..a.flags + a.pages);
            }
        }
        GuestTouches {
            guest_pages: l.guest_pages,
            page_tables,
            code: img.code.clone(),
            user_code: img.user_code.clone(),
            descriptor_tables: layout::IDT_ADDR..layout::CMD_ADDR,
            data,
            stacks,
            built_tables,
            gig_pages: l.gig_pages(),
            work: work_ranges(img, l),
            name: img.name,
            reserved: img.reserved.clone(),
            swept: match img.name {
                TestGuestName::Stress => vec![img.reserved.clone()],
                _ => Vec::new(),
            },
        }
    }

    /// Whether the guest touched its user stacks since the previous
    /// checkpoint, before checkpoint `phase` (`None`: the end of the run).
    /// `unmap` phases 2 and 4 only send commands (give back, take back) and
    /// check pages in registers: no push, no call, no stack slot written
    /// (phase 4 writes one only for a page that failed its check). What
    /// matters when a host change dropped KVM's mapping of a stack page: it
    /// comes back only when the guest touches it again.
    pub fn stack_touched_before(&self, phase: Option<u64>) -> bool {
        match self.name {
            TestGuestName::Unmap => !matches!(phase, Some(2) | Some(4)),
            _ => true,
        }
    }

    /// Whether, with `guest_pages = 4k` on a shadow-paging host, the IDT and
    /// TSS pages ([`Self::descriptor_tables`]) have their second SPTE (the
    /// one through the guest's 4K tables) at checkpoint `phase` (`None`: the
    /// end). They get it only from `FNAME(pte_prefetch)`: a later fault on
    /// a neighbour in their group of 8 PTEs, once an exception delivered
    /// after the switch to those tables set their accessed bits. The
    /// neighbours (GDT page, command page, first code page) fault before
    /// the first such exception (the first command's `out`), except the
    /// write of the status word in the GDT page after the workload: with
    /// one vCPU (the only case whose checkpoints are compared) that follows
    /// every checkpoint. `stress` reads them in its sweep. `fault` ends in
    /// its exception: the delivery sets their accessed bits, but no status
    /// write (nor any other fault) follows, so they never get it.
    pub fn descriptor_tables_remapped_before(&self, phase: Option<u64>) -> bool {
        match self.name {
            TestGuestName::Stress => true,
            TestGuestName::Fault => false,
            TestGuestName::Hello
            | TestGuestName::Verify
            | TestGuestName::Unmap
            | TestGuestName::Tlb => phase.is_none(),
        }
    }

    /// Whether the bootstrap tables (the final ones too unless
    /// `guest_pages = 4k`) map `gpa` with a 1G page (else 2M).
    pub fn gig_page_at(&self, gpa: u64) -> bool {
        self.gig_pages.iter().any(|r| r.contains(&gpa))
    }

    /// Whether the guest touched every page of [`Self::work`] since the
    /// previous checkpoint, before checkpoint `phase` (`None`: the end of
    /// the run, after the last checkpoint).
    pub fn work_touched_before(&self, phase: Option<u64>) -> bool {
        match self.name {
            // Phase 2 follows the give-back (nothing read); after phase 5 the
            // guest only reports and exits.
            TestGuestName::Unmap => !matches!(phase, Some(2) | None),
            TestGuestName::Fault => false,
            TestGuestName::Hello
            | TestGuestName::Verify
            | TestGuestName::Tlb
            | TestGuestName::Stress => true,
        }
    }
}

/// The work each vCPU touches, in guest-physical ranges: its slice, or for
/// `tlb` the first `ws` bytes.
fn work_ranges(img: &TestGuestImage, l: &Layout) -> Vec<Vec<Range<u64>>> {
    work_slices(img, l).iter().map(Layout::gpa_ranges).collect()
}

/// The work each vCPU touches in its virtual space.
fn work_slices(img: &TestGuestImage, l: &Layout) -> Vec<Range<u64>> {
    match img.name {
        TestGuestName::Fault => Vec::new(),
        TestGuestName::Tlb => {
            let slice = l.slices.iter().map(|s| s.end - s.start).min().unwrap_or(0);
            let ws = img.params.args.get("ws").copied().unwrap_or(slice);
            l.slices
                .iter()
                .map(|s| s.start..s.start + ws.min(s.end - s.start))
                .collect()
        }
        _ => l.slices.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testguest::{build, TestGuestParams};

    #[test]
    fn hello_touches_code_stack_and_its_slice() {
        let mut p = TestGuestParams::new(TestGuestName::Hello, 64 << 20);
        p.guest_pages = GuestPageSize::Size2M;
        p.vcpus = 2;
        let img = build(&p).unwrap();
        let t = GuestTouches::of(&img);
        assert!(t.code.start == layout::CODE_ADDR && t.code.end > t.code.start);
        let slices: Vec<Vec<Range<u64>>> = img.slices.iter().map(|s| vec![s.clone()]).collect();
        assert_eq!(t.work, slices);
        assert!(t.built_tables.is_none());
        assert!(t.stacks.contains(&(0x41000..0x42000)));
        assert!(t.stacks.contains(&(0x43000..0x44000)));
        assert!(t.page_tables.iter().any(|r| r.contains(&layout::BOOT_PML4)));
        assert!(t.work_touched_before(None));
    }

    #[test]
    fn unmap_phase_2_touches_no_work() {
        let img = build(&TestGuestParams::new(TestGuestName::Unmap, 64 << 20)).unwrap();
        let t = GuestTouches::of(&img);
        assert!(t.work_touched_before(Some(1)));
        assert!(!t.work_touched_before(Some(2)));
        assert!(t.work_touched_before(Some(3)));
        assert!(!t.work_touched_before(None));
        assert_eq!(
            t.built_tables,
            Some(img.layout.pt4k_pml4()..img.layout.tables_end)
        );
    }
}
