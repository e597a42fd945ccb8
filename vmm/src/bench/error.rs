//! Errors of `vmm bench` and their exit codes.

use std::path::PathBuf;

use crate::exit_code;
use crate::run::RunError;

/// A benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Bad option value or combination.
    #[error("{0}")]
    Usage(String),
    /// The host lacks something the benchmark needs (says what and how to fix it).
    #[error("{0}")]
    HostPrerequisite(String),
    /// A guest run could not start.
    #[error("{config}: {source}")]
    Run {
        /// The configuration.
        config: String,
        /// Why.
        source: RunError,
    },
    /// A guest run ended badly.
    #[error("{config}: {outcome}")]
    GuestFailed {
        /// The configuration.
        config: String,
        /// How it ended.
        outcome: String,
        /// Its exit code.
        code: i32,
    },
    /// The guest did not report a value.
    #[error("{config}: the guest did not report {key}")]
    MissingReport {
        /// The configuration.
        config: String,
        /// The report key.
        key: &'static str,
    },
    /// The guest's output broke the guest init protocol, or its command failed.
    #[error("{config}: {why}")]
    Workload {
        /// The configuration.
        config: String,
        /// What went wrong.
        why: String,
    },
    /// The loop computed a wrong result: its timing cannot be trusted.
    #[error("{config}: checksum {got:#x}, expected {want:#x}: the loop did not run as specified")]
    Checksum {
        /// The configuration.
        config: String,
        /// Reported.
        got: u64,
        /// Expected.
        want: u64,
    },
    /// Host memory for the native run.
    #[error("native run ({what}): {source}")]
    Native {
        /// What failed.
        what: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Writing an output file.
    #[error("writing {path}: {why}")]
    Output {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl BenchError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchError::Usage(_) | BenchError::HostPrerequisite(_) => exit_code::BAD_INPUT,
            BenchError::Run { source, .. } => source.exit_code(),
            BenchError::GuestFailed { code, .. } => *code,
            BenchError::MissingReport { .. }
            | BenchError::Checksum { .. }
            | BenchError::Workload { .. } => exit_code::TEST_FAILURE,
            BenchError::Native { .. } | BenchError::Output { .. } => exit_code::INTERNAL,
        }
    }
}
