//! The uevent parser and classifier on arbitrary datagrams: never panic;
//! only a datagram from the kernel (netlink port 0, credentials pid 0) can
//! be a restore signal, and only if it is a NEW_VMGENID change event.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sysgenid_sources::uevent::{classify, is_new_vmgenid, parse_uevent, Ignored, Received};

fuzz_target!(|data: &[u8]| {
    let parsed = parse_uevent(data);
    match classify(data, Some(0), Some(0)) {
        Received::NewVmgenid(ev) => {
            assert!(is_new_vmgenid(&ev));
            assert_eq!(parsed.as_ref(), Some(&ev));
        }
        Received::Ignored(Ignored::Unrelated) => {
            assert!(parsed.is_some_and(|ev| !is_new_vmgenid(&ev)))
        }
        Received::Ignored(Ignored::NotFromKernel { .. }) | Received::Overrun => {
            panic!("kernel-sent datagram misclassified")
        }
        Received::Ignored(_) => {}
    }
    // From a process (any non-zero port id or pid): never a restore signal.
    let port = data.first().map_or(1, |&b| u32::from(b) + 1);
    assert!(matches!(
        classify(data, Some(port), None),
        Received::Ignored(Ignored::NotFromKernel { .. })
    ));
    assert!(matches!(
        classify(data, Some(0), Some(i32::from(port as u8) + 1)),
        Received::Ignored(Ignored::NotFromKernel { .. })
    ));
    assert!(matches!(
        classify(data, None, Some(0)),
        Received::Ignored(Ignored::NotFromKernel { .. })
    ));
});
