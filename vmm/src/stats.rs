//! KVM binary statistics (`KVM_GET_STATS_FD`, Documentation/virt/kvm/api.rst):
//! a header, descriptors (each followed by its name), and the data block.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use serde::Serialize;

/// The ioctl numbers kvm-ioctls has no wrapper for, encoded by vmm-sys-util
/// (a private module: the macro makes public functions without docs).
mod nr {
    use kvm_bindings::KVMIO;
    // `KVM_GET_STATS_FD` = `_IO(KVMIO, 0xce)` (include/uapi/linux/kvm.h).
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}
use nr::KVM_GET_STATS_FD;

/// Reading the statistics failed.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The ioctl is missing (kernel older than 5.14) or failed.
    #[error("KVM_GET_STATS_FD failed: {0} (needs Linux 5.14 or later)")]
    Ioctl(std::io::Error),
    /// Reading the stats file failed.
    #[error("reading the KVM stats file at offset {offset:#x} failed: {source}")]
    Read {
        /// Offset in the stats file.
        offset: u64,
        /// OS error.
        source: std::io::Error,
    },
    /// The header or a descriptor is inconsistent.
    #[error("malformed KVM stats data: {0}")]
    Malformed(String),
}

/// One VM's statistics file, opened once and read on demand.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    descs: Vec<Desc>,
    data_offset: u64,
}

#[derive(Debug, Clone)]
struct Desc {
    name: String,
    offset: u32,
    size: u16,
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> Result<(), StatsError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| StatsError::Read { offset, source })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(a)
}

impl KvmStats {
    /// Open the stats of the VM behind `vm_fd`.
    pub fn open(vm_fd: &impl AsRawFd) -> Result<KvmStats, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1;
        // `vm_fd` is a valid open KVM VM fd for the duration of the call.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vm_fd, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(StatsError::Ioctl(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut hb = [0u8; std::mem::size_of::<kvm_stats_header>()];
        read_at(&file, &mut hb, 0)?;
        let name_size = u32_at(&hb, 4) as usize;
        let num_desc = u32_at(&hb, 8) as usize;
        let desc_offset = u64::from(u32_at(&hb, 16));
        let data_offset = u64::from(u32_at(&hb, 20));
        if num_desc > 4096 || name_size == 0 || name_size > 4096 {
            return Err(StatsError::Malformed(format!(
                "num_desc {num_desc}, name_size {name_size}"
            )));
        }
        let dsize = std::mem::size_of::<kvm_stats_desc>() + name_size;
        let mut all = vec![0u8; dsize * num_desc];
        read_at(&file, &mut all, desc_offset)?;
        let descs = all
            .chunks_exact(dsize)
            .map(|d| {
                let raw_name = &d[16..];
                let end = raw_name
                    .iter()
                    .position(|&c| c == 0)
                    .unwrap_or(raw_name.len());
                Desc {
                    name: String::from_utf8_lossy(&raw_name[..end]).into_owned(),
                    size: u16::from_ne_bytes([d[6], d[7]]),
                    offset: u32_at(d, 8),
                }
            })
            .collect();
        Ok(KvmStats {
            file,
            descs,
            data_offset,
        })
    }

    /// Names of every statistic.
    pub fn names(&self) -> Vec<&str> {
        self.descs.iter().map(|d| d.name.as_str()).collect()
    }

    /// The current value of a scalar statistic (first element for arrays);
    /// `Ok(None)` when the kernel has no statistic of that name.
    pub fn get(&self, name: &str) -> Result<Option<u64>, StatsError> {
        let Some(d) = self.descs.iter().find(|d| d.name == name) else {
            return Ok(None);
        };
        if d.size == 0 {
            return Ok(None);
        }
        let mut b = [0u8; 8];
        read_at(&self.file, &mut b, self.data_offset + u64::from(d.offset))?;
        Ok(Some(u64::from_ne_bytes(b)))
    }

    /// Every scalar statistic by name.
    pub fn all(&self) -> Result<BTreeMap<String, u64>, StatsError> {
        let mut m = BTreeMap::new();
        for d in &self.descs {
            if let Some(v) = self.get(&d.name)? {
                m.insert(d.name.clone(), v);
            }
        }
        Ok(m)
    }

    /// KVM's page-mapping counters.
    pub fn mapping(&self) -> Result<MappingStats, StatsError> {
        Ok(MappingStats {
            pages_4k: self.get("pages_4k")?,
            pages_2m: self.get("pages_2m")?,
            pages_1g: self.get("pages_1g")?,
        })
    }
}

/// The counters KVM keeps of its secondary (EPT/NPT/shadow) mappings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MappingStats {
    /// 4K mappings (`None` when the kernel lacks the statistic).
    pub pages_4k: Option<u64>,
    /// 2M mappings.
    pub pages_2m: Option<u64>,
    /// 1G mappings.
    pub pages_1g: Option<u64>,
}

impl MappingStats {
    /// The counters to compare with the mirror, when KVM has `pages_4k` and
    /// `pages_2m` (a kernel without `pages_1g` maps nothing at 1G: 0).
    pub fn counts(&self) -> Option<crate::mirror::KvmCounts> {
        Some(crate::mirror::KvmCounts {
            pages_4k: self.pages_4k?,
            pages_2m: self.pages_2m?,
            pages_1g: self.pages_1g.unwrap_or(0),
        })
    }
}

/// KVM's mapping counters at one moment of a run ([`crate::run::run`] samples
/// them while the guest runs, every [`crate::run::KVM_SAMPLE_INTERVAL`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct KvmSample {
    /// Seconds since the vCPUs started.
    pub seconds: f64,
    /// The counters then.
    #[serde(flatten)]
    pub kvm: MappingStats,
}

/// The largest value of a counter over `samples` (`None` when no sample has it).
pub fn peak(samples: &[KvmSample], f: impl Fn(&MappingStats) -> Option<u64>) -> Option<u64> {
    samples.iter().filter_map(|s| f(&s.kvm)).max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_uapi() {
        assert_eq!(KVM_GET_STATS_FD(), 0xae_ce);
    }

    #[test]
    fn reads_named_statistics_of_a_real_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skip: /dev/kvm not usable");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let s = match KvmStats::open(&vm) {
            Ok(s) => s,
            Err(StatsError::Ioctl(e)) => {
                eprintln!("skip: KVM_GET_STATS_FD unsupported: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let names = s.names();
        assert!(names.contains(&"pages_4k"), "{names:?}");
        assert!(names.contains(&"pages_2m"), "{names:?}");
        // A VM without memory maps nothing.
        let m = s.mapping().unwrap();
        assert_eq!(m.pages_4k, Some(0));
        assert_eq!(m.pages_2m, Some(0));
        assert_eq!(s.get("no_such_statistic").unwrap(), None);
        assert!(s.all().unwrap().contains_key("pages_4k"));
    }
}
