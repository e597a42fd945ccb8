//! The balloon statistics queue payload: packed `{ le16 tag; le64 val; }`
//! entries (virtio 1.x 5.5.6.3).

use std::collections::BTreeMap;

/// Size of one `virtio_balloon_stat` entry.
pub const STAT_ENTRY_SIZE: usize = 10;

/// Statistic tags (VIRTIO_BALLOON_S_*).
pub mod tag {
    /// Bytes swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Bytes swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJFLT: u16 = 2;
    /// Minor page faults.
    pub const MINFLT: u16 = 3;
    /// Free memory in bytes.
    pub const MEMFREE: u16 = 4;
    /// Total memory in bytes.
    pub const MEMTOT: u16 = 5;
    /// Available memory in bytes (as in /proc/meminfo).
    pub const AVAIL: u16 = 6;
    /// Disk caches in bytes.
    pub const CACHES: u16 = 7;
    /// Successful hugetlb page allocations.
    pub const HTLB_PGALLOC: u16 = 8;
    /// Failed hugetlb page allocations.
    pub const HTLB_PGFAIL: u16 = 9;
}

/// Name of a statistic tag, for logs and `vmm ctl` output.
pub fn tag_name(t: u16) -> &'static str {
    match t {
        tag::SWAP_IN => "swap-in",
        tag::SWAP_OUT => "swap-out",
        tag::MAJFLT => "major-faults",
        tag::MINFLT => "minor-faults",
        tag::MEMFREE => "free-memory",
        tag::MEMTOT => "total-memory",
        tag::AVAIL => "available-memory",
        tag::CACHES => "disk-caches",
        tag::HTLB_PGALLOC => "hugetlb-allocations",
        tag::HTLB_PGFAIL => "hugetlb-failures",
        _ => "unknown",
    }
}

/// The last statistics the guest reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Last value per tag (unknown tags kept as reported).
    pub values: BTreeMap<u16, u64>,
    /// Number of stats buffers received.
    pub updates: u64,
}

impl BalloonStats {
    /// Last value of `tag`, if the guest ever reported it.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.values.get(&tag).copied()
    }

    /// Merge one buffer of entries; returns how many trailing bytes did not
    /// form a whole entry.
    pub fn update(&mut self, buf: &[u8]) -> usize {
        let mut chunks = buf.chunks_exact(STAT_ENTRY_SIZE);
        for e in &mut chunks {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut val = [0u8; 8];
            val.copy_from_slice(&e[2..10]);
            self.values.insert(tag, u64::from_le_bytes(val));
        }
        self.updates += 1;
        chunks.remainder().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_entries_and_keeps_last_values() {
        let mut s = BalloonStats::default();
        let mut buf = Vec::new();
        for (t, v) in [(tag::MEMFREE, 1u64 << 30), (tag::MEMTOT, 2 << 30), (99, 7)] {
            buf.extend_from_slice(&t.to_le_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
        }
        buf.push(0xaa);
        assert_eq!(s.update(&buf), 1);
        assert_eq!(s.get(tag::MEMFREE), Some(1 << 30));
        assert_eq!(s.get(99), Some(7));
        assert_eq!(s.get(tag::SWAP_IN), None);
        let mut again = Vec::new();
        again.extend_from_slice(&tag::MEMFREE.to_le_bytes());
        again.extend_from_slice(&5u64.to_le_bytes());
        assert_eq!(s.update(&again), 0);
        assert_eq!(s.get(tag::MEMFREE), Some(5));
        assert_eq!(s.get(tag::MEMTOT), Some(2 << 30));
        assert_eq!(s.updates, 2);
        assert_eq!(tag_name(tag::AVAIL), "available-memory");
    }
}
