//! Boot: 64-bit entry set-up, Linux direct boot, MP table.

pub mod linux;
pub mod long_mode;
pub mod mptable;
