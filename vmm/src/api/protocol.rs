//! The API's messages. A request is one line of JSON such as
//! `{"cmd":"balloon","bytes":67108864}`, `{"cmd":"stats"}`, `{"cmd":"pause"}`,
//! `{"cmd":"resume"}` or `{"cmd":"stop"}`; the reply is one line of JSON: an object with
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
}

/// Parse one request line; the error says what is wrong.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| {
        format!(
            "bad request {:?}: {e}; expected one JSON object per line with \"cmd\" one of \
             balloon (with \"bytes\"), stats, pause, resume, stop",
            line.trim()
        )
    })
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
