//! The host's own accounting: `/proc/self/smaps` over the guest range and the
//! hugetlb counters of `/proc/meminfo`.

use crate::error::GuestMemError;

/// Sizes (bytes) summed over the VMAs inside a host range, from `/proc/self/smaps`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmapsTotals {
    /// Number of VMAs inside the range.
    pub vmas: usize,
    /// `Rss`.
    pub rss: u64,
    /// `Private_Hugetlb`.
    pub private_hugetlb: u64,
    /// `Shared_Hugetlb`.
    pub shared_hugetlb: u64,
    /// `ShmemPmdMapped`.
    pub shmem_pmd_mapped: u64,
    /// `FilePmdMapped`.
    pub file_pmd_mapped: u64,
    /// `AnonHugePages`.
    pub anon_huge_pages: u64,
}

impl SmapsTotals {
    /// `Private_Hugetlb + Shared_Hugetlb`: hugetlb pages mapped in the range.
    pub fn hugetlb(&self) -> u64 {
        self.private_hugetlb + self.shared_hugetlb
    }

    fn add_field(&mut self, name: &str, bytes: u64) {
        match name {
            "Rss" => self.rss += bytes,
            "Private_Hugetlb" => self.private_hugetlb += bytes,
            "Shared_Hugetlb" => self.shared_hugetlb += bytes,
            "ShmemPmdMapped" => self.shmem_pmd_mapped += bytes,
            "FilePmdMapped" => self.file_pmd_mapped += bytes,
            "AnonHugePages" => self.anon_huge_pages += bytes,
            _ => {}
        }
    }
}

/// One VMA of smaps with the fields we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SmapsVma {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `KernelPageSize` in bytes (2M for a hugetlb VMA).
    pub kernel_page_size: u64,
    /// `VmFlags` has `dd` (`VM_DONTDUMP`).
    pub dontdump: bool,
    /// The VMA's fields.
    pub totals: SmapsTotals,
}

const SMAPS: &str = "/proc/self/smaps";

/// Parse smaps text; keep the VMAs lying inside `[start, end)`.
pub fn parse_smaps(text: &str, start: u64, end: u64) -> Result<Vec<SmapsVma>, GuestMemError> {
    let mut out = Vec::new();
    let mut cur: Option<SmapsVma> = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if let Some(name) = first.strip_suffix(':') {
            let Some(v) = cur.as_mut() else { continue };
            if name == "VmFlags" {
                v.dontdump = it.any(|f| f == "dd");
                continue;
            }
            let (Some(num), Some("kB")) = (it.next(), it.next()) else {
                continue;
            };
            let kb: u64 = num.parse().map_err(|_| GuestMemError::HostParse {
                path: SMAPS.into(),
                detail: format!("bad number in line {line:?}"),
            })?;
            if name == "KernelPageSize" {
                v.kernel_page_size = kb * 1024;
            } else {
                v.totals.add_field(name, kb * 1024);
            }
            continue;
        }
        // A header line: "start-end perms offset dev inode [path]".
        let Some((a, b)) = first.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        if let Some(v) = cur.take() {
            out.push(v);
        }
        if a >= start && b <= end {
            cur = Some(SmapsVma {
                start: a,
                end: b,
                kernel_page_size: 0,
                dontdump: false,
                totals: SmapsTotals {
                    vmas: 1,
                    ..SmapsTotals::default()
                },
            });
        }
    }
    if let Some(v) = cur.take() {
        out.push(v);
    }
    Ok(out)
}

/// Read `/proc/self/smaps` and return the VMAs inside `[start, end)`.
pub fn read_vmas(start: u64, end: u64) -> Result<Vec<SmapsVma>, GuestMemError> {
    let text = std::fs::read_to_string(SMAPS).map_err(|source| GuestMemError::HostRead {
        path: SMAPS.into(),
        source,
    })?;
    parse_smaps(&text, start, end)
}

/// Sum of the VMAs' fields.
pub fn sum(vmas: &[SmapsVma]) -> SmapsTotals {
    let mut t = SmapsTotals::default();
    for v in vmas {
        t.vmas += 1;
        t.rss += v.totals.rss;
        t.private_hugetlb += v.totals.private_hugetlb;
        t.shared_hugetlb += v.totals.shared_hugetlb;
        t.shmem_pmd_mapped += v.totals.shmem_pmd_mapped;
        t.file_pmd_mapped += v.totals.file_pmd_mapped;
        t.anon_huge_pages += v.totals.anon_huge_pages;
    }
    t
}

/// The hugetlb lines of `/proc/meminfo` (pages, and the page size in bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HugeMeminfo {
    /// `HugePages_Total`.
    pub total: u64,
    /// `HugePages_Free`.
    pub free: u64,
    /// `HugePages_Rsvd`.
    pub rsvd: u64,
    /// `HugePages_Surp`.
    pub surp: u64,
    /// `Hugepagesize` in bytes.
    pub page_size: u64,
}

impl HugeMeminfo {
    /// Free pages nobody has reserved yet.
    pub fn available(&self) -> u64 {
        self.free.saturating_sub(self.rsvd)
    }

    /// `HugePages_Free` when the default huge page size is 2M, else 0 (no
    /// 2M pool to take from).
    pub fn free_2m(&self) -> u64 {
        if self.page_size == crate::HPAGE_SIZE {
            self.free
        } else {
            0
        }
    }
}

const MEMINFO: &str = "/proc/meminfo";

/// Parse meminfo text.
pub fn parse_meminfo(text: &str) -> Result<HugeMeminfo, GuestMemError> {
    let mut m = HugeMeminfo::default();
    let mut seen = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let slot = match k {
            "HugePages_Total:" => &mut m.total,
            "HugePages_Free:" => &mut m.free,
            "HugePages_Rsvd:" => &mut m.rsvd,
            "HugePages_Surp:" => &mut m.surp,
            "Hugepagesize:" => &mut m.page_size,
            _ => continue,
        };
        let n: u64 = v.parse().map_err(|_| GuestMemError::HostParse {
            path: MEMINFO.into(),
            detail: format!("bad number in line {line:?}"),
        })?;
        *slot = if k == "Hugepagesize:" { n * 1024 } else { n };
        seen += 1;
    }
    if seen < 5 {
        return Err(GuestMemError::HostParse {
            path: MEMINFO.into(),
            detail: "no HugePages_* lines: the kernel has no hugetlb support".into(),
        });
    }
    Ok(m)
}

/// Read the hugetlb counters of `/proc/meminfo`.
pub fn read_meminfo() -> Result<HugeMeminfo, GuestMemError> {
    let text = std::fs::read_to_string(MEMINFO).map_err(|source| GuestMemError::HostRead {
        path: MEMINFO.into(),
        source,
    })?;
    parse_meminfo(&text)
}

/// Base pages the host kernel has migrated since boot (`pgmigrate_success` of
/// `/proc/vmstat`: compaction, khugepaged, NUMA balancing...). Each migration of
/// a page of guest RAM is an mmu-notifier invalidation no VMM asked for. `None`
/// when the kernel does not say.
pub fn pages_migrated() -> Option<u64> {
    parse_vmstat(
        &std::fs::read_to_string("/proc/vmstat").ok()?,
        "pgmigrate_success",
    )
}

/// Counter `key` of `/proc/vmstat` text.
pub fn parse_vmstat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// `MemAvailable` of meminfo text, in bytes.
pub fn parse_mem_available(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == "MemAvailable:")
            .then(|| it.next()?.parse::<u64>().ok())?
            .map(|kb| kb * 1024)
    })
}

/// `MemAvailable` of `/proc/meminfo` in bytes: what the host can give a
/// new user without swapping.
pub fn read_mem_available() -> Result<u64, GuestMemError> {
    let text = std::fs::read_to_string(MEMINFO).map_err(|source| GuestMemError::HostRead {
        path: MEMINFO.into(),
        source,
    })?;
    parse_mem_available(&text).ok_or_else(|| GuestMemError::HostParse {
        path: MEMINFO.into(),
        detail: "no MemAvailable line".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmstat_counter_is_read_by_name() {
        let t = "pgmigrate_fail 7\npgmigrate_success 4313067\ncompact_stall 9\n";
        assert_eq!(parse_vmstat(t, "pgmigrate_success"), Some(4313067));
        assert_eq!(parse_vmstat(t, "pgmigrate"), None);
        assert_eq!(
            parse_vmstat("pgmigrate_success x\n", "pgmigrate_success"),
            None
        );
    }

    #[test]
    fn mem_available_in_bytes() {
        let t = "MemTotal:  100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(parse_mem_available(t), Some(2 << 20));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }

    const SAMPLE: &str = "\
7f0000000000-7f0000200000 rw-s 00000000 00:10 5 /memfd:pool (deleted)
Size:               2048 kB
KernelPageSize:     2048 kB
Rss:                   0 kB
Private_Hugetlb:    2048 kB
Shared_Hugetlb:        0 kB
VmFlags: rd wr sh mr mw me ms de dd ht
7f0000200000-7f0000400000 rw-s 00000000 00:01 6 /memfd:thp (deleted)
Size:               2048 kB
KernelPageSize:        4 kB
Rss:                2048 kB
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
AnonHugePages:         0 kB
VmFlags: rd wr sh mr mw me ms hg
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
Rss:                   8 kB
";

    #[test]
    fn sums_only_vmas_inside_the_range() {
        let v = parse_smaps(SAMPLE, 0x7f00_0000_0000, 0x7f00_0040_0000).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].kernel_page_size, 2 << 20);
        assert!(v[0].dontdump && !v[1].dontdump);
        let t = sum(&v);
        assert_eq!(t.vmas, 2);
        assert_eq!(t.hugetlb(), 2 << 20);
        assert_eq!(t.shmem_pmd_mapped, 2 << 20);
        assert_eq!(t.rss, 2 << 20);
        let all = sum(&parse_smaps(SAMPLE, 0, u64::MAX).unwrap());
        assert_eq!(all.vmas, 3);
        assert_eq!(all.rss, (2 << 20) + 8192);
    }

    #[test]
    fn meminfo_parses_and_rejects_missing_hugetlb() {
        let m = parse_meminfo(
            "MemTotal: 1 kB\nHugePages_Total:    10\nHugePages_Free:  7\nHugePages_Rsvd: 2\nHugePages_Surp: 0\nHugepagesize: 2048 kB\n",
        )
        .unwrap();
        assert_eq!(
            (m.total, m.free, m.available(), m.page_size),
            (10, 7, 5, 2 << 20)
        );
        let e = parse_meminfo("MemTotal: 1 kB\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unexpected content in /proc/meminfo: no HugePages_* lines: the kernel has no hugetlb support"
        );
    }

    #[test]
    fn reads_live_meminfo() {
        let m = read_meminfo().unwrap();
        assert!(m.free <= m.total + m.surp);
    }
}
