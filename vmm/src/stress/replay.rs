//! Replay files: the host-side event sequence of a run, as JSON, that
//! `vmm stress --replay FILE` fires again in the same order.

use std::ops::Range;
use std::path::{Path, PathBuf};

use guest_mem::{Backing, HPAGE_SIZE};
use serde::{Deserialize, Serialize};

use super::args::InjectBug;
use super::events::{Event, EventKind, HostKind, OpsMix};
use crate::input_file::{self, InputFileError};

/// Pages of a 2M frame: an event's `page` is below this.
const PAGES_PER_FRAME: u16 = 512;
/// Most vCPUs a run may have (as `--vcpus`).
const MAX_VCPUS: u8 = 32;

/// Version of the format.
pub const REPLAY_VERSION: u32 = 1;

/// A replay file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayFile {
    /// Format version.
    pub version: u32,
    /// Seed of the original run.
    pub seed: u64,
    /// Backing (`hugetlb`, `thp`, `4k`).
    pub backing: String,
    /// Guest RAM bytes.
    pub memory: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The mix of the original run.
    pub ops_mix: OpsMix,
    /// Deliberate bug of the original run.
    pub inject_bug: Option<InjectBug>,
    /// The events, in order, as resolved and fired (quiescent points included).
    pub events: Vec<Event>,
}

/// Reading or writing a replay file failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Not a readable regular file (a FIFO is refused, never read).
    #[error("--replay: {0}")]
    File(#[from] InputFileError),
    /// An event does not fit the run (a frame or page outside guest RAM).
    #[error(
        "replay file {path}: event {index} ({event}): {why}; the file does not fit this run: \
         regenerate it with `vmm stress` or fix the event"
    )]
    Event {
        /// Path.
        path: PathBuf,
        /// Index in `events`.
        index: usize,
        /// The event as text.
        event: String,
        /// Why it is refused.
        why: String,
    },
    /// I/O.
    #[error("replay file {path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a replay file.
    #[error("replay file {path} is not valid: {why}")]
    Invalid {
        /// Path.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

impl ReplayFile {
    /// Load and validate (a regular file only: a FIFO is refused, not read).
    pub fn load(path: &Path) -> Result<ReplayFile, ReplayError> {
        let text = input_file::read_regular("--replay", path)?;
        ReplayFile::parse(&text, path)
    }

    /// Parse and validate the text of a replay file read from `path`:
    /// format, version, memory size, vCPUs, backing, and every event's frame
    /// and page against the run's guest RAM.
    pub fn parse(text: &str, path: &Path) -> Result<ReplayFile, ReplayError> {
        let invalid = |why: String| ReplayError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let f: ReplayFile = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if f.version != REPLAY_VERSION {
            return Err(invalid(format!(
                "version {} (this vmm reads {REPLAY_VERSION})",
                f.version
            )));
        }
        if let Err(e) = guest_mem::check_ram_size(f.memory) {
            return Err(invalid(format!("memory: {e}")));
        }
        if !(1..=MAX_VCPUS).contains(&f.vcpus) {
            return Err(invalid(format!(
                "vcpus {} must be between 1 and {MAX_VCPUS}",
                f.vcpus
            )));
        }
        f.backing
            .parse::<Backing>()
            .map_err(|e| invalid(e.to_string()))?;
        f.check_frames(path, &(0..f.memory / HPAGE_SIZE))?;
        Ok(f)
    }

    /// Check every event against the frames a run lets events act on
    /// (`frames`): a frame outside, a page outside its frame or a frame on
    /// a kind that acts on none is refused, naming the event.
    pub fn check_frames(&self, path: &Path, frames: &Range<u64>) -> Result<(), ReplayError> {
        for (index, ev) in self.events.iter().enumerate() {
            let why = event_problem(ev, frames, self.memory);
            if let Some(why) = why {
                return Err(ReplayError::Event {
                    path: path.to_path_buf(),
                    index,
                    event: ev.to_string(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// Write as pretty JSON.
    pub fn save(&self, path: &Path) -> Result<(), ReplayError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| ReplayError::Invalid {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// What is wrong with `ev` for a run whose events act on `frames` of
/// `memory` bytes of guest RAM, if anything.
fn event_problem(ev: &Event, frames: &Range<u64>, memory: u64) -> Option<String> {
    if ev.page >= PAGES_PER_FRAME {
        return Some(format!(
            "page {} is outside its 2M frame (pages 0..{PAGES_PER_FRAME})",
            ev.page
        ));
    }
    let takes_frame =
        matches!(ev.kind, EventKind::Host(k) if !matches!(k, HostKind::Dirtylog | HostKind::Slot));
    match ev.frame {
        Some(f) if !takes_frame => Some(format!(
            "{} acts on no frame, but frame {f} is given",
            ev.kind
        )),
        Some(f) if !frames.contains(&f) => Some(format!(
            "frame {f} is outside the frames events may act on ({}..{} of {} MiB of guest RAM)",
            frames.start,
            frames.end,
            memory >> 20
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::events::{EventKind, HostKind, DEFAULT_MIX};

    #[test]
    fn round_trip_and_rejects() {
        let dir = std::env::temp_dir().join(format!("vmm-replay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.json");
        let f = ReplayFile {
            version: REPLAY_VERSION,
            seed: 9,
            backing: "thp".into(),
            memory: 64 << 20,
            vcpus: 2,
            ops_mix: DEFAULT_MIX.parse().unwrap(),
            inject_bug: Some(InjectBug::SkipLog),
            events: vec![Event {
                seq: 0,
                kind: EventKind::Host(HostKind::Split),
                frame: Some(3),
                page: 0,
            }],
        };
        f.save(&p).unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("skip-log"));
        assert_eq!(ReplayFile::load(&p).unwrap(), f);
        std::fs::write(&p, "{}").unwrap();
        assert!(matches!(
            ReplayFile::load(&p),
            Err(ReplayError::Invalid { .. })
        ));
        assert!(matches!(
            ReplayFile::load(&dir.join("missing.json")),
            Err(ReplayError::File(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn file_with(ev: Event) -> ReplayFile {
        ReplayFile {
            version: REPLAY_VERSION,
            seed: 1,
            backing: "4k".into(),
            memory: 64 << 20,
            vcpus: 1,
            ops_mix: DEFAULT_MIX.parse().unwrap(),
            inject_bug: None,
            events: vec![
                Event {
                    seq: 0,
                    kind: EventKind::Quiesce,
                    frame: None,
                    page: 0,
                },
                ev,
            ],
        }
    }

    fn parse(f: &ReplayFile) -> Result<ReplayFile, ReplayError> {
        ReplayFile::parse(&serde_json::to_string(f).unwrap(), Path::new("r.json"))
    }

    #[test]
    fn out_of_range_frames_and_pages_are_refused_naming_the_event() {
        let ev = |kind, frame, page| Event {
            seq: 1,
            kind: EventKind::Host(kind),
            frame,
            page,
        };
        // 64M = frames 0..32.
        for (e, needle) in [
            (ev(HostKind::Wrprotect, Some(34), 0), "frame 34 is outside"),
            (ev(HostKind::Discard2m, Some(32), 0), "frame 32 is outside"),
            (ev(HostKind::Split, Some(u64::MAX), 0), "is outside"),
            (ev(HostKind::Discard4k, Some(3), 512), "page 512 is outside"),
            (ev(HostKind::Slot, Some(3), 0), "acts on no frame"),
        ] {
            let err = parse(&file_with(e)).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ReplayError::Event { index: 1, .. }), "{msg}");
            assert!(
                msg.contains(needle) && msg.contains("event 1 (#1 "),
                "{msg}"
            );
        }
        let ok = file_with(ev(HostKind::Discard4k, Some(31), 511));
        assert_eq!(parse(&ok).unwrap(), ok);
        // The run's own range (reserved frames excluded) is checked later.
        let err = ok.check_frames(Path::new("r.json"), &(2..31)).unwrap_err();
        assert!(err.to_string().contains("frame 31 is outside"), "{err}");
    }

    #[test]
    fn bad_memory_and_vcpus_are_refused() {
        let mut f = file_with(Event {
            seq: 1,
            kind: EventKind::Quiesce,
            frame: None,
            page: 0,
        });
        for (mem, vcpus) in [
            (0, 1),
            (3 << 20, 1),
            (!0x1f_ffff, 1),
            (64 << 20, 0),
            (64 << 20, 33),
        ] {
            f.memory = mem;
            f.vcpus = vcpus;
            assert!(
                matches!(parse(&f), Err(ReplayError::Invalid { .. })),
                "{mem} {vcpus}"
            );
        }
    }
}
