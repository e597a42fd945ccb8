//! THP policy: the sysfs knobs `transparent_hugepage/enabled`, `.../defrag` and
//! khugepaged's tunables, and the decisions derived from them.

use std::fmt;
use std::str::FromStr;

use crate::units::PAGES_PER_HPAGE;

/// `/sys/kernel/mm/transparent_hugepage/enabled`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enabled {
    /// Huge pages for every eligible fault.
    #[default]
    Always,
    /// Huge pages only in `MADV_HUGEPAGE` regions.
    Madvise,
    /// No huge pages at fault time (khugepaged does not collapse either).
    Never,
}

/// `/sys/kernel/mm/transparent_hugepage/defrag`: what a fault does when no
/// huge page is immediately available.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Defrag {
    /// Stall for direct reclaim/compaction on every fault.
    Always,
    /// Wake kswapd/kcompactd and fall back to small pages now.
    Defer,
    /// Direct reclaim for madvised regions, defer for the others.
    DeferMadvise,
    /// Direct reclaim for madvised regions only (kernel default).
    #[default]
    Madvise,
    /// Never reclaim: fall back immediately.
    Never,
}

/// khugepaged tunables (`/sys/kernel/mm/transparent_hugepage/khugepaged/*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Khugepaged {
    /// Maximum number of none (not present) PTEs in a collapsed range (default 511).
    pub max_ptes_none: u32,
    /// Maximum number of PTEs mapping pages shared with another mapping (default 256).
    pub max_ptes_shared: u32,
    /// Maximum number of swapped-out PTEs (default 64; swap is not modelled).
    pub max_ptes_swap: u32,
    /// Pages scanned per wake-up (default 4096).
    pub pages_to_scan: u32,
    /// Sleep between scans in milliseconds (default 10000).
    pub scan_sleep_ms: u32,
}

impl Default for Khugepaged {
    fn default() -> Self {
        Khugepaged {
            max_ptes_none: 511,
            max_ptes_shared: 256,
            max_ptes_swap: 64,
            pages_to_scan: 4096,
            scan_sleep_ms: 10_000,
        }
    }
}

impl Khugepaged {
    /// khugepaged's none-PTE limit (`SCAN_EXCEED_NONE_PTE` in
    /// `hpage_collapse_scan_pmd` and `hpage_collapse_scan_file`,
    /// mm/khugepaged.c): a 2M range with `present` of its 512 PTEs present
    /// qualifies when at most `max_ptes_none` of them are none. The kernel
    /// takes at most 511 (`max_ptes_none_store` rejects more), so a range with
    /// nothing present never qualifies, whatever value this struct holds.
    pub fn none_ptes_within_limit(&self, present: u32) -> bool {
        let ptes = PAGES_PER_HPAGE as u32;
        let none = ptes - present.min(ptes);
        none < ptes && none <= self.max_ptes_none
    }
}

/// Everything that decides whether a fault gets a huge page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThpPolicy {
    /// The `enabled` mode.
    pub enabled: Enabled,
    /// The `defrag` mode.
    pub defrag: Defrag,
    /// khugepaged tunables.
    pub khugepaged: Khugepaged,
}

/// What a huge-capable fault does when the pool is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmptyPoolAction {
    /// Map small pages now (`thp_fault_fallback`).
    FallbackSmall,
    /// Try direct reclaim/compaction, then retry the huge allocation once.
    ReclaimThenRetry,
    /// Map small pages now and let khugepaged collapse later.
    DeferToKhugepaged,
}

impl ThpPolicy {
    /// Policy with huge pages always allowed and kernel-default tunables.
    pub fn always() -> Self {
        ThpPolicy {
            enabled: Enabled::Always,
            ..Default::default()
        }
    }

    /// Policy with huge pages never used at fault time.
    pub fn never() -> Self {
        ThpPolicy {
            enabled: Enabled::Never,
            ..Default::default()
        }
    }

    /// Whether a fault in a region (madvised with `MADV_HUGEPAGE` or not) may
    /// allocate a huge page (`__thp_vma_allowable_orders` at fault time).
    pub fn fault_may_use_huge(&self, madvised: bool) -> bool {
        match self.enabled {
            Enabled::Always => true,
            Enabled::Madvise => madvised,
            Enabled::Never => false,
        }
    }

    /// Whether khugepaged may collapse in such a region (same rule as faults).
    pub fn collapse_allowed(&self, madvised: bool) -> bool {
        self.fault_may_use_huge(madvised)
    }

    /// What to do when a huge-capable fault finds the pool empty
    /// (`vma_thp_gfp_mask` semantics of the `defrag` mode).
    pub fn on_pool_empty(&self, madvised: bool) -> EmptyPoolAction {
        match self.defrag {
            Defrag::Always => EmptyPoolAction::ReclaimThenRetry,
            Defrag::Defer => EmptyPoolAction::DeferToKhugepaged,
            Defrag::DeferMadvise => {
                if madvised {
                    EmptyPoolAction::ReclaimThenRetry
                } else {
                    EmptyPoolAction::DeferToKhugepaged
                }
            }
            Defrag::Madvise => {
                if madvised {
                    EmptyPoolAction::ReclaimThenRetry
                } else {
                    EmptyPoolAction::FallbackSmall
                }
            }
            Defrag::Never => EmptyPoolAction::FallbackSmall,
        }
    }
}

/// A sysfs spelling that is not one of the accepted values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {knob} value {value:?}; expected one of: {expected}")]
pub struct ParsePolicyError {
    /// Which knob was parsed.
    pub knob: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted spellings.
    pub expected: &'static str,
}

/// The bracketed value of a sysfs choice file: `"always [madvise] never"`
/// selects `madvise`; `None` when nothing is bracketed. The one parser of that
/// format: `guest-mem` (which reads the files) and `vmm` use it too.
pub fn selected(text: &str) -> Option<&str> {
    let s = text.find('[')?;
    let e = text[s..].find(']')? + s;
    Some(&text[s + 1..e])
}

/// A knob value as typed (`madvise`) or as sysfs shows it (`[madvise]`).
fn knob_value(s: &str) -> &str {
    selected(s).unwrap_or(s.trim())
}

impl FromStr for Enabled {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match knob_value(s) {
            "always" => Ok(Enabled::Always),
            "madvise" => Ok(Enabled::Madvise),
            "never" => Ok(Enabled::Never),
            other => Err(ParsePolicyError {
                knob: "enabled",
                value: other.to_string(),
                expected: "always, madvise, never",
            }),
        }
    }
}

impl FromStr for Defrag {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match knob_value(s) {
            "always" => Ok(Defrag::Always),
            "defer" => Ok(Defrag::Defer),
            "defer+madvise" => Ok(Defrag::DeferMadvise),
            "madvise" => Ok(Defrag::Madvise),
            "never" => Ok(Defrag::Never),
            other => Err(ParsePolicyError {
                knob: "defrag",
                value: other.to_string(),
                expected: "always, defer, defer+madvise, madvise, never",
            }),
        }
    }
}

impl fmt::Display for Enabled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Enabled::Always => "always",
            Enabled::Madvise => "madvise",
            Enabled::Never => "never",
        })
    }
}

impl fmt::Display for Defrag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Defrag::Always => "always",
            Defrag::Defer => "defer",
            Defrag::DeferMadvise => "defer+madvise",
            Defrag::Madvise => "madvise",
            Defrag::Never => "never",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_pte_limit_counts_missing_pages() {
        let k = |max_ptes_none| Khugepaged {
            max_ptes_none,
            ..Khugepaged::default()
        };
        assert!(k(0).none_ptes_within_limit(512));
        assert!(!k(0).none_ptes_within_limit(511));
        assert!(k(100).none_ptes_within_limit(412));
        assert!(!k(100).none_ptes_within_limit(411));
        assert!(k(511).none_ptes_within_limit(1));
        assert!(!k(511).none_ptes_within_limit(0));
        assert!(!k(512).none_ptes_within_limit(0));
    }

    #[test]
    fn selected_value() {
        assert_eq!(
            selected("always within_size [advise] never deny force\n"),
            Some("advise")
        );
        assert_eq!(selected("always [madvise] never\n"), Some("madvise"));
        assert_eq!(selected("always advise"), None);
        assert_eq!(selected(""), None);
    }

    #[test]
    fn parses_sysfs_spellings_with_brackets() {
        assert_eq!("always [madvise] never".parse(), Ok(Enabled::Madvise));
        assert_eq!("never".parse(), Ok(Enabled::Never));
        assert_eq!(
            "always defer [defer+madvise] madvise never".parse(),
            Ok(Defrag::DeferMadvise)
        );
        assert!("sometimes".parse::<Enabled>().is_err());
        assert!("".parse::<Defrag>().is_err());
        for d in [
            Defrag::Always,
            Defrag::Defer,
            Defrag::DeferMadvise,
            Defrag::Madvise,
            Defrag::Never,
        ] {
            assert_eq!(d.to_string().parse(), Ok(d));
        }
    }

    #[test]
    fn khugepaged_defaults_match_kernel() {
        let k = Khugepaged::default();
        assert_eq!(
            (k.max_ptes_none, k.max_ptes_shared, k.max_ptes_swap),
            (511, 256, 64)
        );
        assert_eq!((k.pages_to_scan, k.scan_sleep_ms), (4096, 10_000));
    }

    #[test]
    fn fault_and_empty_pool_decisions() {
        let mut p = ThpPolicy::default();
        assert!(p.fault_may_use_huge(false));
        p.enabled = Enabled::Madvise;
        assert!(!p.fault_may_use_huge(false));
        assert!(p.fault_may_use_huge(true));
        p.enabled = Enabled::Never;
        assert!(!p.fault_may_use_huge(true));
        p.defrag = Defrag::Madvise;
        assert_eq!(p.on_pool_empty(true), EmptyPoolAction::ReclaimThenRetry);
        assert_eq!(p.on_pool_empty(false), EmptyPoolAction::FallbackSmall);
        p.defrag = Defrag::DeferMadvise;
        assert_eq!(p.on_pool_empty(false), EmptyPoolAction::DeferToKhugepaged);
        p.defrag = Defrag::Never;
        assert_eq!(p.on_pool_empty(true), EmptyPoolAction::FallbackSmall);
    }
}
