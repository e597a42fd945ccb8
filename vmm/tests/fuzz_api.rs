//! Fuzzing the API's request parser and line framing (proptest). The
//! default case count keeps the test run short; `VMM_FUZZ_CASES=1000000`
//! runs a million per property.

use std::io::{BufReader, Cursor};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vmm::api::framing::{read_frame, Frame};
use vmm::api::protocol::parse_request;
use vmm::api::Request;

fn cases(default: u32) -> u32 {
    std::env::var("VMM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(default: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    })
}

/// The longest error reply text any request may produce.
const MAX_ERROR: usize = 512;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object that looks like a request: a known or random `cmd`, maybe
/// `bytes`, maybe extra fields.
fn request_like() -> impl Strategy<Value = serde_json::Map<String, serde_json::Value>> {
    let cmd = prop_oneof![
        Just("balloon".to_string()),
        Just("stats".to_string()),
        Just("pause".to_string()),
        Just("resume".to_string()),
        Just("stop".to_string()),
        "[a-z]{0,12}",
    ];
    (
        prop::option::of(cmd),
        prop::option::of(prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            json_value()
        ]),
        prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..3),
    )
        .prop_map(|(cmd, bytes, extra)| {
            let mut m = serde_json::Map::new();
            if let Some(c) = cmd {
                m.insert("cmd".into(), c.into());
            }
            if let Some(b) = bytes {
                m.insert("bytes".into(), b);
            }
            for (k, v) in extra {
                m.entry(k).or_insert(v);
            }
            m
        })
}

/// What `parse_request` must answer for the object `m`.
fn oracle(m: &serde_json::Map<String, serde_json::Value>) -> Option<Request> {
    let cmd = m.get("cmd")?.as_str()?;
    let own: &[&str] = if cmd == "balloon" {
        &["cmd", "bytes"]
    } else {
        &["cmd"]
    };
    if m.keys().any(|k| !own.contains(&k.as_str())) {
        return None;
    }
    match cmd {
        "balloon" => Some(Request::Balloon {
            bytes: m.get("bytes")?.as_u64()?,
        }),
        "stats" => Some(Request::Stats),
        "pause" => Some(Request::Pause),
        "resume" => Some(Request::Resume),
        "stop" => Some(Request::Stop),
        _ => None,
    }
}

#[test]
fn fuzz_parse_request_structured() {
    let mut r = runner(20_000);
    r.run(&request_like(), |m| {
        let line = serde_json::Value::Object(m.clone()).to_string();
        let got = parse_request(&line);
        match (&got, oracle(&m)) {
            (Ok(req), Some(want)) => prop_assert_eq!(req, &want),
            (Err(e), None) => prop_assert!(e.len() < MAX_ERROR, "{} bytes", e.len()),
            (got, want) => prop_assert!(false, "{line}: got {got:?}, want {want:?}"),
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn fuzz_parse_request_arbitrary_text() {
    let mut r = runner(20_000);
    let text = prop_oneof![
        ".{0,200}",
        prop::collection::vec(any::<u8>(), 0..200)
            .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        "[{}\\[\\]\":,a-z0-9 ]{0,200}",
    ];
    r.run(&text, |t| {
        match parse_request(&t) {
            Ok(req) => {
                // Only a real request parses, and it means what it says.
                let again = serde_json::to_string(&req).unwrap();
                prop_assert_eq!(parse_request(&again).unwrap(), req);
            }
            Err(e) => prop_assert!(e.len() < MAX_ERROR, "{} bytes", e.len()),
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn fuzz_framing() {
    let mut r = runner(20_000);
    let input = (
        prop::collection::vec(prop_oneof![Just(b'\n'), Just(b' '), any::<u8>()], 0..400),
        1usize..64,
        1usize..32,
    );
    r.run(&input, |(bytes, max, cap)| {
        let mut rd = BufReader::with_capacity(cap, Cursor::new(bytes.clone()));
        let mut lines: Vec<Vec<u8>> = Vec::new();
        loop {
            match read_frame(&mut rd, max).unwrap() {
                Frame::Line(l) => {
                    prop_assert!(l.len() <= max);
                    prop_assert!(!l.contains(&b'\n'));
                    lines.push(l);
                }
                Frame::TooLong => {
                    // Only when some line of the input really is too long.
                    let longest = bytes.split(|b| *b == b'\n').map(<[u8]>::len).max();
                    prop_assert!(longest.unwrap_or(0) > max);
                    return Ok(());
                }
                Frame::Eof => break,
            }
        }
        // Without a refusal, the lines are exactly the input's lines.
        let mut want: Vec<Vec<u8>> = bytes.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
        if bytes.last().is_none_or(|b| *b == b'\n') {
            want.pop();
        }
        prop_assert_eq!(lines, want);
        Ok(())
    })
    .unwrap();
}
