//! `/proc/self/maps` for tests (shared by the integration tests and the
//! unit tests of `host_actions`, which include this file by path).

/// The permission string (`rw-p`, `r--s`, ...) of the mapping that contains
/// `addr` in /proc/self/maps.
pub fn perms(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines() {
        let (range, rest) = l.split_once(' ').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            usize::from_str_radix(a, 16).unwrap(),
            usize::from_str_radix(b, 16).unwrap(),
        );
        if (a..b).contains(&addr) {
            return rest[..4].to_string();
        }
    }
    panic!("{addr:#x} is not mapped");
}
