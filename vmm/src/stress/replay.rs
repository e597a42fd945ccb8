//! Replay files: the host-side event sequence of a run, as JSON, that
//! `vmm stress --replay FILE` fires again in the same order.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::args::InjectBug;
use super::events::{Event, OpsMix};

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
    /// Load and validate.
    pub fn load(path: &Path) -> Result<ReplayFile, ReplayError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let f: ReplayFile = serde_json::from_str(&text).map_err(|e| ReplayError::Invalid {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if f.version != REPLAY_VERSION {
            return Err(ReplayError::Invalid {
                path: path.to_path_buf(),
                why: format!("version {} (this vmm reads {REPLAY_VERSION})", f.version),
            });
        }
        Ok(f)
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
            Err(ReplayError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
