//! The THP mirror's prediction of what KVM maps (`thp::kvm_mirror`), from
//! memslot 0, the host level of every frame (from `GuestRam`'s frame states:
//! a huge frame is one PMD on the host), the guest's page size and the gfns
//! the guest touched.

use serde::Serialize;
use thp::kvm_mirror::{self, LevelMap, Memslot};
use thp::units::Level;

use crate::cli::RunArgs;
use crate::host::HostInfo;
use crate::testguest::{GuestPageSize, TestGuestImage};

const PAGE: u64 = 4096;
const HPAGE: u64 = 2 << 20;

/// What the mirror predicts for KVM's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Prediction {
    /// Predicted 4K mappings.
    pub pages_4k: u64,
    /// Predicted 2M mappings.
    pub pages_2m: u64,
    /// Frames in which KVM may legitimately differ from the prediction: KVM's
    /// `pages_2m` must be within this many of `pages_2m`, and its `pages_4k`
    /// at most `512 *` this many above `pages_4k`.
    pub tolerance_frames: u64,
    /// Why those frames.
    pub tolerance_reason: String,
    /// Whether the prediction is meant to be compared with KVM (test guests,
    /// whose touched pages are known) or is informative only (Linux).
    pub comparable: bool,
}

impl Prediction {
    /// Whether KVM's counters agree with the prediction within the tolerance.
    pub fn agrees(&self, pages_4k: u64, pages_2m: u64) -> bool {
        pages_2m.abs_diff(self.pages_2m) <= self.tolerance_frames
            && pages_4k <= self.pages_4k + 512 * self.tolerance_frames
    }
}

/// The host level of each frame as KVM's `host_pfn_mapping_level` sees it.
pub fn host_levels(states: &[guest_mem::FrameView]) -> Vec<Option<Level>> {
    states
        .iter()
        .map(|s| match s {
            guest_mem::FrameView::Huge { .. } => Some(Level::M2),
            guest_mem::FrameView::Small { present } if *present > 0 => Some(Level::K4),
            guest_mem::FrameView::Small { .. } | guest_mem::FrameView::Unpopulated => None,
        })
        .collect()
}

/// The guest's own cap on the mapping level: on shadow-paging hosts KVM
/// cannot map larger than the guest's page; with TDP the guest's page size
/// does not matter.
pub fn guest_level(host: &HostInfo, guest_pages: Option<GuestPageSize>) -> Level {
    match (host.shadow_paging(), guest_pages) {
        (true, Some(GuestPageSize::Size4K)) => Level::K4,
        _ => Level::M2,
    }
}

/// Predict `(pages_4k, pages_2m)` for guest RAM `[0, size)` at `host_addr`
/// with every gfn in `touched` faulted once.
pub fn predict(
    host_addr: u64,
    size: u64,
    levels: Vec<Option<Level>>,
    level: Level,
    touched: impl IntoIterator<Item = u64>,
) -> Result<(u64, u64), kvm_mirror::MirrorError> {
    let slot = Memslot {
        id: 0,
        base_gfn: 0,
        npages: size / PAGE,
        userspace_addr: host_addr,
        dirty_logging: false,
    };
    let map = LevelMap::new(host_addr, levels);
    kvm_mirror::predict(&[slot], &map, |_| level, touched)
}

/// What the mirror needs of a run besides guest RAM: the guest's cap on the
/// mapping level and how far KVM may differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorContext {
    /// The guest's own cap on the mapping level.
    pub level: Level,
    /// Whether the prediction is comparable with KVM (test guests).
    pub comparable: bool,
    /// See [`Prediction::tolerance_frames`].
    pub tolerance_frames: u64,
    /// See [`Prediction::tolerance_reason`].
    pub tolerance_reason: String,
}

/// The mirror context of a run.
pub fn context(
    size: u64,
    host: &HostInfo,
    args: &RunArgs,
    image: &Option<TestGuestImage>,
) -> MirrorContext {
    let guest_pages = image.as_ref().map(|_| args.guest_pages);
    let level = guest_level(host, guest_pages);
    let comparable = image.is_some();
    let (tolerance_frames, tolerance_reason) = match image {
        Some(img) => (
            img.reserved.end.div_ceil(HPAGE),
            format!(
                "the reserved region [0, {:#x}) holds the VMM's boot page tables and GDT and the guest's \
                 code, page tables and stacks: only some of its pages are touched, and on shadow-paging \
                 hosts KVM write-protects guest page-table pages and maps their frames at 4K",
                img.reserved.end
            ),
        ),
        None => (
            size / HPAGE,
            "a Linux guest touches what it likes (the prediction assumes all RAM); KVM's numbers are \
             informative only"
                .to_string(),
        ),
    };
    MirrorContext {
        level,
        comparable,
        tolerance_frames,
        tolerance_reason,
    }
}

/// Predict KVM's counters for guest RAM in `states` now (`None` when the
/// mirror refuses). Every built-in guest writes every page of its work
/// region; a Linux guest's touched set is unknown, so all RAM is assumed.
pub fn predict_with(
    ram: &guest_mem::GuestRam,
    states: &[guest_mem::FrameView],
    ctx: &MirrorContext,
) -> Option<Prediction> {
    let size = ram.size();
    let touched = 0..size / PAGE;
    match predict(
        ram.host_addr(),
        size,
        host_levels(states),
        ctx.level,
        touched,
    ) {
        Ok((pages_4k, pages_2m)) => Some(Prediction {
            pages_4k,
            pages_2m,
            tolerance_frames: ctx.tolerance_frames,
            tolerance_reason: ctx.tolerance_reason.clone(),
            comparable: ctx.comparable,
        }),
        Err(e) => {
            log::warn!("the KVM mirror could not predict: {e}");
            None
        }
    }
}

/// Predict KVM's counters for this run (`None` when the mirror refuses).
pub fn predict_run(
    ram: &guest_mem::GuestRam,
    states: &[guest_mem::FrameView],
    host: &HostInfo,
    args: &RunArgs,
    image: &Option<TestGuestImage>,
) -> Option<Prediction> {
    predict_with(ram, states, &context(ram.size(), host, args, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x7f00_0000_0000;

    #[test]
    fn huge_frames_map_2m_small_frames_4k() {
        let levels = vec![Some(Level::M2), Some(Level::K4), None, Some(Level::M2)];
        let (p4, p2) = predict(BASE, 4 * HPAGE, levels, Level::M2, 0..4 * 512).unwrap();
        assert_eq!(p2, 2);
        assert_eq!(p4, 512);
    }

    #[test]
    fn guest_4k_pages_cap_on_shadow_hosts() {
        let pv = HostInfo::from_texts("flags: fpu", "N");
        let hw = HostInfo::from_texts("flags: vmx", "Y");
        assert_eq!(guest_level(&pv, Some(GuestPageSize::Size4K)), Level::K4);
        assert_eq!(guest_level(&pv, Some(GuestPageSize::Size2M)), Level::M2);
        assert_eq!(guest_level(&hw, Some(GuestPageSize::Size4K)), Level::M2);
        let (p4, p2) = predict(
            BASE,
            2 * HPAGE,
            vec![Some(Level::M2); 2],
            Level::K4,
            0..1024,
        )
        .unwrap();
        assert_eq!((p4, p2), (1024, 0));
    }

    #[test]
    fn misaligned_host_address_forbids_2m() {
        let (p4, p2) = predict(
            BASE + PAGE,
            2 * HPAGE,
            vec![Some(Level::M2); 2],
            Level::M2,
            0..1024,
        )
        .unwrap();
        assert_eq!(p2, 0);
        assert_eq!(p4, 1024);
    }

    #[test]
    fn agreement_uses_the_tolerance() {
        let p = Prediction {
            pages_4k: 0,
            pages_2m: 128,
            tolerance_frames: 1,
            tolerance_reason: String::new(),
            comparable: true,
        };
        assert!(p.agrees(30, 127));
        assert!(p.agrees(0, 128));
        assert!(!p.agrees(0, 125));
        assert!(!p.agrees(1000, 128));
    }
}
