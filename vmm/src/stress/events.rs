//! Event kinds, the `--ops-mix` weights, the seeded generator and the
//! recorded (resolved) events that make up a replay file.

use std::fmt;
use std::str::FromStr;

use guest_mem::Backing;
use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use thp::interleave::SplitMix64;

/// The eight host-side event kinds `--ops-mix` names: one definition,
/// shared with the THP model's interleaver (same names, same order).
pub use thp::interleave::EventKind as HostKind;

/// A kind of event of a stress run: a host-side event, or a quiescent point.
/// Spelled (CLI, report, replay file) as the [`HostKind`] name, `quiesce`
/// or `quiescedirty`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventKind {
    /// A host-side event (discard4k, discard2m, split, collapse, wrprotect,
    /// dirtylog, slot, pageout).
    Host(HostKind),
    /// Quiescent point: KVM's counters against the mirror's prediction.
    Quiesce,
    /// Quiescent point with dirty logging on (the mirror predicts no 2M).
    QuiesceDirty,
}

impl EventKind {
    /// The kinds `--ops-mix` weighs (quiescent points are not random), in
    /// [`HostKind::ALL`] order.
    pub const RANDOM: [EventKind; HostKind::ALL.len()] = {
        let mut out = [EventKind::Quiesce; HostKind::ALL.len()];
        let mut i = 0;
        while i < out.len() {
            out[i] = EventKind::Host(HostKind::ALL[i]);
            i += 1;
        }
        out
    };

    /// CLI / report spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Host(k) => k.as_str(),
            EventKind::Quiesce => "quiesce",
            EventKind::QuiesceDirty => "quiescedirty",
        }
    }

    /// Whether this kind applies to `backing`: `4k` has no huge frames, so
    /// no split or collapse; everything else applies everywhere.
    pub fn applies_to(self, backing: Backing) -> bool {
        !matches!(
            (self, backing),
            (
                EventKind::Host(HostKind::Split | HostKind::Collapse),
                Backing::Small4k
            )
        )
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `--ops-mix` names: the host-side kinds only.
impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<HostKind>()
            .map(EventKind::Host)
            .map_err(|e| e.to_string())
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Replay files and reports: every kind, quiescent points included.
impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        [EventKind::Quiesce, EventKind::QuiesceDirty]
            .into_iter()
            .find(|k| k.as_str() == s)
            .map_or_else(|| s.parse().map_err(de::Error::custom), Ok)
    }
}

/// Weights per event kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpsMix {
    /// `(kind, weight)` in [`EventKind::RANDOM`] order.
    pub weights: Vec<(EventKind, u32)>,
}

/// The default `--ops-mix`.
pub const DEFAULT_MIX: &str =
    "discard4k=4,discard2m=1,split=2,collapse=2,wrprotect=1,dirtylog=1,slot=1,pageout=1";

impl FromStr for OpsMix {
    type Err = String;
    /// `kind=weight,...`; kinds not named get weight 0.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut weights: Vec<(EventKind, u32)> =
            EventKind::RANDOM.iter().map(|k| (*k, 0)).collect();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, w) = part
                .split_once('=')
                .ok_or_else(|| format!("--ops-mix entry {part:?} must be KIND=WEIGHT"))?;
            let kind: EventKind = k.trim().parse()?;
            let w: u32 = w.trim().parse().map_err(|_| {
                format!("--ops-mix weight of {k} must be a whole number, got {w:?}")
            })?;
            if w > 1_000_000 {
                return Err(format!(
                    "--ops-mix weight of {k} is too large (max 1000000)"
                ));
            }
            if let Some(e) = weights.iter_mut().find(|e| e.0 == kind) {
                e.1 = w;
            }
        }
        if weights.iter().all(|e| e.1 == 0) {
            return Err("--ops-mix gives every event kind weight 0".into());
        }
        Ok(OpsMix { weights })
    }
}

impl OpsMix {
    /// The mix with kinds that do not apply to `backing` set to 0.
    pub fn for_backing(&self, backing: Backing) -> Result<OpsMix, String> {
        let weights: Vec<(EventKind, u32)> = self
            .weights
            .iter()
            .map(|(k, w)| (*k, if k.applies_to(backing) { *w } else { 0 }))
            .collect();
        if weights.iter().all(|e| e.1 == 0) {
            return Err(format!(
                "no event kind of --ops-mix applies to --backing {backing} (4k has no split/collapse)"
            ));
        }
        Ok(OpsMix { weights })
    }

    fn total(&self) -> u64 {
        self.weights.iter().map(|e| u64::from(e.1)).sum()
    }

    fn pick(&self, r: u64) -> EventKind {
        let mut x = r % self.total().max(1);
        for (k, w) in &self.weights {
            if x < u64::from(*w) {
                return *k;
            }
            x -= u64::from(*w);
        }
        EventKind::Host(HostKind::Discard4k)
    }
}

/// A drawn event before it meets the machine: `target` picks the frame
/// (or the vCPU for `wrprotect`), `page` the 4K page inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    /// Kind.
    pub kind: EventKind,
    /// Raw target.
    pub target: u64,
    /// Page in the frame (0..512).
    pub page: u16,
}

/// The seeded generator.
#[derive(Debug, Clone)]
pub struct Generator {
    /// SplitMix64, whose sequence is fixed forever (unlike library
    /// generators), so a seed means the same event sequence in every version.
    rng: SplitMix64,
    mix: OpsMix,
}

impl Generator {
    /// A generator for `seed` and `mix`.
    pub fn new(seed: u64, mix: OpsMix) -> Generator {
        Generator {
            rng: SplitMix64::new(seed),
            mix,
        }
    }

    /// The next event.
    pub fn draw(&mut self) -> Draw {
        let kind = self.mix.pick(self.rng.next_u64());
        let target = self.rng.next_u64();
        let page = (self.rng.next_u64() % 512) as u16;
        Draw { kind, target, page }
    }
}

/// An event as executed: what the replay file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the sequence.
    pub seq: u64,
    /// Kind.
    pub kind: EventKind,
    /// Frame acted on (`None`: no frame, e.g. slot, dirtylog, quiescent points,
    /// or no frame qualified).
    pub frame: Option<u64>,
    /// 4K page inside the frame (`discard4k`).
    pub page: u16,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.seq, self.kind)?;
        if let Some(fr) = self.frame {
            // Checked: a replay file may name any frame (it is refused
            // afterwards, by a message that shows it).
            match fr.checked_mul(1 << 21) {
                Some(gpa) => write!(f, " frame {fr} (gpa {gpa:#x})")?,
                None => write!(f, " frame {fr}")?,
            }
            if self.kind == EventKind::Host(HostKind::Discard4k) {
                write!(f, " page {}", self.page)?;
                if let Some(gfn) = fr
                    .checked_mul(512)
                    .and_then(|g| g.checked_add(u64::from(self.page)))
                {
                    write!(f, " (gfn {gfn:#x})")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_parses_and_rejects() {
        let m: OpsMix = DEFAULT_MIX.parse().unwrap();
        assert_eq!(m.total(), 13);
        assert_eq!(m.weights[0], (EventKind::Host(HostKind::Discard4k), 4));
        assert!("discard4k".parse::<OpsMix>().is_err());
        assert!("bogus=1".parse::<OpsMix>().is_err());
        assert!("split=x".parse::<OpsMix>().is_err());
        assert!("split=0".parse::<OpsMix>().is_err());
        let only_split: OpsMix = "split=1".parse().unwrap();
        assert!(only_split.for_backing(Backing::Small4k).is_err());
        let m4k = m.for_backing(Backing::Small4k).unwrap();
        assert_eq!(m4k.total(), 9);
    }

    #[test]
    fn same_seed_same_sequence_and_weights_respected() {
        let m: OpsMix = "discard4k=3,slot=1".parse().unwrap();
        let a: Vec<Draw> = {
            let mut g = Generator::new(7, m.clone());
            (0..1000).map(|_| g.draw()).collect()
        };
        let mut g = Generator::new(7, m.clone());
        let b: Vec<Draw> = (0..1000).map(|_| g.draw()).collect();
        assert_eq!(a, b);
        let mut g = Generator::new(8, m);
        let c: Vec<Draw> = (0..1000).map(|_| g.draw()).collect();
        assert_ne!(a, c);
        let slots = a
            .iter()
            .filter(|d| d.kind == EventKind::Host(HostKind::Slot))
            .count();
        assert!((150..350).contains(&slots), "{slots}");
        assert!(a.iter().all(|d| matches!(
            d.kind,
            EventKind::Host(HostKind::Slot) | EventKind::Host(HostKind::Discard4k)
        ) && d.page < 512));
    }

    #[test]
    fn quiescent_points_round_trip_but_are_no_ops_mix_kind() {
        for k in [EventKind::Quiesce, EventKind::QuiesceDirty] {
            let s = serde_json::to_string(&k).unwrap();
            assert_eq!(s, format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<EventKind>(&s).unwrap(), k);
            assert!(k.as_str().parse::<EventKind>().is_err());
        }
        assert_eq!(EventKind::RANDOM.len(), 8);
        for k in EventKind::RANDOM {
            assert_eq!(k.as_str().parse::<EventKind>(), Ok(k));
        }
        assert!(serde_json::from_str::<EventKind>("\"bogus\"").is_err());
    }

    #[test]
    fn generator_sequence_is_splitmix64() {
        // The first splitmix64 output for seed 0: replay files depend on it.
        let mut g = Generator::new(0, "slot=1".parse().unwrap());
        assert_eq!(g.rng.next_u64(), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn events_round_trip_as_json() {
        let e = Event {
            seq: 3,
            kind: EventKind::Host(HostKind::Discard4k),
            frame: Some(5),
            page: 7,
        };
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"discard4k\""), "{s}");
        assert_eq!(serde_json::from_str::<Event>(&s).unwrap(), e);
        assert_eq!(
            e.to_string(),
            "#3 discard4k frame 5 (gpa 0xa00000) page 7 (gfn 0xa07)"
        );
    }
}
