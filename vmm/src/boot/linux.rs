//! Linux 64-bit direct boot: the kernel (ELF vmlinux at its physical address,
//! or bzImage), the zero page (boot_params with an e820 map), the command line,
//! the initrd and, for more than one vCPU, the MP table.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use guest_mem::RamLayout;
use linux_loader::cmdline::{Cmdline, Error as CmdlineError};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use object::elf::{FileHeader64, ProgramHeader64};
use object::LittleEndian as LE;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::mptable;

/// Guest-physical address of the zero page (boot_params).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top of the boot stack.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Guest-physical address of the command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (with its NUL) for an ELF kernel; a bzImage states its
/// own in `cmdline_size`. 2048 is x86's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of the first RAM range (640 KiB minus the 1 KiB gap for the MP table).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory.
pub const HIMEM_START: u64 = 0x10_0000;
/// Default command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 \
reboot=t noapic tsc=reliable lpj=1000000 init_on_alloc=0";

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const E820_RAM: u32 = 1;
const XLF_KERNEL_64: u16 = 1;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE: u64 = 4096;

/// A problem with the kernel, initrd, command line or memory size.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file is not a readable regular file (a FIFO is refused, not opened).
    #[error(transparent)]
    Input(#[from] crate::input_file::InputFileError),
    /// A file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error(
        "{path} is not a kernel: expected an x86-64 ELF vmlinux or a bzImage (\"HdrS\" at 0x202)"
    )]
    NotAKernel {
        /// The path.
        path: PathBuf,
    },
    /// The ELF is cut short or malformed.
    #[error("{path} is a damaged ELF kernel: {detail}")]
    BadElf {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// bzImage without a 64-bit entry point.
    #[error("{path}: this bzImage has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)")]
    No64BitEntry {
        /// The path.
        path: PathBuf,
    },
    /// Guest RAM cannot hold the kernel and initrd.
    #[error("guest memory of {mem_mib} MiB is too small: {what} needs memory up to {need:#x} ({need_mib} MiB); raise --memory")]
    MemoryTooSmall {
        /// What does not fit.
        what: &'static str,
        /// Required end address.
        need: u64,
        /// In MiB, rounded up.
        need_mib: u64,
        /// Guest RAM size in MiB.
        mem_mib: u64,
    },
    /// The command line is too long.
    #[error("the kernel command line is {len} bytes but the boot protocol allows at most {max} (including the defaults: {defaults_len} bytes); shorten --cmdline")]
    CmdlineTooLong {
        /// Length of the full command line.
        len: usize,
        /// Maximum length without the NUL.
        max: usize,
        /// Length of the default part.
        defaults_len: usize,
    },
    /// The command line has a NUL byte or non-ASCII.
    #[error("the kernel command line must be printable ASCII without NUL bytes")]
    CmdlineInvalid,
    /// The loader failed.
    #[error("loading {path} failed: {source}")]
    Loader {
        /// The path.
        path: PathBuf,
        /// The loader's error.
        source: linux_loader::loader::Error,
    },
    /// Writing boot data into guest memory failed.
    #[error("writing {what} into guest memory failed: {detail}")]
    GuestWrite {
        /// What was written.
        what: &'static str,
        /// The error.
        detail: String,
    },
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
}

impl BootError {
    /// Whether the user can fix this by changing the input (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, BootError::GuestWrite { .. })
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct LinuxBootSpec {
    /// vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// The full command line (defaults included).
    pub cmdline: String,
    /// Length of the default part of the command line (for error messages).
    pub defaults_len: usize,
    /// Number of vCPUs (MP table when > 1).
    pub vcpus: u8,
}

/// Where the kernel starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxEntry {
    /// Guest-physical 64-bit entry point.
    pub entry: u64,
    /// Guest-physical address of boot_params (goes in RSI).
    pub zero_page: u64,
    /// End of the loaded kernel image.
    pub kernel_end: u64,
    /// Initrd location, if any.
    pub initrd: Option<(u64, u64)>,
}

/// The command line: defaults, extra entries for this host, then the user's
/// parts in order (each trimmed, empty ones left out), joined by
/// `linux_loader`'s [`Cmdline`], which refuses a byte outside printable ASCII
/// and a line longer than x86's `COMMAND_LINE_SIZE` ([`CMDLINE_MAX_SIZE`],
/// NUL included). Returns the line and the length of its default part;
/// [`load`] checks it again against the kernel's own limit.
pub fn compose_cmdline(
    extra_host: Option<&str>,
    user: &[&str],
) -> Result<(String, usize), BootError> {
    fn parts<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        it.map(str::trim).filter(|p| !p.is_empty()).collect()
    }
    let defaults = parts(std::iter::once(DEFAULT_CMDLINE).chain(extra_host));
    let user = parts(user.iter().copied());
    let defaults_len = defaults.join(" ").len();
    // The joined length: the parts and one space between each two.
    let all = defaults.len() + user.len();
    let len = defaults.iter().chain(&user).map(|p| p.len()).sum::<usize>() + all - 1;
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|_| BootError::CmdlineInvalid)?;
    for part in defaults.iter().chain(&user) {
        c.insert_str(part)
            .map_err(|e| cmdline_error(e, len, CMDLINE_MAX_SIZE, defaults_len))?;
    }
    Ok((cmdline_text(&c)?, defaults_len))
}

/// The [`BootError`] of a refused command line of `len` bytes, `capacity`
/// with its NUL.
fn cmdline_error(e: CmdlineError, len: usize, capacity: usize, defaults_len: usize) -> BootError {
    match e {
        CmdlineError::TooLarge => BootError::CmdlineTooLong {
            len,
            max: capacity - 1,
            defaults_len,
        },
        _ => BootError::CmdlineInvalid,
    }
}

/// The text of a command line (without its NUL).
fn cmdline_text(c: &Cmdline) -> Result<String, BootError> {
    let s = c.as_cstring().map_err(|_| BootError::CmdlineInvalid)?;
    s.into_string().map_err(|_| BootError::CmdlineInvalid)
}

enum Kind {
    Elf { end: u64 },
    BzImage,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    let opt = if what == "initrd" {
        "--initrd"
    } else {
        "--kernel"
    };
    Ok(crate::input_file::open_regular(opt, path)?)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Classify the kernel file and, for ELF (headers read as `object`'s ELF
/// structures), check every loadable segment lies
/// inside the file (a truncated vmlinux is refused here with a clear reason).
fn classify(path: &Path, f: &mut File) -> Result<Kind, BootError> {
    let io = |source| BootError::File {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let file_len = f.metadata().map_err(io)?.len();
    let mut head = vec![0u8; 0x240.min(file_len as usize)];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    f.read_exact(&mut head).map_err(io)?;
    let bad = |detail: String| BootError::BadElf {
        path: path.to_path_buf(),
        detail,
    };
    if head.len() >= 4 && head[..4] == object::elf::ELFMAG {
        let (hdr, _) = object::pod::from_bytes::<FileHeader64<LE>>(&head).map_err(|()| {
            bad(format!(
                "only {} bytes, an ELF header needs {}",
                head.len(),
                std::mem::size_of::<FileHeader64<LE>>()
            ))
        })?;
        let ident = &hdr.e_ident;
        if ident.class != object::elf::ELFCLASS64
            || ident.data != object::elf::ELFDATA2LSB
            || hdr.e_machine.get(LE) != object::elf::EM_X86_64
        {
            return Err(bad("not a 64-bit little-endian x86-64 ELF".into()));
        }
        let phoff = hdr.e_phoff.get(LE);
        let phentsize = u64::from(hdr.e_phentsize.get(LE));
        let phnum = u64::from(hdr.e_phnum.get(LE));
        if phentsize != std::mem::size_of::<ProgramHeader64<LE>>() as u64 || phnum == 0 {
            return Err(bad(format!(
                "program header size {phentsize}, count {phnum}"
            )));
        }
        let ph_end = phoff
            .checked_add(phentsize * phnum)
            .filter(|&e| e <= file_len)
            .ok_or_else(|| {
                bad(format!(
                    "program headers end past the file ({file_len} bytes): truncated?"
                ))
            })?;
        let mut ph = vec![0u8; (ph_end - phoff) as usize];
        f.seek(SeekFrom::Start(phoff)).map_err(io)?;
        f.read_exact(&mut ph).map_err(io)?;
        let (phdrs, _) = object::pod::slice_from_bytes::<ProgramHeader64<LE>>(&ph, phnum as usize)
            .map_err(|()| bad("program headers unreadable".into()))?;
        let mut end = 0u64;
        let mut loads = 0;
        for p in phdrs
            .iter()
            .filter(|p| p.p_type.get(LE) == object::elf::PT_LOAD)
        {
            loads += 1;
            let offset = p.p_offset.get(LE);
            let paddr = p.p_paddr.get(LE);
            let filesz = p.p_filesz.get(LE);
            let memsz = p.p_memsz.get(LE);
            let fend = offset.saturating_add(filesz);
            if fend > file_len {
                return Err(bad(format!(
                    "segment at file offset {offset:#x} needs {filesz:#x} bytes but the file has {file_len:#x}: truncated"
                )));
            }
            if paddr < HIMEM_START {
                return Err(bad(format!(
                    "segment physical address {paddr:#x} is below 1 MiB"
                )));
            }
            end = end.max(paddr.saturating_add(memsz));
        }
        if loads == 0 {
            return Err(bad("no loadable segment".into()));
        }
        let entry = hdr.e_entry.get(LE);
        if entry < HIMEM_START || entry >= end {
            return Err(bad(format!(
                "entry {entry:#x} is not a physical address inside the kernel (is this an x86-64 vmlinux?)"
            )));
        }
        return Ok(Kind::Elf { end });
    }
    if head.len() >= 0x206 && le_u32(&head, 0x202) == KERNEL_HDR_MAGIC {
        return Ok(Kind::BzImage);
    }
    Err(BootError::NotAKernel {
        path: path.to_path_buf(),
    })
}

fn mib_up(b: u64) -> u64 {
    b.div_ceil(1 << 20)
}

fn too_small(what: &'static str, need: u64, mem: u64) -> BootError {
    BootError::MemoryTooSmall {
        what,
        need,
        need_mib: mib_up(need),
        mem_mib: mem >> 20,
    }
}

/// The kernel file, opened, classified and checked against the RAM below
/// the 32-bit MMIO hole: everything about it that needs no guest memory.
struct KernelFile {
    file: File,
    kind: Kind,
    /// bzImage: the decompressor's `init_size` (0 for ELF).
    init_size: u64,
}

/// Open and classify `spec.kernel`, and check that it fits in `mem_size`
/// bytes of RAM below the hole.
fn inspect_kernel(spec: &LinuxBootSpec, mem_size: u64) -> Result<KernelFile, BootError> {
    let mut file = open("kernel", &spec.kernel)?;
    let kind = classify(&spec.kernel, &mut file)?;
    let io = |source| BootError::File {
        what: "kernel",
        path: spec.kernel.clone(),
        source,
    };
    let init_size = match kind {
        Kind::Elf { end } => {
            if end > mem_size {
                return Err(too_small("the kernel", end, mem_size));
            }
            0
        }
        Kind::BzImage => {
            let file_len = file.metadata().map_err(io)?.len();
            // The decompressor needs init_size bytes from the load address; check
            // before loading (the loader only checks the compressed size).
            let mut hb = vec![0u8; 0x270.min(file_len as usize)];
            file.seek(SeekFrom::Start(0))
                .and_then(|_| file.read_exact(&mut hb))
                .map_err(io)?;
            let init_size = if hb.len() >= 0x264 {
                u64::from(le_u32(&hb, 0x260))
            } else {
                0
            };
            let need = HIMEM_START + init_size.max(file_len);
            if need > mem_size {
                return Err(too_small("the kernel (decompressed)", need, mem_size));
            }
            init_size
        }
    };
    Ok(KernelFile {
        file,
        kind,
        init_size,
    })
}

/// The checks of the kernel file that need no guest memory (what it is,
/// whether it is whole, whether it fits below the hole of `layout`): `vmm
/// run` makes them before it opens KVM; [`load`] makes them again.
pub fn check_kernel(layout: RamLayout, spec: &LinuxBootSpec) -> Result<(), BootError> {
    inspect_kernel(spec, layout.low_size()).map(|_| ())
}

/// Where the loaded kernel is and what it accepts.
struct LoadedKernel {
    entry: u64,
    end: u64,
    cmdline_max: usize,
    initrd_max: u64,
}

/// Load the kernel image into `mem`; the boot protocol header goes to `params`.
fn load_kernel(
    mem: &GuestMemoryMmap,
    spec: &LinuxBootSpec,
    k: &mut KernelFile,
    params: &mut boot_params,
) -> Result<LoadedKernel, BootError> {
    let loader_err = |source| BootError::Loader {
        path: spec.kernel.clone(),
        source,
    };
    match k.kind {
        Kind::Elf { end } => {
            let r = Elf::load(mem, None, &mut k.file, Some(GuestAddress(HIMEM_START)))
                .map_err(loader_err)?;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
            Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end.max(end),
                cmdline_max: CMDLINE_MAX_SIZE,
                initrd_max: DEFAULT_INITRD_ADDR_MAX,
            })
        }
        Kind::BzImage => {
            let r = BzImage::load(mem, None, &mut k.file, Some(GuestAddress(HIMEM_START)))
                .map_err(loader_err)?;
            let hdr = r.setup_header.ok_or_else(|| BootError::NotAKernel {
                path: spec.kernel.clone(),
            })?;
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry {
                    path: spec.kernel.clone(),
                });
            }
            params.hdr = hdr;
            Ok(LoadedKernel {
                // 64-bit entry: startup_64 is 0x200 past the protected-mode start.
                entry: r.kernel_load.0 + 0x200,
                end: (HIMEM_START + k.init_size).max(r.kernel_end),
                cmdline_max: if hdr.cmdline_size == 0 {
                    CMDLINE_MAX_SIZE
                } else {
                    hdr.cmdline_size as usize + 1
                },
                initrd_max: if hdr.initrd_addr_max == 0 {
                    DEFAULT_INITRD_ADDR_MAX
                } else {
                    u64::from(hdr.initrd_addr_max)
                },
            })
        }
    }
}

/// Write the command line (printable ASCII, within the kernel's limit, NUL
/// included); returns its length without the NUL.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    spec: &LinuxBootSpec,
    cmdline_max: usize,
) -> Result<usize, BootError> {
    let mut cmdline = Cmdline::new(cmdline_max).map_err(|_| BootError::CmdlineInvalid)?;
    cmdline
        .insert_str(&spec.cmdline)
        .map_err(|e| cmdline_error(e, spec.cmdline.len(), cmdline_max, spec.defaults_len))?;
    let cbytes = cmdline
        .as_cstring()
        .map_err(|_| BootError::CmdlineInvalid)?;
    mem.write_slice(cbytes.as_bytes_with_nul(), GuestAddress(CMDLINE_START))
        .map_err(|e| BootError::GuestWrite {
            what: "the command line",
            detail: e.to_string(),
        })?;
    Ok(cbytes.as_bytes().len())
}

/// Load the initrd page aligned, as high as allowed, above the kernel;
/// returns its (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    ipath: &Path,
    k: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let io = |source| BootError::File {
        what: "initrd",
        path: ipath.to_path_buf(),
        source,
    };
    let mut f = open("initrd", ipath)?;
    let size = f.metadata().map_err(io)?.len();
    let top = mem_size.min(k.initrd_max.saturating_add(1));
    let lowest = k.end.div_ceil(PAGE) * PAGE;
    let aligned = size.div_ceil(PAGE) * PAGE;
    if size == 0 || lowest + aligned > top {
        return Err(too_small(
            "the kernel plus the initrd",
            lowest + aligned,
            mem_size,
        ));
    }
    let addr = (top - aligned) & !(PAGE - 1);
    let mut data = Vec::with_capacity(size as usize);
    f.read_to_end(&mut data).map_err(io)?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what: "the initrd",
            detail: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Complete `params` (loader, command line, initrd, e820) and write the
/// zero page.
fn write_zero_page(
    mem: &GuestMemoryMmap,
    layout: RamLayout,
    mut params: boot_params,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    let e820 = e820_map(layout);
    params.e820_entries = e820.len() as u8;
    params.e820_table[..e820.len()].copy_from_slice(&e820);
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        what: "the zero page",
        detail: e.to_string(),
    })
}

/// The MP table, for more than one vCPU.
fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    if vcpus <= 1 {
        return Ok(());
    }
    let t = mptable::build(vcpus)?;
    mem.write_slice(&t, GuestAddress(mptable::MPTABLE_START))
        .map_err(|e| BootError::GuestWrite {
            what: "the MP table",
            detail: e.to_string(),
        })
}

/// Load everything into `mem` (guest RAM as `layout` places it; kernel,
/// initrd and boot data go below the 32-bit MMIO hole), step by step: the
/// kernel checked, loaded, the command line, the initrd, the zero page, the
/// MP table.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: RamLayout,
    spec: &LinuxBootSpec,
) -> Result<LinuxEntry, BootError> {
    let mem_size = layout.low_size();
    let mut kernel = inspect_kernel(spec, mem_size)?;
    let mut params = boot_params::default();
    let k = load_kernel(mem, spec, &mut kernel, &mut params)?;
    let cmdline_len = write_cmdline(mem, spec, k.cmdline_max)?;
    let initrd = match &spec.initrd {
        Some(ipath) => Some(load_initrd(mem, mem_size, ipath, &k)?),
        None => None,
    };
    write_zero_page(mem, layout, params, cmdline_len, initrd)?;
    write_mptable(mem, spec.vcpus)?;
    Ok(LinuxEntry {
        entry: k.entry,
        zero_page: ZERO_PAGE_START,
        kernel_end: k.end,
        initrd,
    })
}

/// The e820 map: RAM `[0, 0x9fc00)`, a hole to 1 MiB, RAM `[1 MiB, low
/// end)` below the 32-bit MMIO hole, and RAM from 4 GiB up when guest RAM
/// goes above the hole.
pub fn e820_map(layout: RamLayout) -> Vec<boot_e820_entry> {
    let mut v = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for r in layout.regions() {
        let start = r.gpa.max(HIMEM_START);
        if r.range().end > start {
            v.push(boot_e820_entry {
                addr: start,
                size: r.range().end - start,
                r#type: E820_RAM,
            });
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_skips_the_32bit_mmio_hole() {
        let m = e820_map(lay(8 << 30));
        let got: Vec<(u64, u64)> = m.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00),
                (1 << 20, 0xc000_0000 - (1 << 20)),
                (1 << 32, 5 << 30)
            ]
        );
    }

    fn lay(size: u64) -> RamLayout {
        RamLayout::new(size).unwrap()
    }

    #[test]
    fn e820_has_hole_below_1m() {
        let m = e820_map(lay(256 << 20));
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].addr, m[0].size), (0, 0x9fc00));
        assert_eq!((m[1].addr, m[1].size), (1 << 20, (256 << 20) - (1 << 20)));
        assert!(m.iter().all(|e| e.r#type == E820_RAM));
    }

    fn elf(dir: &std::path::Path, filesz: u64, file_len: usize) -> PathBuf {
        let mut b = vec![0u8; file_len.max(0x1000 + filesz as usize)];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        b[72..80].copy_from_slice(&0x1000u64.to_le_bytes());
        b[88..96].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[96..104].copy_from_slice(&filesz.to_le_bytes());
        b[104..112].copy_from_slice(&(filesz + 0x1000).to_le_bytes());
        for (i, x) in b[0x1000..0x1000 + filesz as usize].iter_mut().enumerate() {
            *x = (i % 251) as u8;
        }
        b.truncate(file_len);
        let p = dir.join(format!("vmlinux-{filesz}-{file_len}"));
        std::fs::write(&p, b).unwrap();
        p
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-linux-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn spec(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: &str) -> LinuxBootSpec {
        LinuxBootSpec {
            kernel,
            initrd,
            cmdline: cmdline.to_string(),
            defaults_len: cmdline.len(),
            vcpus: 2,
        }
    }

    #[test]
    fn elf_loads_at_paddr_with_zero_page_initrd_and_mptable() {
        let d = tmp("ok");
        let k = elf(&d, 0x3000, 0x4000);
        let i = d.join("initrd");
        std::fs::write(&i, vec![0x5au8; 5000]).unwrap();
        let size = 64 << 20;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        let e = load(&mem, lay(size), &spec(k, Some(i), "console=ttyS0 quiet")).unwrap();
        assert_eq!(e.entry, 0x100_0000);
        assert_eq!(e.zero_page, ZERO_PAGE_START);
        assert_eq!(e.kernel_end, 0x100_0000 + 0x4000);
        // Segment bytes at the physical address.
        let b: u8 = mem.read_obj(GuestAddress(0x100_0000 + 7)).unwrap();
        assert_eq!(b, 7);
        // Initrd: page aligned, ending at or just below RAM end, contents copied.
        let (ia, is) = e.initrd.unwrap();
        assert_eq!(is, 5000);
        assert_eq!(ia % PAGE, 0);
        assert_eq!(ia, size - 2 * PAGE);
        let x: u8 = mem.read_obj(GuestAddress(ia + 4999)).unwrap();
        assert_eq!(x, 0x5a);
        // Zero page.
        let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ bp.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ bp.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(bp.hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ bp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ bp.hdr.cmdline_size }, "console=ttyS0 quiet".len() as u32);
        assert_eq!({ bp.hdr.ramdisk_image }, ia as u32);
        assert_eq!({ bp.hdr.ramdisk_size }, 5000);
        assert_eq!({ bp.hdr.kernel_alignment }, KERNEL_MIN_ALIGNMENT_BYTES);
        assert_eq!(bp.e820_entries, 2);
        let e1 = bp.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }),
            (HIMEM_START, size - HIMEM_START)
        );
        let mut c = [0u8; 20];
        mem.read_slice(&mut c, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&c, b"console=ttyS0 quiet\0");
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(mptable::MPTABLE_START))
            .unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn bad_kernels_and_sizes_are_typed_errors() {
        let d = tmp("bad");
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let trunc = elf(&d, 0x3000, 0x2000);
        let e = load(&mem, lay(32 << 20), &spec(trunc, None, "x")).unwrap_err();
        assert!(
            matches!(e, BootError::BadElf { .. }) && e.to_string().contains("truncated"),
            "{e}"
        );
        let text = d.join("text");
        std::fs::write(&text, b"hello").unwrap();
        assert!(matches!(
            load(&mem, lay(32 << 20), &spec(text, None, "x")),
            Err(BootError::NotAKernel { .. })
        ));
        let k = elf(&d, 0x3000, 0x4000);
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        assert!(matches!(
            load(&small, lay(16 << 20), &spec(k.clone(), None, "x")),
            Err(BootError::MemoryTooSmall { .. })
        ));
        let big = d.join("big-initrd");
        std::fs::write(&big, vec![0u8; 17 << 20]).unwrap();
        let e = load(&mem, lay(32 << 20), &spec(k.clone(), Some(big), "x")).unwrap_err();
        assert!(matches!(e, BootError::MemoryTooSmall { .. }), "{e}");
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let e = load(&mem, lay(32 << 20), &spec(k.clone(), None, &long)).unwrap_err();
        assert!(
            matches!(
                e,
                BootError::CmdlineTooLong {
                    len: 2048,
                    max: 2047,
                    ..
                }
            ),
            "{e}"
        );
        let e = load(&mem, lay(32 << 20), &spec(k, None, "a\u{1}b")).unwrap_err();
        assert!(matches!(e, BootError::CmdlineInvalid), "{e}");
    }

    #[test]
    fn bzimage_needs_64bit_entry_and_enters_at_0x200() {
        let d = tmp("bz");
        let mut b = vec![0u8; 5 * 512 + 0x4000];
        b[0x1f1] = 4; // setup_sects
        b[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
        b[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes()); // init_size
        let p = d.join("bzImage");
        std::fs::write(&p, &b).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
        let e = load(&mem, lay(32 << 20), &spec(p.clone(), None, "x")).unwrap();
        assert_eq!(e.entry, 0x10_0200);
        assert_eq!(e.kernel_end, 0x10_0000 + 0x80_0000);
        let long = "a".repeat(300);
        assert!(matches!(
            load(&mem, lay(32 << 20), &spec(p.clone(), None, &long)),
            Err(BootError::CmdlineTooLong { max: 255, .. })
        ));
        b[0x236] = 0;
        std::fs::write(&p, &b).unwrap();
        assert!(matches!(
            load(&mem, lay(32 << 20), &spec(p, None, "x")),
            Err(BootError::No64BitEntry { .. })
        ));
    }

    #[test]
    fn cmdline_order() {
        let (s, d) = compose_cmdline(Some("clearcpuid=x"), &[" quiet "]).unwrap();
        assert!(s.starts_with(DEFAULT_CMDLINE));
        assert!(s.ends_with(" clearcpuid=x quiet"));
        assert_eq!(&s[..d], &format!("{DEFAULT_CMDLINE} clearcpuid=x"));
    }

    #[test]
    fn cmdline_parts_are_joined_as_before_and_checked() {
        let (s, d) = compose_cmdline(
            None,
            &["virtio_mmio.device=4K@0xd0000000:5", "  ", " a=1  b "],
        )
        .unwrap();
        assert_eq!(
            s,
            format!("{DEFAULT_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 a=1  b")
        );
        assert_eq!(d, DEFAULT_CMDLINE.len());
        assert_eq!(compose_cmdline(None, &[]).unwrap().0, DEFAULT_CMDLINE);
        let long = "y".repeat(CMDLINE_MAX_SIZE);
        let e = compose_cmdline(Some("clearcpuid=x"), &[long.as_str()]).unwrap_err();
        let want = DEFAULT_CMDLINE.len() + " clearcpuid=x ".len() + long.len();
        assert!(
            matches!(e, BootError::CmdlineTooLong { len, max: 2047, defaults_len } if len == want && defaults_len == want - long.len() - 1),
            "{e}"
        );
        assert!(matches!(
            compose_cmdline(None, &["a\u{1}b"]),
            Err(BootError::CmdlineInvalid)
        ));
    }
}
