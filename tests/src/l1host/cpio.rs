//! A writer of uncompressed cpio "newc" archives: the batch archive the driver
//! appends to the L1 base initramfs (the kernel unpacks concatenated archives).

use std::io::{self, Write};

/// Mode bits of a regular file / directory / symbolic link.
const S_IFREG: u32 = 0o100_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFLNK: u32 = 0o120_000;

/// An archive being written into memory.
#[derive(Debug, Default)]
pub struct Archive {
    buf: Vec<u8>,
    ino: u32,
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        let header = format!(
            "070701{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}{:08X}",
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0,
            0, // dev major/minor
            0,
            0, // rdev major/minor
            namesize,
            0, // check
        );
        self.buf.extend_from_slice(header.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// A directory (parents are not created implicitly).
    pub fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, &[]);
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (perm & 0o7777), data);
    }

    /// A symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, target.as_bytes());
    }

    /// Close the archive (trailer) and write it out.
    pub fn finish(mut self, out: &mut impl Write) -> io::Result<()> {
        self.entry("TRAILER!!!", 0, &[]);
        out.write_all(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_headers_are_padded_to_four_bytes() {
        let mut a = Archive::new();
        a.dir("batch");
        a.file("batch/run.sh", 0o755, b"echo hi\n");
        a.symlink("bin/x", "vmm");
        let mut out = Vec::new();
        a.finish(&mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("batch/run.sh\0"));
        assert!(text.contains("echo hi\n"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's header: mode 0100755, size 8, name size 13.
        let at = text.find("batch/run.sh").unwrap() - 110;
        let hdr = &text[at..at + 110];
        assert_eq!(&hdr[14..22], "000081ED");
        assert_eq!(&hdr[54..62], "00000008");
        assert_eq!(&hdr[94..102], "0000000D");
    }
}
