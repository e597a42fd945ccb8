//! Which x86 KVM MMU the mirror mirrors, and the module parameters that
//! change what it maps (`/sys/module/kvm/parameters/{tdp_mmu,nx_huge_pages,
//! eager_page_split}`).

use crate::units::Level;

/// The kernel version every rule of [`super`] follows (see `thp/src/lib.rs`).
pub const KERNEL: &str = "Linux 6.18";

/// The MMU that builds the secondary page tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MmuKind {
    /// The TDP MMU (`tdp_mmu=Y`, EPT/NPT, arch/x86/kvm/mmu/tdp_mmu.c): the
    /// guest's page tables do not matter; a 4K fault under a 2M leaf splits
    /// it into 512 leaves; dirty logging eager-splits; no prefetch.
    Tdp,
    /// The shadow MMU (arch/x86/kvm/mmu/mmu.c + paging_tmpl.h): the guest's
    /// page size caps the level; gfns holding guest page tables are
    /// write-tracked (`account_shadowed`); a 4K fault under a 2M leaf drops
    /// it (`drop_large_spte`); faults prefetch up to
    /// [`PTE_PREFETCH_NUM`] neighbours (`direct_pte_prefetch`).
    Shadow,
}

/// `PTE_PREFETCH_NUM` (arch/x86/kvm/mmu/mmu.c).
pub const PTE_PREFETCH_NUM: u64 = 8;

/// The MMU and the module parameters of one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmuParams {
    /// TDP or shadow MMU.
    pub kind: MmuKind,
    /// `kvm.nx_huge_pages`: an exec fault maps 4K in its frame
    /// (`kvm_mmu_hugepage_adjust` sets `huge_page_disallowed`) and later
    /// faults in that frame stay 4K (`disallowed_hugepage_adjust`).
    pub nx_huge_pages: bool,
    /// `kvm.eager_page_split`: turning dirty logging on splits 2M leaves
    /// into 4K ones at once (TDP MMU only in `kvm_mmu_slot_try_split_huge_pages`).
    pub eager_page_split: bool,
    /// `KVM_DIRTY_LOG_INITIALLY_SET` with manual protect: turning dirty
    /// logging on neither splits nor write-protects.
    pub dirty_log_initially_set: bool,
    /// `max_huge_page_level`: [`Level::G1`] when the CPU has 1G pages,
    /// else [`Level::M2`].
    pub max_huge_page_level: Level,
}

impl MmuParams {
    /// The TDP MMU with the kernel's defaults on AMD (`nx_huge_pages`
    /// auto = off, `eager_page_split` = Y) and 1G pages.
    pub fn tdp() -> MmuParams {
        MmuParams {
            kind: MmuKind::Tdp,
            nx_huge_pages: false,
            eager_page_split: true,
            dirty_log_initially_set: false,
            max_huge_page_level: Level::G1,
        }
    }

    /// The shadow MMU (`tdp_mmu=N`, no EPT/NPT) with the same defaults.
    pub fn shadow() -> MmuParams {
        MmuParams {
            kind: MmuKind::Shadow,
            ..MmuParams::tdp()
        }
    }

    /// From the host's facts: the TDP MMU runs when the host has hardware
    /// two-dimensional paging and `tdp_mmu=Y`; otherwise the shadow MMU
    /// (a VT-x host with `tdp_mmu=N` uses the legacy direct MMU, which maps
    /// like the shadow MMU minus write tracking of guest tables: not modelled,
    /// treated as shadow).
    pub fn from_host(tdp: bool, nx_huge_pages: bool, eager_page_split: bool) -> MmuParams {
        MmuParams {
            kind: if tdp { MmuKind::Tdp } else { MmuKind::Shadow },
            nx_huge_pages,
            eager_page_split,
            ..MmuParams::tdp()
        }
    }

    /// The largest page KVM maps on this host, as `kvm_configure_mmu`
    /// (arch/x86/kvm/mmu/mmu.c) sets `max_huge_page_level`: with TDP, the
    /// level its caller passes (`svm_hardware_setup`: `PG_LEVEL_1G` for NPT
    /// whatever the CPU; `vmx_hardware_setup`: `ept_caps_to_lpage_level`,
    /// 1G only with the EPT 1G-page capability); with shadow paging, 1G
    /// only if the host CPU has `X86_FEATURE_GBPAGES` (`pdpe1gb`).
    /// `tdp_enabled`: EPT or NPT in use (the TDP MMU or the legacy one).
    pub fn kvm_configure_mmu_max_huge_page_level(tdp_enabled: bool, cpu: HugePageCpu) -> Level {
        let gig = match (tdp_enabled, cpu.vendor) {
            (true, TdpVendor::Npt) => true,
            (true, TdpVendor::Ept) => cpu.ept_1gb,
            (false, _) => cpu.gbpages,
        };
        if gig {
            Level::G1
        } else {
            Level::M2
        }
    }

    /// Whether this is the shadow MMU.
    pub fn shadow_paging(&self) -> bool {
        self.kind == MmuKind::Shadow
    }
}

impl Default for MmuParams {
    fn default() -> Self {
        MmuParams::tdp()
    }
}

/// Which two-dimensional paging a TDP host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdpVendor {
    /// AMD-V nested page tables.
    Npt,
    /// Intel VT-x extended page tables.
    Ept,
}

/// The CPU facts behind KVM's largest page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePageCpu {
    /// NPT or EPT (meaningful with TDP only).
    pub vendor: TdpVendor,
    /// EPT can map 1G pages (`/proc/cpuinfo` "vmx flags": `ept_1gb`).
    pub ept_1gb: bool,
    /// The CPU has 1G pages (`/proc/cpuinfo` flags: `pdpe1gb`).
    pub gbpages: bool,
}
