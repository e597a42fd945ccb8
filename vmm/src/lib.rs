//! `vmm`: a minimal KVM VMM whose guest RAM lives on 2M huge pages it manages
//! itself. See docs/ARCHITECTURE.md, section `vmm`.

#![deny(missing_docs)]

pub mod api;
pub mod api_handle;
pub mod balloon_backend;
pub mod bench;
pub mod boot;
pub mod builder;
pub mod collapser;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod deferred_split;
pub mod devices;
pub mod emulation;
pub mod exit_code;
pub mod give_back_stats;
pub mod halt;
pub mod host;
pub mod input_file;
pub mod machine;
pub mod mirror;
pub mod mmu_params;
pub mod msr;
pub mod outcome;
pub mod output_path;
pub mod parse;
pub mod ram_handle;
pub mod report;
pub mod run;
pub mod signals;
pub mod snapshot;
pub mod split_reserve;
pub mod stats;
pub mod stdout;
pub mod stop_signal;
pub mod stress;
pub mod testguest;
pub mod unmap_stats;
pub mod vcpu;
pub mod vm;
