//! Reading numbers out of the JSON reports `vmm` writes.
//!
//! Also compiled into `vmm`'s own integration tests (`vmm/tests/common`).

use serde_json::Value;

/// The number at `path` (object keys, outermost first) in `v`; panics with
/// the whole document if there is none.
pub fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("no number at {path:?} in {v:#}"))
}
