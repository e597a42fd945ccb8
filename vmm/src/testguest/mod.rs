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
//!    all RAM with 2M pages (user accessible) while the others wait on a
//!    flag; all switch CR3 and `iretq` to CPL3 with IOPL=3.
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

use kvm_bindings::kvm_regs;
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
    #[error("unknown guest page size {0:?}; valid: 4k, 2m")]
    UnknownPageSize(String),
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
}

impl fmt::Display for GuestPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestPageSize::Size4K => "4k",
            GuestPageSize::Size2M => "2m",
        })
    }
}

impl FromStr for GuestPageSize {
    type Err = TestGuestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "4k" | "4096" => Ok(GuestPageSize::Size4K),
            "2m" | "2097152" => Ok(GuestPageSize::Size2M),
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
    let (entry, bytes, code_len) = runtime::assemble(b, workload)?;
    log::debug!(
        "test guest {}: {} image bytes, entry {entry:#x}, reserved {:#x?}, {} vCPUs, {} guest pages",
        params.name,
        bytes.len(),
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
        assert!("1g".parse::<GuestPageSize>().is_err());
    }

    #[test]
    fn every_guest_builds_in_both_page_sizes() {
        for name in TestGuestName::ALL {
            for pages in [GuestPageSize::Size4K, GuestPageSize::Size2M] {
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
                assert_eq!(img.layout.boot_tables_end(), layout::BOOT_TABLES_END);
                assert!(img.reserved.end >= layout::BOOT_TABLES_END);
            }
        }
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
