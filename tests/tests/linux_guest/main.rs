//! The test Linux guest under `vmm run`, end to end: boot to init, the
//! balloon, free page reporting. One test binary so that its boots (one
//! vCPU each, minutes on a paravirtual host) run side by side instead of one
//! binary after another. libtest starts them in name order: the longest
//! (`boot`, one test) first, the four balloon cycles last.

mod boot;
mod free_page_reporting;
mod virtio_balloon;
