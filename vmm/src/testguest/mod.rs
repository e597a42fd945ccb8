//! Built-in test guests: machine code generated at run time with iced-x86's
//! assembler, and the port-I/O test device they talk through.
//!
//! # Life of a test guest
//!
//! 1. The VMM calls [`build`], writes the boot structures with
//!    [`crate::boot::long_mode::setup`], loads the image with
//!    [`TestGuestImage::load`], configures every vCPU with
//!    [`crate::boot::long_mode::configure_vcpu`] (after `KVM_SET_CPUID2`) and
//!    [`TestGuestImage::initial_regs`] (RIP = `entry`, RDI = vCPU index,
//!    RFLAGS = 2; the guest sets its own RSP).
//! 2. CPL0 (emulated on paravirtual hosts, so kept to a few hundred
//!    instructions plus one store per 2 MiB of RAM): every vCPU loads the
//!    guest's GDT, IDT and its own TSS; vCPU 0 builds identity page tables over
//!    all RAM with 2M pages (user accessible; with `guest_pages = 1g`, a 1G
//!    page for every whole GiB of RAM) while the others wait on a flag; all
//!    switch CR3 and `iretq` to CPL3 with IOPL=3.
//! 3. CPL3 (native): with `guest_pages = 4k`, vCPU 0 builds 4K-page tables
//!    over all RAM; every vCPU then loads its final CR3 through the CR3
//!    service (a `mov cr3, rax` at CPL3 at a known site, whose #GP the stub
//!    turns into the real thing: `int n` from CPL3 is not emulated on
//!    paravirtual hosts). Then every vCPU runs the workload on its slice;
//!    vCPUs other than 0 park with HLT (a `hlt` at CPL3 at the park site,
//!    executed by the #GP stub at CPL0; without an in-kernel irqchip this is
//!    `KVM_EXIT_HLT`, with one the vCPU sleeps until the VMM stops it). vCPU 0 waits for all
//!    workloads, then sends EXIT with the OR of their statuses.
//! 4. Any exception lands in an IDT stub that sends FAULT (vector, error
//!    code, RIP, CR2) and halts.
//!
//! See [`layout`] for the memory map and [`device`] for the port protocol.

pub mod builder;
pub mod device;
pub mod guests;
pub mod layout;
mod runtime;
pub mod tables;
pub mod touch;

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use kvm_bindings::{kvm_regs, CpuId};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use device::{ReportKey, TestDevice, TestDeviceAction};
pub use layout::Layout;

/// Errors building or loading a test guest.
#[derive(Debug, thiserror::Error)]
pub enum TestGuestError {
    /// Unknown guest name.
    #[error("unknown test guest {name:?}; valid names: {valid}")]
    UnknownGuest {
        /// Name given.
        name: String,
        /// Comma-separated valid names.
        valid: String,
    },
    /// Unknown guest page size.
    #[error("unknown guest page size {0:?}; valid: 4k, 2m, 1g")]
    UnknownPageSize(String),
    /// `guest_pages = 1g` on a guest CPU without 1G pages.
    #[error(
        "guest pages 1g need 1 GiB pages, but the guest CPU lacks pdpe1gb (CPUID 0x80000001 EDX \
         bit 26 is clear in the CPUID KVM offers); use --guest-pages 2m"
    )]
    No1GPages,
    /// Bad RAM size.
    #[error("test guest RAM size {ram_size:#x} must be a multiple of 2 MiB in [{min:#x}, {max:#x}] (reserved region plus one 2 MiB frame per vCPU)")]
    RamSize {
        /// Given.
        ram_size: u64,
        /// Smallest valid for these parameters.
        min: u64,
        /// Largest valid.
        max: u64,
    },
    /// Bad vCPU count.
    #[error("test guests support 1..={max} vCPUs, got {vcpus}")]
    Vcpus {
        /// Given.
        vcpus: usize,
        /// Largest valid.
        max: usize,
    },
    /// Bad generation count.
    #[error("generations must be in 1..=1000000, got {0}")]
    Generations(u32),
    /// A guest argument the guest does not know.
    #[error("test guest {guest} has no argument {arg:?}; valid: {valid}")]
    UnknownArg {
        /// Guest.
        guest: TestGuestName,
        /// Argument given.
        arg: String,
        /// Valid arguments.
        valid: String,
    },
    /// A guest argument out of range.
    #[error("test guest {guest}: argument {arg} = {value} is invalid: {why}")]
    BadArg {
        /// Guest.
        guest: TestGuestName,
        /// Argument.
        arg: &'static str,
        /// Value.
        value: u64,
        /// Reason.
        why: String,
    },
    /// Assembler failure (a bug in a guest generator).
    #[error("assembling the test guest: {0}")]
    Assemble(#[from] iced_x86::IcedError),
    /// Code or strings do not fit their areas.
    #[error("test guest {what} of {size} bytes exceeds its area of {max} bytes")]
    TooLarge {
        /// Which area.
        what: &'static str,
        /// Needed.
        size: u64,
        /// Available.
        max: u64,
    },
    /// Writing the image into guest memory failed.
    #[error("loading the test guest image at {gpa:#x}: {source}")]
    Load {
        /// Where.
        gpa: u64,
        /// Cause.
        source: vm_memory::GuestMemoryError,
    },
}

/// Which test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TestGuestName {
    /// Prints a greeting, writes every page of the work region, exits 0.
    Hello,
    /// Stamps and re-checks every page of each vCPU's slice for G generations.
    Verify,
    /// Gives back one 4K page of K frames, checks the rest, refills.
    Unmap,
    /// Reads an unmapped address on purpose (exercises the FAULT path).
    Fault,
    /// TLB-heavy pointer chase / GUPS timed with rdtsc (`vmm bench tlb`).
    Tlb,
    /// Endless check-and-restamp passes under host invalidations (`vmm stress`).
    Stress,
}

impl TestGuestName {
    /// All guests.
    pub const ALL: [TestGuestName; 6] = [
        TestGuestName::Hello,
        TestGuestName::Verify,
        TestGuestName::Unmap,
        TestGuestName::Fault,
        TestGuestName::Tlb,
        TestGuestName::Stress,
    ];

    /// CLI spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TestGuestName::Hello => "hello",
            TestGuestName::Verify => "verify",
            TestGuestName::Unmap => "unmap",
            TestGuestName::Fault => "fault",
            TestGuestName::Tlb => "tlb",
            TestGuestName::Stress => "stress",
        }
    }

    fn valid_list() -> String {
        Self::ALL.map(Self::as_str).join(", ")
    }
}

impl fmt::Display for TestGuestName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TestGuestName {
    type Err = TestGuestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| TestGuestError::UnknownGuest {
                name: s.to_owned(),
                valid: Self::valid_list(),
            })
    }
}

/// Page size of the page tables the guest runs its workload on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestPageSize {
    /// 4 KiB pages.
    Size4K,
    /// 2 MiB pages.
    Size2M,
    /// 1 GiB pages for every whole GiB of RAM, 2 MiB pages for the rest
    /// (the guest CPU needs `pdpe1gb`).
    Size1G,
}

impl GuestPageSize {
    /// The largest page the guest's final page tables use, in bytes.
    pub fn bytes(self) -> u64 {
        match self {
            GuestPageSize::Size4K => layout::PAGE,
            GuestPageSize::Size2M => layout::HPAGE,
            GuestPageSize::Size1G => layout::GIB,
        }
    }
}

impl fmt::Display for GuestPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestPageSize::Size4K => "4k",
            GuestPageSize::Size2M => "2m",
            GuestPageSize::Size1G => "1g",
        })
    }
}

impl FromStr for GuestPageSize {
    type Err = TestGuestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "4k" | "4096" => Ok(GuestPageSize::Size4K),
            "2m" | "2097152" => Ok(GuestPageSize::Size2M),
            "1g" | "1073741824" => Ok(GuestPageSize::Size1G),
            _ => Err(TestGuestError::UnknownPageSize(s.to_owned())),
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuestParams {
    /// Which guest.
    pub name: TestGuestName,
    /// Guest RAM size (gpa `0..ram_size`), multiple of 2 MiB.
    pub ram_size: u64,
    /// vCPU count.
    pub vcpus: usize,
    /// Page size of the guest's own page tables.
    pub guest_pages: GuestPageSize,
    /// Generations (`verify`, `unmap`).
    pub generations: u32,
    /// Guest-specific arguments (see [`guests::valid_args`]).
    pub args: BTreeMap<String, u64>,
}

impl TestGuestParams {
    /// Defaults: 1 vCPU, 4K guest pages, 2 generations, no arguments.
    pub fn new(name: TestGuestName, ram_size: u64) -> TestGuestParams {
        TestGuestParams {
            name,
            ram_size,
            vcpus: 1,
            guest_pages: GuestPageSize::Size4K,
            generations: 2,
            args: BTreeMap::new(),
        }
    }

    /// Checks that the guest CPU (`cpuid`, what the VMM gives the vCPUs)
    /// has what the guest's page tables use: 1G pages for
    /// `guest_pages = 1g` (else the guest's first walk through a 1G leaf
    /// faults with a reserved bit set).
    pub fn check_cpuid(&self, cpuid: &CpuId) -> Result<(), TestGuestError> {
        if self.guest_pages == GuestPageSize::Size1G && !crate::cpuid::has_pdpe1gb(cpuid) {
            return Err(TestGuestError::No1GPages);
        }
        Ok(())
    }
}

/// A built test guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestGuestImage {
    /// Which guest.
    pub name: TestGuestName,
    /// Where `bytes` go.
    pub load_addr: u64,
    /// Image: tables, strings, code, zeroed stacks and bootstrap tables.
    pub bytes: Vec<u8>,
    /// Entry point of every vCPU (CPL0, 64-bit).
    pub entry: u64,
    /// Gpa used by the VMM's boot structures and the guest's code, tables
    /// and stacks: `[0, end)`, end 2M aligned. The workload never touches it.
    pub reserved: Range<u64>,
    /// Per-vCPU slices of the work region (whole 2M frames).
    pub slices: Vec<Range<u64>>,
    /// The computed layout.
    pub layout: Layout,
    /// Gpa range of the guest's code.
    pub code: Range<u64>,
    /// The parts of `code` that run at CPL3 (the rest: CPL0 entry and
    /// exception stubs).
    pub user_code: Vec<Range<u64>>,
    /// The parameters it was built from.
    pub params: TestGuestParams,
}

impl TestGuestImage {
    /// The work region `[reserved.end, ram_size)`.
    pub fn work(&self) -> Range<u64> {
        self.layout.work()
    }

    /// Writes the image into guest memory.
    pub fn load(&self, mem: &GuestMemoryMmap) -> Result<(), TestGuestError> {
        mem.write_slice(&self.bytes, GuestAddress(self.load_addr))
            .map_err(|source| TestGuestError::Load {
                gpa: self.load_addr,
                source,
            })
    }

    /// Initial general registers of vCPU `cpu`.
    pub fn initial_regs(&self, cpu: usize) -> kvm_regs {
        kvm_regs {
            rip: self.entry,
            rdi: cpu as u64,
            rsp: Layout::kstack_top(cpu),
            rflags: 2,
            ..Default::default()
        }
    }

    /// A test device that refuses DISCARD/REFILL of the reserved region.
    pub fn device(&self) -> TestDevice {
        TestDevice::new(self.reserved.clone())
    }
}

/// Builds a test guest.
pub fn build(params: &TestGuestParams) -> Result<TestGuestImage, TestGuestError> {
    if params.generations == 0 || params.generations > 1_000_000 {
        return Err(TestGuestError::Generations(params.generations));
    }
    guests::check_args(params)?;
    let extra = match params.name {
        TestGuestName::Stress => guests::stress::SharedArea::bytes_needed(params.ram_size),
        _ => 0,
    };
    let layout = Layout::with_extra(params.ram_size, params.vcpus, params.guest_pages, extra)?;
    let mut b = builder::GuestBuilder::new(layout.clone())?;
    let workload = guests::emit(&mut b, params)?;
    let runtime::Assembled {
        entry,
        image: bytes,
        code_len,
        user_code,
    } = runtime::assemble(b, workload)?;
    log::debug!(
        "test guest {}: {} image bytes, code {:#x} bytes, entry {entry:#x}, reserved {:#x?}, {} vCPUs, {} guest pages",
        params.name,
        bytes.len(),
        code_len,
        layout.reserved,
        params.vcpus,
        params.guest_pages
    );
    Ok(TestGuestImage {
        name: params.name,
        load_addr: layout::IMAGE_ADDR,
        bytes,
        entry,
        reserved: layout.reserved.clone(),
        slices: layout.slices.clone(),
        code: layout::CODE_ADDR..layout::CODE_ADDR + code_len,
        user_code,
        params: params.clone(),
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(
            "verify".parse::<TestGuestName>().unwrap(),
            TestGuestName::Verify
        );
        let e = "nope".parse::<TestGuestName>().unwrap_err().to_string();
        assert!(e.contains("hello, verify, unmap, fault"), "{e}");
        assert_eq!(
            "2M".parse::<GuestPageSize>().unwrap(),
            GuestPageSize::Size2M
        );
    }

    #[test]
    fn page_sizes_parse_and_print() {
        let all = [
            GuestPageSize::Size4K,
            GuestPageSize::Size2M,
            GuestPageSize::Size1G,
        ];
        for p in all {
            assert_eq!(p.to_string().parse::<GuestPageSize>().unwrap(), p);
            assert_eq!(p.bytes().to_string().parse::<GuestPageSize>().unwrap(), p);
        }
        assert_eq!(GuestPageSize::Size1G.to_string(), "1g");
        assert_eq!(
            "1G".parse::<GuestPageSize>().unwrap(),
            GuestPageSize::Size1G
        );
        for bad in ["512g", "1gb", "", "2097153"] {
            let e = bad.parse::<GuestPageSize>().unwrap_err().to_string();
            assert!(e.contains("valid: 4k, 2m, 1g"), "{e}");
        }
    }

    #[test]
    fn one_gig_pages_need_pdpe1gb() {
        use kvm_bindings::kvm_cpuid_entry2;
        let cpuid = |edx| {
            CpuId::from_entries(&[kvm_cpuid_entry2 {
                function: 0x8000_0001,
                edx,
                ..Default::default()
            }])
            .unwrap()
        };
        let mut p = TestGuestParams::new(TestGuestName::Hello, 64 << 20);
        p.guest_pages = GuestPageSize::Size1G;
        assert!(p.check_cpuid(&cpuid(1 << 26)).is_ok());
        let e = p.check_cpuid(&cpuid(0)).unwrap_err();
        assert!(matches!(e, TestGuestError::No1GPages));
        assert!(e.to_string().contains("lacks pdpe1gb"), "{e}");
        p.guest_pages = GuestPageSize::Size2M;
        assert!(p.check_cpuid(&cpuid(0)).is_ok());
    }

    #[test]
    fn every_guest_builds_in_every_page_size() {
        for name in TestGuestName::ALL {
            for pages in [
                GuestPageSize::Size4K,
                GuestPageSize::Size2M,
                GuestPageSize::Size1G,
            ] {
                let mut p = TestGuestParams::new(name, 64 << 20);
                p.vcpus = 2;
                p.guest_pages = pages;
                let img = build(&p).unwrap();
                assert_eq!(img.load_addr, layout::IMAGE_ADDR);
                assert!(img.entry >= layout::CODE_ADDR && img.entry < layout::CODE_END);
                assert_eq!(
                    img.load_addr + img.bytes.len() as u64,
                    img.layout.boot_tables_end()
                );
                // 1g: no whole GiB in 64 MiB, so one PD of 2M pages.
                let end = match pages {
                    GuestPageSize::Size1G => layout::BOOT_PD + layout::PAGE,
                    _ => layout::BOOT_TABLES_END,
                };
                assert_eq!(img.layout.boot_tables_end(), end);
                assert!(img.reserved.end >= end);
            }
        }
        // And over 1G pages on both sides of the MMIO hole.
        let mut p = TestGuestParams::new(TestGuestName::Verify, (5 << 30) + (2 << 20));
        p.guest_pages = GuestPageSize::Size1G;
        let img = build(&p).unwrap();
        assert_eq!(img.layout.final_cr3, layout::BOOT_PML4);
    }

    #[test]
    fn bad_params_are_typed_errors() {
        let mut p = TestGuestParams::new(TestGuestName::Hello, 64 << 20);
        p.args.insert("bogus".into(), 1);
        assert!(matches!(build(&p), Err(TestGuestError::UnknownArg { .. })));
        let mut p = TestGuestParams::new(TestGuestName::Verify, 64 << 20);
        p.generations = 0;
        assert!(matches!(build(&p), Err(TestGuestError::Generations(0))));
        let p = TestGuestParams::new(TestGuestName::Verify, (64 << 20) + 4096);
        assert!(matches!(build(&p), Err(TestGuestError::RamSize { .. })));
    }
}
