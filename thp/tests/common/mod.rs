//! Helpers shared by the scenario tests.
#![allow(dead_code)]

use thp::invariants::{check_primary, check_secondary};
use thp::kvm_mirror::SecondaryMmu;
use thp::primary::{MmId, Primary};

pub const HVA: u64 = 0x7f00_0000_0000;

pub fn ok(p: &Primary) {
    if let Err(e) = check_primary(p) {
        panic!("{e}");
    }
}

pub fn ok2(p: &Primary, mm: MmId, s: &SecondaryMmu) {
    ok(p);
    if let Err(e) = check_secondary(s, p.mm(mm).unwrap()) {
        panic!("{e}");
    }
}
