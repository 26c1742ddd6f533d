//! The vmclock page reader (`read_vmclock`) on arbitrary page contents:
//! never panic, and whatever it accepts is a structurally valid page.
//!
//! A static page whose `seq_count` is odd makes the reader retry
//! `SEQ_RETRIES` times with `yield_now` (correct for a live page, ~1 ms
//! here); so that those inputs do not dominate the run, the first input byte
//! chooses whether the low bit of `seq_count` is cleared (even byte) or the
//! page is used as is (odd byte): both paths stay covered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sysgenid_sources::vmclock::{
    offsets, read_vmclock, VmclockError, FLAG_VM_GEN_COUNTER_PRESENT, VMCLOCK_ABI_SIZE,
    VMCLOCK_MAGIC,
};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, page)) = data.split_first() else {
        return;
    };
    let mut page = page.to_vec();
    if mode & 1 == 0 && page.len() > offsets::SEQ_COUNT {
        page[offsets::SEQ_COUNT] &= !1;
    }
    match read_vmclock(&page) {
        Ok(snap) => {
            assert!(page.len() >= VMCLOCK_ABI_SIZE);
            let magic = u32::from_le_bytes(page[0..4].try_into().unwrap());
            assert_eq!(magic, VMCLOCK_MAGIC);
            assert!(snap.size as usize >= VMCLOCK_ABI_SIZE);
            assert_eq!(snap.seq_count & 1, 0);
            assert_eq!(
                snap.vm_generation_counter.is_some(),
                snap.flags & FLAG_VM_GEN_COUNTER_PRESENT != 0
            );
        }
        Err(VmclockError::TooShort { len }) => assert!(len < VMCLOCK_ABI_SIZE),
        Err(_) => {}
    }
});
