//! Options of `vmm ctl` (clap), turned into an API request for
//! [`vmm::api::client::ctl`].

use std::path::PathBuf;

use clap::{Args, Subcommand};

use vmm::api::Request;

/// Options of `vmm ctl`.
#[derive(Debug, Clone, Args)]
pub struct CtlArgs {
    /// The API socket of the running VM (`vmm run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the reply as the raw JSON line.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `vmm ctl` commands.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Set the balloon target: SIZE of guest RAM the guest gives back (e.g. 64M; 0 deflates).
    Balloon {
        /// Target size: bytes, or with a K, M or G suffix.
        #[arg(value_name = "SIZE", value_parser = vmm::parse::parse_size_or_zero)]
        size: u64,
    },
    /// KVM stats beside the mirror's prediction, frame counts, pool, balloon.
    Stats,
    /// Pause every vCPU.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Stop the VM (`vmm run` writes its report and exits 0).
    Stop,
    /// Split every frame waiting on the balloon's deferred-split queue now,
    /// freeing its given-back pages.
    Split,
}

impl From<&CtlCommand> for Request {
    fn from(c: &CtlCommand) -> Self {
        match c {
            CtlCommand::Balloon { size } => Request::Balloon { bytes: *size },
            CtlCommand::Stats => Request::Stats,
            CtlCommand::Pause => Request::Pause,
            CtlCommand::Resume => Request::Resume,
            CtlCommand::Stop => Request::Stop,
            CtlCommand::Split => Request::Split,
        }
    }
}
