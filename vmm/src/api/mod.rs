//! Runtime control of a running VM over a Unix socket (`vmm run
//! --api-socket PATH`): one JSON request per line, one JSON reply per line.
//!
//! * `protocol` — requests and replies
//! * `server` — the socket server thread inside `vmm run`
//! * `client` — `vmm ctl --api-socket PATH <cmd>`

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{ctl, CtlError};
pub use protocol::{Reply, Request};
pub use server::{ApiServer, ApiServerError};
