//! `Backing` and the host prerequisite checks, with errors that say what to set.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::GuestMemError;
use crate::smaps::{self, HugeMeminfo};

/// What backs guest RAM on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backing {
    /// Our own allocator: a `MFD_HUGETLB | MFD_HUGE_2MB` memfd as the pool of
    /// 2M frames plus an ordinary memfd for small pages.
    #[default]
    Hugetlb,
    /// One shmem memfd with `MADV_HUGEPAGE`: the kernel's shmem THP.
    Thp,
    /// One shmem memfd with `MADV_NOHUGEPAGE`: 4K pages only.
    Small4k,
    /// [`Backing::Hugetlb`] with a pool of 1G pages above it: every whole,
    /// 1G-aligned GiB of guest RAM on one `MFD_HUGE_1GB` page (while the host
    /// has them), the rest on 2M frames and small pages as `hugetlb`.
    Hugetlb1g,
}

impl Backing {
    /// Whether the backing has huge frames at all.
    pub fn has_huge_frames(self) -> bool {
        !matches!(self, Backing::Small4k)
    }

    /// Whether frames come from our own 2M hugetlb pool and small-page memfd
    /// (`hugetlb` and `hugetlb-1g`).
    pub fn is_hugetlb(self) -> bool {
        matches!(self, Backing::Hugetlb | Backing::Hugetlb1g)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backing::Hugetlb => "hugetlb",
            Backing::Thp => "thp",
            Backing::Small4k => "4k",
            Backing::Hugetlb1g => "hugetlb-1g",
        })
    }
}

/// An unknown backing name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown backing {0:?}: use one of hugetlb, hugetlb-1g, thp, 4k")]
pub struct ParseBackingError(pub String);

impl FromStr for Backing {
    type Err = ParseBackingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hugetlb" => Ok(Backing::Hugetlb),
            "thp" => Ok(Backing::Thp),
            "4k" => Ok(Backing::Small4k),
            "hugetlb-1g" => Ok(Backing::Hugetlb1g),
            other => Err(ParseBackingError(other.to_string())),
        }
    }
}

/// Where the host's settings live (`/sys`, `/proc/meminfo`); tests point it
/// at a fake tree.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// sysfs mount point, normally `/sys`.
    pub sys: std::path::PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self { sys: "/sys".into() }
    }
}

pub use thp::policy::selected;

/// The `[selected]` value of the sysfs choice file `knob` under
/// `paths.sys` (e.g. `kernel/mm/transparent_hugepage/enabled`).
pub fn read_selected(paths: &HostPaths, knob: &str) -> Result<String, GuestMemError> {
    read_choice(&paths.sys.join(knob))
}

fn read_choice(path: &Path) -> Result<String, GuestMemError> {
    let text = std::fs::read_to_string(path).map_err(|source| GuestMemError::HostRead {
        path: path.display().to_string(),
        source,
    })?;
    selected(&text)
        .map(str::to_string)
        .ok_or_else(|| GuestMemError::HostParse {
            path: path.display().to_string(),
            detail: format!("no [selected] value in {:?}", text.trim()),
        })
}

/// Check that shmem THP can be used with `MADV_HUGEPAGE`: the 2M per-size
/// knob (when present and not `inherit`) or else the global
/// `shmem_enabled` must be `advise`, `within_size`, `always` or `force`.
pub fn check_shmem_thp(paths: &HostPaths) -> Result<(), GuestMemError> {
    let thp = paths.sys.join("kernel/mm/transparent_hugepage");
    let per_size = thp.join("hugepages-2048kB/shmem_enabled");
    if per_size.exists() {
        let v = read_choice(&per_size)?;
        if v != "inherit" {
            return shmem_value_ok(&per_size, &v);
        }
    }
    let global = thp.join("shmem_enabled");
    let v = read_choice(&global)?;
    shmem_value_ok(&global, &v)
}

fn shmem_value_ok(path: &Path, v: &str) -> Result<(), GuestMemError> {
    match v {
        "advise" | "within_size" | "always" | "force" => Ok(()),
        _ => Err(GuestMemError::ShmemThpDisabled {
            path: path.display().to_string(),
            value: v.to_string(),
        }),
    }
}

/// The host's 1G hugetlb counters (sysfs `hugepages-1048576kB`).
pub fn hugetlb_1g_counters(paths: &HostPaths) -> Result<HugeMeminfo, GuestMemError> {
    let dir = paths.sys.join("kernel/mm/hugepages/hugepages-1048576kB");
    if !dir.exists() {
        return Err(GuestMemError::HugetlbUnavailable {
            detail: format!(
                "{} is missing (no 1G pages on this CPU or kernel)",
                dir.display()
            ),
        });
    }
    sysfs_counters(&dir, 1 << 30)
}

/// The counters of one hugetlb size from its sysfs directory.
fn sysfs_counters(dir: &Path, page_size: u64) -> Result<HugeMeminfo, GuestMemError> {
    let read = |name: &str| -> Result<u64, GuestMemError> {
        let p = dir.join(name);
        let t = std::fs::read_to_string(&p).map_err(|source| GuestMemError::HostRead {
            path: p.display().to_string(),
            source,
        })?;
        t.trim().parse().map_err(|_| GuestMemError::HostParse {
            path: p.display().to_string(),
            detail: format!("not a number: {:?}", t.trim()),
        })
    };
    Ok(HugeMeminfo {
        total: read("nr_hugepages")?,
        free: read("free_hugepages")?,
        rsvd: read("resv_hugepages")?,
        surp: read("surplus_hugepages")?,
        page_size,
    })
}

/// The host's 2M hugetlb counters: sysfs `hugepages-2048kB` when present
/// (exact for 2M whatever the default size), else `/proc/meminfo`.
pub fn hugetlb_2m_counters(paths: &HostPaths) -> Result<HugeMeminfo, GuestMemError> {
    let dir = paths.sys.join("kernel/mm/hugepages/hugepages-2048kB");
    if dir.exists() {
        return sysfs_counters(&dir, 2 << 20);
    }
    let m = smaps::read_meminfo()?;
    if m.page_size != 2 << 20 {
        return Err(GuestMemError::HugetlbUnavailable {
            detail: format!(
                "the default huge page size is {} kB and {} is missing",
                m.page_size / 1024,
                dir.display()
            ),
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for s in ["hugetlb", "thp", "4k", "hugetlb-1g"] {
            assert_eq!(s.parse::<Backing>().unwrap().to_string(), s);
        }
        let e = "2m".parse::<Backing>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown backing \"2m\": use one of hugetlb, hugetlb-1g, thp, 4k"
        );
    }

    fn fake_sys(global: &str, per_size: Option<&str>) -> (std::path::PathBuf, HostPaths) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let root = std::env::temp_dir().join(format!(
            "guest-mem-fake-sys-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let thp = root.join("kernel/mm/transparent_hugepage");
        std::fs::create_dir_all(thp.join("hugepages-2048kB")).unwrap();
        std::fs::write(thp.join("shmem_enabled"), global).unwrap();
        if let Some(p) = per_size {
            std::fs::write(thp.join("hugepages-2048kB/shmem_enabled"), p).unwrap();
        }
        (root.clone(), HostPaths { sys: root })
    }

    #[test]
    fn shmem_thp_disabled_names_the_file_and_the_fix() {
        let (root, p) = fake_sys("always within_size advise [never] deny force\n", None);
        let e = check_shmem_thp(&p).unwrap_err();
        let file = root.join("kernel/mm/transparent_hugepage/shmem_enabled");
        assert_eq!(
            e.to_string(),
            format!(
                "shmem transparent huge pages are disabled ({0} = never): set it with `echo advise > {0}` (or use --backing hugetlb / 4k)",
                file.display()
            )
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn per_size_knob_overrides_unless_inherit() {
        let (r1, p) = fake_sys("[never]", Some("always inherit [advise] never"));
        check_shmem_thp(&p).unwrap();
        let (r2, p) = fake_sys("[advise]", Some("always [inherit] advise never"));
        check_shmem_thp(&p).unwrap();
        let (r3, p) = fake_sys("[advise]", Some("always inherit advise [never]"));
        let e = check_shmem_thp(&p).unwrap_err();
        assert!(
            e.to_string()
                .contains("hugepages-2048kB/shmem_enabled = never"),
            "{e}"
        );
        for r in [r1, r2, r3] {
            std::fs::remove_dir_all(r).unwrap();
        }
    }

    #[test]
    fn live_host_counters_are_consistent() {
        let m = hugetlb_2m_counters(&HostPaths::default()).unwrap();
        assert_eq!(m.page_size, 2 << 20);
        assert!(m.free <= m.total + m.surp);
    }
}
