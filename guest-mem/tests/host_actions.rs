//! Host actions on one frame through `GuestRam` (guest_mem::host_actions):
//! write protection in force only while the closure runs, page-out keeping
//! the contents, residency, each recorded as a host change of the frame;
//! frames outside RAM refused.

use guest_mem::{Backing, GuestMemError, GuestRam, GuestRamConfig, PageOut, HPAGE_SIZE};

const FRAMES: u64 = 4;

mod common;
#[path = "common/maps.rs"]
mod maps;

/// The access bits (`rw-`, `r--`) of the mapping holding `addr`.
fn perms(addr: u64) -> String {
    maps::perms(addr as usize)[..3].to_string()
}

fn ram(backing: Backing) -> GuestRam {
    let mut ram = GuestRam::new(&GuestRamConfig::new(FRAMES * HPAGE_SIZE, backing)).unwrap();
    ram.populate_all().unwrap();
    ram.take_changed_frames();
    ram
}

#[test]
fn write_protect_holds_only_while_the_closure_runs() {
    let mut ram = ram(Backing::Small4k);
    let addr = ram.host_addr() + 2 * HPAGE_SIZE;
    assert_eq!(perms(addr), "rw-");
    let inside = ram.write_protect_frame(2, || perms(addr)).unwrap();
    assert_eq!(inside, "r--");
    assert_eq!(perms(addr), "rw-");
    // The neighbours were never touched.
    assert_eq!(perms(addr - HPAGE_SIZE), "rw-");
    assert_eq!(ram.take_changed_frames(), vec![2]);
}

#[test]
fn page_out_keeps_the_contents_and_is_recorded() {
    let mut ram = ram(Backing::Small4k);
    let gpa = HPAGE_SIZE + 0x3000;
    let p = (ram.host_addr() + gpa) as *mut u8;
    // SAFETY: a populated RAM page of our own mapping; nothing else uses it.
    unsafe { p.write_volatile(0xa5) };
    assert_eq!(ram.resident_pages(1).unwrap(), 512);
    assert_eq!(ram.page_out_frame(1).unwrap(), PageOut::Done);
    assert_eq!(ram.take_changed_frames(), vec![1]);
    // SAFETY: as above; a paged-out shmem page faults back with its data.
    assert_eq!(unsafe { p.read_volatile() }, 0xa5);
}

#[test]
fn page_out_of_hugetlb_is_refused_not_an_error() {
    if !common::hugetlb_available(FRAMES) {
        return;
    }
    let mut ram = ram(Backing::Hugetlb);
    match ram.page_out_frame(0).unwrap() {
        PageOut::Refused(why) => assert!(why.contains("hugetlb"), "{why}"),
        PageOut::Done => panic!("MADV_PAGEOUT of a hugetlb frame was taken"),
    }
    assert!(ram.take_changed_frames().is_empty());
}

#[test]
fn frames_outside_ram_are_refused() {
    let mut ram = ram(Backing::Small4k);
    let e = ram.resident_pages(FRAMES as usize).unwrap_err();
    assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
    let e = ram.page_out_frame(FRAMES as usize + 7).unwrap_err();
    assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
    let e = ram.write_protect_frame(FRAMES as usize, || ()).unwrap_err();
    assert!(matches!(e, GuestMemError::RangeOutsideRam { .. }), "{e}");
    assert!(ram.take_changed_frames().is_empty());
}
