//! Where the test guest images are.
//!
//! `resources/setup-host.sh` builds them into `${VMM_CACHE_DIR:-/var/cache/vmm-test}` and
//! lists them in `<cache>/test-env` as `NAME=path` lines. The environment variables of
//! the same names win over that file.

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;

/// Environment variable / test-env key of the guest kernel (vmlinux).
pub const KERNEL: &str = "VMM_TEST_KERNEL";
/// Initramfs whose /init prints [`INIT_OK_MARKER`] and powers off.
pub const INITRD: &str = "VMM_TEST_INITRD";
/// Initramfs whose /init spins at CPL3 without system calls (prints nothing).
pub const INITRD_SPIN: &str = "VMM_TEST_INITRD_SPIN";
/// Initramfs whose /init runs `memwork` (memory work across a balloon inflate and
/// deflate, resources/initramfs/memwork.c), then powers off.
pub const INITRD_MEMWORK: &str = "VMM_TEST_INITRD_MEMWORK";
/// Initramfs following the guest init protocol of `vmm bench workload` (runs the
/// `vmm.run=` command; ships /bin/chase and /bin/gups).
pub const INITRD_WORKLOAD: &str = "VMM_TEST_INITRD_WORKLOAD";

/// Printed by the `hello` initramfs's /init.
pub const INIT_OK_MARKER: &str = "VMM-TEST-INIT-OK";
/// Printed by the guest kernel right before it runs /init.
pub const RUN_INIT_MARKER: &str = "Run /init as init process";

/// The cache directory the resource scripts build into.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VMM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/vmm-test"))
}

/// Parse `NAME=value` lines (blank lines and `#` comments ignored).
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The value of test-env key `name`: the environment variable of that name, else its
/// line in `<cache>/test-env`; with where it came from. `Err`: why there is none.
fn lookup(name: &str) -> Result<(String, String), String> {
    if let Ok(v) = std::env::var(name) {
        if !v.is_empty() {
            return Ok((v, format!("${name}")));
        }
    }
    let env_file = cache_dir().join("test-env");
    let text = fs::read_to_string(&env_file).map_err(|e| {
        format!(
            "{name} is not set and {} is unreadable ({e}); build the test guest \
             with `sudo bash resources/setup-host.sh`",
            env_file.display()
        )
    })?;
    let v = parse_env_file(&text)
        .remove(name)
        .ok_or_else(|| format!("{name} is not set and not listed in {}", env_file.display()))?;
    Ok((v, env_file.display().to_string()))
}

/// The value of test-env key `name`, if it has one (see [`image`] for the lookup).
pub fn env_value(name: &str) -> Option<String> {
    lookup(name).ok().map(|(v, _)| v)
}

/// The path of image `name` (one of [`KERNEL`], [`INITRD`], [`INITRD_SPIN`],
/// [`INITRD_MEMWORK`], [`INITRD_WORKLOAD`], or the L1 host image directory), or why there is none.
pub fn image(name: &str) -> Result<PathBuf, String> {
    let (v, from) = lookup(name)?;
    let path = PathBuf::from(v);
    if path.is_file() || path.is_dir() {
        Ok(path)
    } else {
        Err(format!(
            "{} (from {from}) does not exist; rebuild with `sudo bash resources/setup-host.sh`",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_file() {
        let m = parse_env_file(
            "# c\nVMM_TEST_KERNEL=/a/vmlinux\n\nexport VMM_TEST_INITRD=/b.cpio.gz\nbad\n",
        );
        assert_eq!(m.get(KERNEL).map(String::as_str), Some("/a/vmlinux"));
        assert_eq!(m.get(INITRD).map(String::as_str), Some("/b.cpio.gz"));
        assert_eq!(m.len(), 2);
    }
}
