//! Fuzzing the replay-file loader (proptest): whatever the file says, the
//! loader never panics, and it accepts a file exactly when every field and
//! every event fits guest RAM. `VMM_FUZZ_CASES=1000000` runs a million
//! cases per property.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use vmm::stress::events::{Event, EventKind, HostKind, DEFAULT_MIX};
use vmm::stress::replay::{ReplayError, ReplayFile, REPLAY_VERSION};

fn runner(default: u32) -> TestRunner {
    let cases = std::env::var("VMM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

const MB: u64 = 1 << 20;
const MAX_RAM: u64 = guest_mem::MAX_RAM_SIZE;

fn kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        prop::sample::select(HostKind::ALL.to_vec()).prop_map(EventKind::Host),
        Just(EventKind::Quiesce),
        Just(EventKind::QuiesceDirty),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let frame = prop_oneof![
        Just(None),
        (0u64..80).prop_map(Some),
        any::<u64>().prop_map(Some),
    ];
    let page = prop_oneof![0u16..512, any::<u16>()];
    (any::<u64>(), kind(), frame, page).prop_map(|(seq, kind, frame, page)| Event {
        seq,
        kind,
        frame,
        page,
    })
}

fn file() -> impl Strategy<Value = ReplayFile> {
    let memory = prop_oneof![
        Just(64 * MB),
        Just(128 * MB),
        (0u64..2000).prop_map(|n| n * MB),
        any::<u64>(),
        Just(MAX_RAM),
        Just(MAX_RAM + 2 * MB),
    ];
    let backing = prop::sample::select(vec!["hugetlb", "thp", "4k", "5k", ""]);
    (
        prop_oneof![Just(REPLAY_VERSION), any::<u32>()],
        any::<u64>(),
        backing,
        memory,
        any::<u8>(),
        prop::collection::vec(event(), 0..12),
    )
        .prop_map(
            |(version, seed, backing, memory, vcpus, events)| ReplayFile {
                version,
                seed,
                backing: backing.into(),
                memory,
                vcpus,
                ops_mix: DEFAULT_MIX.parse().unwrap(),
                inject_bug: None,
                events,
            },
        )
}

/// Whether the loader must accept `f` (written independently of it).
fn acceptable(f: &ReplayFile) -> bool {
    let frames = f.memory / (2 * MB);
    f.version == REPLAY_VERSION
        && f.memory > 0
        && f.memory.is_multiple_of(2 * MB)
        && f.memory <= MAX_RAM
        && (1..=32).contains(&f.vcpus)
        && ["hugetlb", "thp", "4k"].contains(&f.backing.as_str())
        && f.events.iter().all(|e| {
            let frameless = matches!(
                e.kind,
                EventKind::Quiesce
                    | EventKind::QuiesceDirty
                    | EventKind::Host(HostKind::Dirtylog | HostKind::Slot)
            );
            e.page < 512
                && match e.frame {
                    None => true,
                    Some(fr) => !frameless && fr < frames,
                }
        })
}

#[test]
fn fuzz_replay_fields_and_events() {
    let mut r = runner(10_000);
    r.run(&file(), |f| {
        let text = serde_json::to_string(&f).unwrap();
        match ReplayFile::parse(&text, Path::new("fuzz.json")) {
            Ok(g) => {
                prop_assert!(acceptable(&f), "accepted a bad file: {text}");
                prop_assert_eq!(g, f);
            }
            Err(e) => {
                prop_assert!(!acceptable(&f), "refused a good file ({e}): {text}");
                if let ReplayError::Event { index, .. } = e {
                    prop_assert!(index < f.events.len());
                }
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn fuzz_replay_arbitrary_text() {
    let mut r = runner(10_000);
    // Text around a valid file: cut, spliced, or random.
    let valid = serde_json::to_string(&ReplayFile {
        version: REPLAY_VERSION,
        seed: 1,
        backing: "4k".into(),
        memory: 64 * MB,
        vcpus: 1,
        ops_mix: DEFAULT_MIX.parse().unwrap(),
        inject_bug: None,
        events: vec![Event {
            seq: 0,
            kind: EventKind::Host(HostKind::Discard4k),
            frame: Some(3),
            page: 7,
        }],
    })
    .unwrap();
    let n = valid.len();
    let text = prop_oneof![
        ".{0,300}",
        (0..n, 0..n, ".{0,20}").prop_map(move |(a, b, ins)| {
            let (a, b) = (a.min(b), a.max(b));
            let s = valid.as_bytes();
            let mut t = s[..a].to_vec();
            t.extend_from_slice(ins.as_bytes());
            t.extend_from_slice(&s[b..]);
            String::from_utf8_lossy(&t).into_owned()
        }),
    ];
    r.run(&text, |t| {
        if let Ok(f) = ReplayFile::parse(&t, Path::new("fuzz.json")) {
            prop_assert!(acceptable(&f), "accepted a bad file: {t}");
        }
        Ok(())
    })
    .unwrap();
}
