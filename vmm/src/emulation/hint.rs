//! Hints for instructions the quirk layer does not handle: the ones the
//! paravirtual host's emulator is known to fail on name the `clearcpuid`
//! entry that keeps a Linux guest from using them.

use iced_x86::Mnemonic;

/// For everything without a more specific hint.
pub const GENERIC: &str = "this host's KVM emulates guest CPL0 code and cannot emulate this \
     instruction; on a VT-x/AMD-V host it runs natively";

/// A hint for an unhandled instruction with mnemonic `m`.
pub fn for_mnemonic(m: Mnemonic) -> &'static str {
    match m {
        Mnemonic::Clac | Mnemonic::Stac => {
            "CLAC/STAC: add clearcpuid=smap to the kernel command line"
        }
        Mnemonic::Cmpxchg16b | Mnemonic::Cmpxchg8b => "CMPXCHG8B/16B: add clearcpuid=cx16",
        Mnemonic::Xsave
        | Mnemonic::Xsave64
        | Mnemonic::Xsavec
        | Mnemonic::Xsavec64
        | Mnemonic::Xsaveopt
        | Mnemonic::Xsaveopt64
        | Mnemonic::Xsaves
        | Mnemonic::Xsaves64
        | Mnemonic::Xrstor
        | Mnemonic::Xrstor64
        | Mnemonic::Xrstors
        | Mnemonic::Xrstors64 => "XSAVE/XRSTOR family: add clearcpuid=xsave",
        Mnemonic::Xgetbv | Mnemonic::Xsetbv => "XGETBV/XSETBV: add clearcpuid=xsave",
        Mnemonic::Popcnt => "POPCNT: add clearcpuid=popcnt",
        _ => GENERIC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_clearcpuid_entry() {
        assert!(for_mnemonic(Mnemonic::Clac).contains("smap"));
        assert!(for_mnemonic(Mnemonic::Cmpxchg16b).contains("cx16"));
        assert!(for_mnemonic(Mnemonic::Xsaveopt).contains("xsave"));
        assert!(for_mnemonic(Mnemonic::Xrstors64).contains("xsave"));
        assert!(for_mnemonic(Mnemonic::Popcnt).contains("popcnt"));
        assert!(for_mnemonic(Mnemonic::Nop).contains("VT-x"));
    }
}
