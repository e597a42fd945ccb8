//! The API's messages. A request is one line of JSON such as
//! `{"cmd":"balloon","bytes":67108864}`, `{"cmd":"stats"}`, `{"cmd":"pause"}`,
//! `{"cmd":"resume"}`, `{"cmd":"stop"}` or `{"cmd":"split"}`; the reply is one line of JSON: an object with
//! `"ok": true` and the command's fields, or `{"error": "..."}`.

use serde::{Deserialize, Serialize};

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Set the balloon target to `bytes` of guest RAM given back.
    Balloon {
        /// Target size in bytes.
        bytes: u64,
    },
    /// KVM stats, mirror prediction, frame counts, pool, balloon.
    Stats,
    /// Pause every vCPU (until `resume`).
    Pause,
    /// Resume after `pause`.
    Resume,
    /// Stop the VM: `vmm run` writes its report and exits 0.
    Stop,
    /// Split every frame waiting on the balloon's deferred-split queue now.
    Split,
}

/// Most bytes of a request (or of a parser's message about it), escaped,
/// an error reply repeats: a reply is never much longer than this, whatever
/// the request.
pub const ECHO_MAX: usize = 64;

/// `s` cut to at most `max` bytes (at a character boundary), marked with
/// `…` when cut.
pub fn prefix(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn bad(line: &str, why: &str) -> String {
    // Escaped before cutting: escapes can be many times longer than the
    // characters they stand for.
    format!(
        "bad request {}: {}; expected one JSON object per line with \"cmd\" one of \
         balloon (with \"bytes\"), stats, pause, resume, stop, split",
        prefix(&format!("{line:?}"), ECHO_MAX),
        prefix(&printable(why), 2 * ECHO_MAX)
    )
}

/// `s` with everything but printable ASCII escaped.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c.to_string()
            } else {
                c.escape_default().to_string()
            }
        })
        .collect()
}

/// Parse one request line; the error says what is wrong (repeating at
/// most [`ECHO_MAX`] characters of the request). Fields other than the
/// command's own are refused, for every command.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let t = line.trim();
    let v: serde_json::Value = serde_json::from_str(t).map_err(|e| bad(t, &e.to_string()))?;
    let Some(obj) = v.as_object() else {
        return Err(bad(t, "not a JSON object"));
    };
    let own: &[&str] = match obj.get("cmd").and_then(|c| c.as_str()) {
        Some("balloon") => &["cmd", "bytes"],
        Some(_) => &["cmd"],
        None => return Err(bad(t, "no \"cmd\" string")),
    };
    if let Some(k) = obj.keys().find(|k| !own.contains(&k.as_str())) {
        return Err(bad(
            t,
            &format!("unknown field {:?}", prefix(k, ECHO_MAX / 2)),
        ));
    }
    serde_json::from_value(v).map_err(|e| bad(t, &e.to_string()))
}

/// A reply: `{"error": ...}` or `{"ok": true, ...fields}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Success with these fields.
    Ok(serde_json::Map<String, serde_json::Value>),
    /// Failure.
    Error(String),
}

impl Reply {
    /// Success with the fields of `v` (an object; anything else goes under "value").
    pub fn ok(v: impl Serialize) -> Reply {
        let mut map = match serde_json::to_value(v) {
            Ok(serde_json::Value::Object(m)) => m,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            Ok(other) => {
                let mut m = serde_json::Map::new();
                m.insert("value".into(), other);
                m
            }
            Err(e) => return Reply::Error(format!("internal: serializing the reply: {e}")),
        };
        map.insert("ok".into(), serde_json::Value::Bool(true));
        Reply::Ok(map)
    }

    /// The JSON line (without the newline).
    pub fn to_line(&self) -> String {
        let v = match self {
            Reply::Ok(m) => serde_json::Value::Object(m.clone()),
            Reply::Error(e) => serde_json::json!({ "error": e }),
        };
        v.to_string()
    }

    /// Parse a reply line.
    pub fn from_line(line: &str) -> Result<Reply, String> {
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .map_err(|e| format!("the VMM sent a malformed reply {:?}: {e}", line.trim()))?;
        match v {
            serde_json::Value::Object(m) => match m.get("error") {
                Some(e) => Ok(Reply::Error(
                    e.as_str().map_or_else(|| e.to_string(), str::to_string),
                )),
                None => Ok(Reply::Ok(m)),
            },
            other => Err(format!(
                "the VMM sent a reply that is not an object: {other}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Balloon { bytes: 1 << 25 },
            Request::Stats,
            Request::Pause,
            Request::Resume,
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(parse_request(&s).unwrap(), r);
        }
        assert_eq!(
            parse_request(r#"{"cmd":"balloon","bytes":4096}"#).unwrap(),
            Request::Balloon { bytes: 4096 }
        );
    }

    #[test]
    fn bad_requests_are_explained() {
        for bad in [
            "",
            "{",
            r#"{"cmd":"reboot"}"#,
            r#"{"cmd":"balloon"}"#,
            "[1]",
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains("expected one JSON object"), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_refused_on_every_command() {
        for bad in [
            r#"{"cmd":"stats","x":1}"#,
            r#"{"cmd":"pause","bytes":1}"#,
            r#"{"cmd":"stop","force":true}"#,
            r#"{"cmd":"balloon","bytes":1,"x":2}"#,
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
        assert_eq!(parse_request(r#"{"cmd":"stats"}"#).unwrap(), Request::Stats);
    }

    #[test]
    fn errors_echo_a_short_prefix_only() {
        let huge_cmd = format!(r#"{{"cmd":"{}"}}"#, "x".repeat(60_000));
        let huge_junk = "y".repeat(60_000);
        let huge_key = format!(r#"{{"cmd":"stats","{}":1}}"#, "k".repeat(60_000));
        for req in [huge_cmd, huge_junk, huge_key] {
            let e = parse_request(&req).unwrap_err();
            assert!(e.len() < 512, "{} bytes: {}", e.len(), prefix(&e, 200));
            assert!(e.contains('…'), "{e}");
        }
        assert_eq!(prefix("abc", 2), "ab…");
        assert_eq!(prefix("äöü", 5), "äö…");
        assert_eq!(prefix("äöü", 6), "äöü");
    }

    /// Found by `fuzz_parse_request_arbitrary_text` at 10^6 cases: a line
    /// of control and astral-plane characters made a 513-byte reply, the
    /// `{:?}` escapes (`\u{3347a}`) being longer than the characters.
    #[test]
    fn escaped_echo_stays_short() {
        let line = "\"\u{3347a}\u{e000}\0\u{b}\u{7f}".repeat(40);
        let e = parse_request(&line).unwrap_err();
        assert!(e.len() < 512, "{} bytes: {e}", e.len());
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply::ok(serde_json::json!({"target_pages": 8}));
        let line = r.to_line();
        assert!(line.contains("\"ok\":true"), "{line}");
        assert_eq!(Reply::from_line(&line).unwrap(), r);
        let e = Reply::Error("no balloon".into());
        assert_eq!(e.to_line(), r#"{"error":"no balloon"}"#);
        assert_eq!(Reply::from_line(&e.to_line()).unwrap(), e);
        assert!(Reply::from_line("nope").is_err());
    }
}
