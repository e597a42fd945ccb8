//! The runtime every test guest shares: CPL0 entry, bootstrap page tables,
//! drop to CPL3, optional 4K page tables, IDT stubs, the workload call,
//! the final rendezvous and EXIT. Assembles everything into the image.

use std::ops::Range;

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use super::builder::{Arg, GuestBuilder};
use super::device::{CMD_FAULT, PORT_DOORBELL};
use super::layout::*;
use super::tables;
use super::{GuestPageSize, TestGuestError};

/// Vector of #GP. CPL3 reaches CPL0 services by executing a privileged
/// instruction at a known site (`int n` from CPL3 is not emulated on
/// paravirtual hosts and raises #UD): the #GP stub recognises the site,
/// performs the service and returns; #GP anywhere else is a FAULT.
/// Services: `mov cr3, rax` (load CR3, continue after it) and `hlt`
/// (park this vCPU with HLT at CPL0). Also, `out dx, eax` / `in eax, dx`
/// that #GP at CPL3 (paravirtual hosts ignore RFLAGS.IOPL for CPL3; on
/// VT-x/AMD-V IOPL=3 lets them run directly) are performed by the stub.
const VEC_GP: usize = 13;
/// RFLAGS for CPL3: IOPL=3, reserved bit 1; IF=0 (no interrupts are used).
const USER_RFLAGS: i32 = 0x3002;

fn has_error_code(vector: usize) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

fn imm(v: u64) -> i32 {
    debug_assert!(v <= i32::MAX as u64);
    v as i32
}

struct Labels {
    entry: CodeLabel,
    stubs: Vec<CodeLabel>,
}

/// Emits the page-table stores `fills` ([`Layout::table_fills`]): a single
/// entry as one store, a run as a loop. Clobbers rax, rbx, ecx.
fn emit_fills(a: &mut CodeAssembler, fills: &[TableFill]) -> Result<(), TestGuestError> {
    for f in fills {
        a.mov(rax, f.value)?;
        if f.count == 1 {
            a.mov(qword_ptr(f.dst), rax)?;
            continue;
        }
        let mut fill = a.create_label();
        a.mov(ebx, f.dst as u32)?;
        a.mov(ecx, f.count as u32)?;
        a.set_label(&mut fill)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.add(rax, imm(f.step))?;
        a.add(rbx, 8)?;
        a.dec(ecx)?;
        a.jnz(fill)?;
    }
    Ok(())
}

/// CPL0 entry: descriptor tables, bootstrap page tables (vCPU 0), CPL3.
fn emit_entry(
    a: &mut CodeAssembler,
    layout: &Layout,
    user_entry: CodeLabel,
) -> Result<CodeLabel, TestGuestError> {
    let mut entry = a.create_label();
    let mut ap_wait = a.create_label();
    let mut to_user = a.create_label();
    a.set_label(&mut entry)?;
    a.cli()?;
    a.mov(rsp, rdi)?;
    a.shl(rsp, KSTACK_SHIFT)?;
    a.add(rsp, imm(KSTACK_ADDR + (1 << KSTACK_SHIFT)))?;
    a.lgdt(ptr(GDTR_ADDR))?;
    a.lidt(ptr(IDTR_ADDR))?;
    a.mov(eax, u32::from(KDATA_SEL))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, edi)?;
    a.shl(eax, 4)?;
    a.add(eax, i32::from(TSS_SEL0))?;
    a.ltr(ax)?;
    a.test(edi, edi)?;
    a.jnz(ap_wait)?;
    // vCPU 0: bootstrap tables, 2M (or 1G) user pages over all RAM (virtual
    // space continues past the MMIO hole with the RAM above it).
    emit_fills(
        a,
        &layout.table_fills(layout.boot_tables(), layout.boot_largest()),
    )?;
    a.mov(eax, BOOT_PML4 as u32)?;
    a.mov(cr3, rax)?;
    a.mov(qword_ptr(BOOT_READY_ADDR), 1)?;
    a.jmp(to_user)?;
    a.set_label(&mut ap_wait)?;
    a.pause()?;
    a.cmp(qword_ptr(BOOT_READY_ADDR), 0)?;
    a.je(ap_wait)?;
    a.mov(eax, BOOT_PML4 as u32)?;
    a.mov(cr3, rax)?;
    a.set_label(&mut to_user)?;
    a.push(i32::from(UDATA_SEL))?;
    a.mov(rax, rdi)?;
    a.shl(rax, USTACK_SHIFT)?;
    a.add(rax, imm(USTACK_ADDR + (1 << USTACK_SHIFT)))?;
    a.push(rax)?;
    a.push(USER_RFLAGS)?;
    a.push(i32::from(UCODE_SEL))?;
    a.lea(rax, ptr(user_entry))?;
    a.push(rax)?;
    a.iretq()?;
    Ok(entry)
}

/// CPL3: vCPU 0 zeroes and fills the 4K-page tables (natively).
fn emit_build_4k(a: &mut CodeAssembler, layout: &Layout) -> Result<CodeLabel, TestGuestError> {
    let mut f = a.create_label();
    a.set_label(&mut f)?;
    let set = layout.tables_4k();
    a.mov(edi, set.pml4 as u32)?;
    a.mov(ecx, ((layout.tables_end - set.pml4) / 8) as u32)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    emit_fills(a, &layout.table_fills(set, PAGE))?;
    a.ret()?;
    Ok(f)
}

/// CPL3 prologue, workload call, rendezvous, EXIT / park.
fn emit_user(
    b: &mut GuestBuilder,
    user_entry: &mut CodeLabel,
    workload: CodeLabel,
    sites: &mut Sites,
) -> Result<CodeLabel, TestGuestError> {
    let layout = b.layout.clone();
    // Marks where the CPL3 runtime starts (a label needs an instruction of
    // its own).
    let mut user_start = b.a.create_label();
    b.a.set_label(&mut user_start)?;
    b.a.nop()?;
    let build_4k = match layout.guest_pages {
        GuestPageSize::Size4K => Some(emit_build_4k(&mut b.a, &layout)?),
        GuestPageSize::Size2M | GuestPageSize::Size1G => None,
    };
    let a = &mut b.a;
    a.set_label(user_entry)?;
    a.mov(r15, rdi)?;
    a.mov(r14, rdi)?;
    a.shl(r14, 6)?;
    a.add(r14, imm(CMD_ADDR))?;
    if let Some(build_4k) = build_4k {
        let mut wait = a.create_label();
        let mut switch = a.create_label();
        a.test(r15, r15)?;
        a.jnz(wait)?;
        a.call(build_4k)?;
        a.mov(qword_ptr(TABLES_READY_ADDR), 1)?;
        a.jmp(switch)?;
        a.set_label(&mut wait)?;
        a.pause()?;
        a.cmp(qword_ptr(TABLES_READY_ADDR), 0)?;
        a.je(wait)?;
        a.set_label(&mut switch)?;
        a.nop()?;
    }
    // CR3 service (a TLB flush only, with 2M or 1G pages).
    a.mov(eax, layout.final_cr3 as u32)?;
    a.set_label(&mut sites.cr3)?;
    a.mov(cr3, rax)?;
    a.set_label(&mut sites.after_cr3)?;
    a.mov(rax, r15)?;
    a.shl(rax, 4)?;
    a.mov(r12, qword_ptr(rax + imm(SLICES_ADDR)))?;
    a.mov(r13, qword_ptr(rax + imm(SLICES_ADDR + 8)))?;
    a.call(workload)?;
    a.lock().or(qword_ptr(STATUS_ACC_ADDR), rax)?;
    a.lock().inc(qword_ptr(DONE_COUNT_ADDR))?;
    let mut park = a.create_label();
    let mut wait_done = a.create_label();
    let mut hang = a.create_label();
    a.test(r15, r15)?;
    a.jnz(park)?;
    a.set_label(&mut wait_done)?;
    a.pause()?;
    a.cmp(qword_ptr(DONE_COUNT_ADDR), layout.vcpus as i32)?;
    a.jne(wait_done)?;
    a.mov(rbx, qword_ptr(STATUS_ACC_ADDR))?;
    b.exit(Arg::Reg(rbx))?;
    let a = &mut b.a;
    a.set_label(&mut hang)?;
    a.pause()?;
    a.jmp(hang)?;
    a.set_label(&mut park)?;
    a.nop()?;
    a.set_label(&mut sites.park)?;
    a.hlt()?;
    a.jmp(park)?;
    Ok(user_start)
}

/// Addresses of the CPL3 service sites (see [`VEC_GP`]).
struct Sites {
    cr3: CodeLabel,
    after_cr3: CodeLabel,
    park: CodeLabel,
}

/// #GP: services at known sites, FAULT otherwise. Stack: error code, RIP...
fn emit_gp(a: &mut CodeAssembler, sites: &Sites, common: CodeLabel) -> Result<(), TestGuestError> {
    let mut do_cr3 = a.create_label();
    let mut do_park = a.create_label();
    let mut fault = a.create_label();
    let mut do_out = a.create_label();
    let mut do_in = a.create_label();
    let mut skip1 = a.create_label();
    a.push(rcx)?;
    a.mov(rcx, qword_ptr(rsp + 16))?;
    a.cmp(byte_ptr(rcx), 0xef)?;
    a.je(do_out)?;
    a.cmp(byte_ptr(rcx), 0xed)?;
    a.je(do_in)?;
    a.lea(rcx, ptr(sites.cr3))?;
    a.cmp(qword_ptr(rsp + 16), rcx)?;
    a.je(do_cr3)?;
    a.lea(rcx, ptr(sites.park))?;
    a.cmp(qword_ptr(rsp + 16), rcx)?;
    a.je(do_park)?;
    a.pop(rcx)?;
    a.jmp(fault)?;
    a.set_label(&mut do_cr3)?;
    a.mov(cr3, rax)?;
    a.lea(rcx, ptr(sites.after_cr3))?;
    a.mov(qword_ptr(rsp + 16), rcx)?;
    a.pop(rcx)?;
    a.add(rsp, 8)?;
    a.iretq()?;
    a.set_label(&mut do_park)?;
    a.hlt()?;
    a.jmp(do_park)?;
    // `out dx, eax` / `in eax, dx` at CPL3 without I/O permission: do it
    // here with the caller's registers and continue after the 1-byte opcode.
    a.set_label(&mut do_out)?;
    a.out(dx, eax)?;
    a.jmp(skip1)?;
    a.set_label(&mut do_in)?;
    a.in_(eax, dx)?;
    a.set_label(&mut skip1)?;
    a.inc(qword_ptr(rsp + 16))?;
    a.pop(rcx)?;
    a.add(rsp, 8)?;
    a.iretq()?;
    a.set_label(&mut fault)?;
    a.push(VEC_GP as i32)?;
    a.jmp(common)?;
    Ok(())
}

/// IDT stubs and the fault reporter.
fn emit_handlers(a: &mut CodeAssembler, sites: &Sites) -> Result<Vec<CodeLabel>, TestGuestError> {
    let mut common = a.create_label();
    let mut stubs = Vec::with_capacity(256);
    for v in 0..256usize {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        match v {
            VEC_GP => emit_gp(a, sites, common)?,
            _ => {
                if !has_error_code(v) {
                    a.push(0)?;
                }
                a.push(v as i32)?;
                a.jmp(common)?;
            }
        }
        stubs.push(l);
    }
    // Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. The vCPU is the
    // one whose CPL0 stack RSP is on.
    a.set_label(&mut common)?;
    a.mov(rax, rsp)?;
    a.sub(rax, imm(KSTACK_ADDR))?;
    a.shr(rax, KSTACK_SHIFT)?;
    a.and(eax, (MAX_VCPUS - 1) as i32)?;
    a.shl(eax, 6)?;
    a.add(eax, imm(CMD_ADDR))?;
    for (i, off) in [0i32, 8, 16].into_iter().enumerate() {
        a.mov(rcx, qword_ptr(rsp + off))?;
        a.mov(qword_ptr(rax + 8 * (i as i32 + 1)), rcx)?;
    }
    a.mov(rcx, cr2)?;
    a.mov(qword_ptr(rax + 32), rcx)?;
    a.mov(qword_ptr(rax), CMD_FAULT as i32)?;
    a.mov(edx, u32::from(PORT_DOORBELL))?;
    a.out(dx, eax)?;
    let mut halt = a.create_label();
    a.set_label(&mut halt)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(halt)?;
    Ok(stubs)
}

fn put(image: &mut [u8], gpa: u64, bytes: &[u8]) {
    let off = (gpa - IMAGE_ADDR) as usize;
    image[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A test guest's assembled image.
pub(super) struct Assembled {
    /// CPL0 entry point.
    pub entry: u64,
    /// `[IMAGE_ADDR, boot_tables_end)`.
    pub image: Vec<u8>,
    /// Code bytes (from `CODE_ADDR`).
    pub code_len: u64,
    /// Gpa ranges of the code that runs at CPL3: the workload (emitted
    /// first, up to the CPL0 entry) and the CPL3 runtime (up to the
    /// exception stubs).
    pub user_code: Vec<Range<u64>>,
}

/// Emits the runtime around `workload`, assembles, and lays out the image
/// `[IMAGE_ADDR, boot_tables_end)`.
pub(super) fn assemble(
    mut b: GuestBuilder,
    workload: CodeLabel,
) -> Result<Assembled, TestGuestError> {
    let mut user_entry = b.a.create_label();
    let entry = emit_entry(&mut b.a, &b.layout, user_entry)?;
    let mut sites = Sites {
        cr3: b.a.create_label(),
        after_cr3: b.a.create_label(),
        park: b.a.create_label(),
    };
    let user_start = emit_user(&mut b, &mut user_entry, workload, &mut sites)?;
    let stubs = emit_handlers(&mut b.a, &sites)?;
    let labels = Labels { entry, stubs };
    let result = b.a.assemble_options(
        CODE_ADDR,
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let code = &result.inner.code_buffer;
    let code_len = code.len() as u64;
    if code_len > CODE_END - CODE_ADDR {
        return Err(TestGuestError::TooLarge {
            what: "code",
            size: code.len() as u64,
            max: CODE_END - CODE_ADDR,
        });
    }
    let mut handlers = Vec::with_capacity(256);
    for l in &labels.stubs {
        handlers.push((result.label_ip(l)?, 0));
    }
    let layout = &b.layout;
    let mut image = vec![0u8; (b.layout.boot_tables_end() - IMAGE_ADDR) as usize];
    put(&mut image, GDT_ADDR, &tables::gdt(layout.vcpus));
    put(
        &mut image,
        GDTR_ADDR,
        &tables::pseudo_descriptor(GDT_ADDR, GDT_SIZE),
    );
    put(
        &mut image,
        IDTR_ADDR,
        &tables::pseudo_descriptor(IDT_ADDR, 256 * 16),
    );
    put(&mut image, IDT_ADDR, &tables::idt(&handlers));
    for cpu in 0..layout.vcpus {
        put(
            &mut image,
            TSS_ADDR + cpu as u64 * TSS_STRIDE,
            &tables::tss(cpu),
        );
        let s = &layout.slices[cpu];
        let mut slice = s.start.to_le_bytes().to_vec();
        slice.extend(s.end.to_le_bytes());
        put(&mut image, SLICES_ADDR + 16 * cpu as u64, &slice);
    }
    put(&mut image, STRINGS_ADDR, &b.strings);
    put(&mut image, CODE_ADDR, code);
    let entry = result.label_ip(&labels.entry)?;
    let stubs_start = match labels.stubs.first() {
        Some(l) => result.label_ip(l)?,
        None => CODE_ADDR + code_len,
    };
    Ok(Assembled {
        entry,
        image,
        code_len,
        user_code: vec![CODE_ADDR..entry, result.label_ip(&user_start)?..stubs_start],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `code` (the instructions [`emit_fills`] emits, then `ret`) on a
    /// tiny interpreter; returns the qwords it stored.
    fn run_stores(code: &[u8], ip: u64) -> std::collections::BTreeMap<u64, u64> {
        use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
        let insns: Vec<Instruction> = Decoder::with_ip(64, code, ip, DecoderOptions::NONE)
            .into_iter()
            .collect();
        let mut regs = std::collections::HashMap::<Register, u64>::new();
        let mut mem = std::collections::BTreeMap::new();
        let mut zf = false;
        let mut pc = 0;
        loop {
            let i = &insns[pc];
            pc += 1;
            // The registers emit_fills uses: (64-bit register, 32-bit form).
            let full = |r: Register| match r {
                Register::EAX => (Register::RAX, true),
                Register::EBX => (Register::RBX, true),
                Register::ECX => (Register::RCX, true),
                Register::RAX | Register::RBX | Register::RCX => (r, false),
                other => panic!("unexpected register {other:?}"),
            };
            let r0 = i.op0_register();
            let narrow = r0 != Register::None && full(r0).1;
            let set = |regs: &mut std::collections::HashMap<Register, u64>, v: u64| {
                regs.insert(full(r0).0, if narrow { v & 0xffff_ffff } else { v });
            };
            let get = |regs: &std::collections::HashMap<Register, u64>, r: Register| {
                regs.get(&full(r).0).copied().unwrap_or(0)
            };
            match (i.mnemonic(), i.op0_kind()) {
                (Mnemonic::Mov, OpKind::Register) => set(&mut regs, i.immediate(1)),
                (Mnemonic::Mov, OpKind::Memory) => {
                    let base = i.memory_base();
                    let addr = match base {
                        Register::None | Register::RIP => i.memory_displacement64(),
                        b => get(&regs, b).wrapping_add(i.memory_displacement64()),
                    };
                    mem.insert(addr, get(&regs, i.op1_register()));
                }
                (Mnemonic::Add, OpKind::Register) => {
                    let v = get(&regs, r0).wrapping_add(i.immediate(1));
                    set(&mut regs, v);
                }
                (Mnemonic::Dec, OpKind::Register) => {
                    let v = get(&regs, r0).wrapping_sub(1) & 0xffff_ffff;
                    assert!(narrow);
                    zf = v == 0;
                    set(&mut regs, v);
                }
                (Mnemonic::Jne, _) => {
                    if !zf {
                        pc = insns
                            .iter()
                            .position(|x| x.ip() == i.near_branch_target())
                            .unwrap();
                    }
                }
                (Mnemonic::Ret, _) => return mem,
                other => panic!("unexpected instruction {i:?} ({other:?})"),
            }
        }
    }

    /// The code vCPU 0 runs stores exactly the fills: the table bytes
    /// it leaves are those the layout tests walk.
    #[test]
    fn emitted_table_code_stores_the_fills() {
        for (mib, pages) in [
            (1536u64, GuestPageSize::Size1G),
            (2048, GuestPageSize::Size1G),
            (5122, GuestPageSize::Size1G),
            (64, GuestPageSize::Size2M),
            (5120, GuestPageSize::Size2M),
            (1536, GuestPageSize::Size4K),
        ] {
            let l = Layout::new(mib << 20, 1, pages).unwrap();
            let mut sets = vec![(l.boot_tables(), l.boot_largest())];
            if pages == GuestPageSize::Size4K {
                sets.push((l.tables_4k(), PAGE));
            }
            for (set, largest) in sets {
                let fills = l.table_fills(set, largest);
                let mut a = CodeAssembler::new(64).unwrap();
                emit_fills(&mut a, &fills).unwrap();
                a.ret().unwrap();
                let code = a.assemble(CODE_ADDR).unwrap();
                let mem = run_stores(&code, CODE_ADDR);
                assert_eq!(mem, apply_fills(&fills), "{mib} MiB {pages}");
                // 1G pages where the layout says, read back from the stores.
                if pages == GuestPageSize::Size1G {
                    let gigs = (0..l.ram_size)
                        .step_by(GIB as usize)
                        .filter(|va| walk(&mem, BOOT_PML4, *va).unwrap().1 == GIB)
                        .count() as u64;
                    assert_eq!(gigs, l.ram_size / GIB);
                }
            }
        }
    }

    #[test]
    fn error_code_vectors() {
        let with: Vec<usize> = (0..32).filter(|v| has_error_code(*v)).collect();
        assert_eq!(with, vec![8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
