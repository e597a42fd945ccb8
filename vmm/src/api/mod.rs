//! Runtime control of a running VM over a Unix socket (`vmm run
//! --api-socket PATH`): one JSON request per line, one JSON reply per line.
//!
//! * `protocol` — requests and replies
//! * `server` — the socket server thread inside `vmm run`
//! * `client` — `vmm ctl --api-socket PATH <cmd>`
//! * `framing` — request lines with a hard length limit
//! * `pause` — the API's pause of the vCPUs (one at a time, resume after it answered)
//! * `peer` — who may connect (`SO_PEERCRED`: the VMM's uid or root)

pub mod client;
pub mod framing;
pub mod pause;
pub mod peer;
pub mod protocol;
pub mod server;

pub use client::{ctl, CtlError};
pub use protocol::{Reply, Request};
pub use server::{ApiServer, ApiServerError, ServerLimits};
