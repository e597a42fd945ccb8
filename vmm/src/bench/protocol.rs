//! The guest init protocol of `vmm bench workload` (docs/ARCHITECTURE.md,
//! "Guest init protocol"; reference init: `resources/initramfs/workload-init.sh`).
//!
//! The VMM puts `vmm.run=<base64 of CMD>` (and optionally `vmm.thp=MODE`) on the
//! kernel command line. The guest's init prints, on the serial console:
//!
//! ```text
//! VMM-RESULT-BEGIN
//! ... CMD's output, with `RESULT key=value ...` lines ...
//! VMM-RESULT-END rc=<CMD's exit status> wall_ns=<CMD's wall time in the guest>
//! VMM-GUEST key=value ...            (optional: the guest's THP counters)
//! ```
//!
//! then powers off (`poweroff -f`). A line `VMM-RESULT-ERROR why` reports that
//! init could not run CMD.

use std::collections::BTreeMap;

/// Kernel command-line key carrying the command (base64).
pub const RUN_KEY: &str = "vmm.run";
/// Kernel command-line key of the guest's THP mode.
pub const THP_KEY: &str = "vmm.thp";
/// First line of the command's output.
pub const BEGIN: &str = "VMM-RESULT-BEGIN";
/// The line after the command's output: `VMM-RESULT-END rc=N wall_ns=N`.
pub const END: &str = "VMM-RESULT-END";
/// Init could not run the command: `VMM-RESULT-ERROR why`.
pub const ERROR: &str = "VMM-RESULT-ERROR";
/// Guest facts after the command: `VMM-GUEST key=value ...`.
pub const GUEST: &str = "VMM-GUEST";
/// A line of the command's own figures: `RESULT key=value ...`.
pub const RESULT: &str = "RESULT";

/// What the guest reported.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestOutput {
    /// CMD's exit status.
    pub rc: i32,
    /// CMD's wall time inside the guest, ns.
    pub wall_ns: u64,
    /// Every `key=value` of every `RESULT` line (a later key wins).
    pub result: BTreeMap<String, String>,
    /// The `key=value`s of the `VMM-GUEST` line.
    pub guest: BTreeMap<String, String>,
    /// CMD's output lines (between the markers).
    pub output: Vec<String>,
}

/// Why the console holds no complete result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Init said why it could not run the command.
    #[error("the guest's init reported: {0}")]
    Init(String),
    /// No `VMM-RESULT-BEGIN` line.
    #[error("no {BEGIN} line on the console: the initramfs does not follow the guest init protocol, or the guest never reached init")]
    NoBegin,
    /// `VMM-RESULT-BEGIN` without the `VMM-RESULT-END` line.
    #[error("no {END} line after {BEGIN}: the command did not finish")]
    NoEnd,
    /// A malformed `VMM-RESULT-END` line.
    #[error("malformed line {0:?} (want `{END} rc=N wall_ns=N`)")]
    BadEnd(String),
}

/// Base64 (RFC 4648, with padding) of `bytes`: the `vmm.run=` value.
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The kernel command-line entries that pass `cmd` (and the THP mode).
pub fn cmdline(cmd: &str, thp: Option<&str>) -> String {
    let mut s = format!("{RUN_KEY}={}", base64(cmd.as_bytes()));
    if let Some(t) = thp {
        s.push_str(&format!(" {THP_KEY}={t}"));
    }
    s
}

/// The `key=value` tokens of `text` (tokens without `=` are skipped).
pub fn key_values(text: &str) -> impl Iterator<Item = (String, String)> + '_ {
    text.split_whitespace()
        .filter_map(|t| t.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
}

/// The rest of `line` after `marker` at its start (the whole marker word), if any.
/// Console lines may carry a `\r`; kernel messages may precede a marker on the same line.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let i = line.find(marker)?;
    let rest = &line[i + marker.len()..];
    (rest.is_empty() || rest.starts_with(' ')).then(|| rest.trim())
}

/// Parse the guest console text.
pub fn parse(console: &str) -> Result<GuestOutput, ProtocolError> {
    let lines: Vec<&str> = console.lines().map(|l| l.trim_end_matches('\r')).collect();
    if let Some(why) = lines.iter().find_map(|l| after(l, ERROR)) {
        return Err(ProtocolError::Init(why.to_string()));
    }
    let begin = lines
        .iter()
        .rposition(|l| after(l, BEGIN).is_some())
        .ok_or(ProtocolError::NoBegin)?;
    let end = lines[begin..]
        .iter()
        .position(|l| after(l, END).is_some())
        .map(|i| begin + i)
        .ok_or(ProtocolError::NoEnd)?;
    let end_kv: BTreeMap<String, String> =
        key_values(after(lines[end], END).unwrap_or("")).collect();
    let bad = || ProtocolError::BadEnd(lines[end].to_string());
    let rc = end_kv
        .get("rc")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let wall_ns = end_kv
        .get("wall_ns")
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)?;
    let output: Vec<String> = lines[begin + 1..end]
        .iter()
        .map(|l| l.to_string())
        .collect();
    let mut result = BTreeMap::new();
    for l in &output {
        if let Some(rest) = after(l, RESULT) {
            result.extend(key_values(rest));
        }
    }
    let guest = lines[end..]
        .iter()
        .find_map(|l| after(l, GUEST))
        .map(|g| key_values(g).collect())
        .unwrap_or_default();
    Ok(GuestOutput {
        rc,
        wall_ns,
        result,
        guest,
        output,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
        assert_eq!(
            cmdline("chase 64M 1000", Some("always")),
            "vmm.run=Y2hhc2UgNjRNIDEwMDA= vmm.thp=always"
        );
        // No space, so the kernel hands it over as one parameter.
        assert!(!cmdline("a b  c\n'\"", None).contains(char::is_whitespace));
    }

    const CONSOLE: &str = "[    1.0] Run /init as init process\r\n\
        VMM-RESULT-BEGIN\r\n\
        [    1.5] random: crng init done\r\n\
        RESULT ns_per_access=87.5 accesses=1000 checksum=0x2c0ab40\r\n\
        hello\r\n\
        VMM-RESULT-END rc=0 wall_ns=123456789\r\n\
        VMM-GUEST thp_enabled=always AnonHugePages_kb=0 thp_fault_alloc=32\r\n\
        [    2.0] reboot: System halted\r\n";

    #[test]
    fn parses_a_complete_console() {
        let g = parse(CONSOLE).unwrap();
        assert_eq!(g.rc, 0);
        assert_eq!(g.wall_ns, 123_456_789);
        assert_eq!(g.result["ns_per_access"], "87.5");
        assert_eq!(g.result["checksum"], "0x2c0ab40");
        assert_eq!(g.result.len(), 3);
        assert_eq!(g.guest["thp_fault_alloc"], "32");
        assert_eq!(g.guest["thp_enabled"], "always");
        assert_eq!(g.output.len(), 3);
        assert_eq!(g.output[2], "hello");
    }

    #[test]
    fn names_what_is_missing() {
        assert_eq!(parse("no markers\n"), Err(ProtocolError::NoBegin));
        assert_eq!(
            parse("VMM-RESULT-BEGIN\nRESULT x=1\n"),
            Err(ProtocolError::NoEnd)
        );
        assert!(matches!(
            parse("VMM-RESULT-BEGIN\nVMM-RESULT-END rc=x\n"),
            Err(ProtocolError::BadEnd(_))
        ));
        assert_eq!(
            parse("VMM-RESULT-ERROR vmm.run is not valid base64\n"),
            Err(ProtocolError::Init("vmm.run is not valid base64".into()))
        );
        // A marker is a whole word: VMM-RESULT-BEGINNING is not one.
        assert_eq!(parse("VMM-RESULT-BEGINNING\n"), Err(ProtocolError::NoBegin));
        let g = parse("VMM-RESULT-BEGIN\nVMM-RESULT-END rc=3 wall_ns=5\n").unwrap();
        assert_eq!((g.rc, g.wall_ns, g.result.len()), (3, 5, 0));
    }
}
