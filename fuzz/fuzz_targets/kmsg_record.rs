//! The kernel-log record parser (`parse_record`) and the follower that
//! reassembles lines from a stream (`follow_reader`) on arbitrary bytes:
//! never panic, and only a facility-0 (kernel) record carrying the vmfork
//! text is a restore signal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sysgenid_sources::kmsg::{follow_reader, is_vmfork_record, parse_record, VMFORK_TEXT};

fuzz_target!(|data: &[u8]| {
    if let Ok(record) = parse_record(data) {
        if is_vmfork_record(&record) {
            assert_eq!(record.facility, 0);
            assert!(record.message.contains(VMFORK_TEXT));
        }
        assert!(record.level < 8);
    }
    // As a stream of records (a pipe or file rather than /dev/kmsg).
    let mut events = 0usize;
    let end = follow_reader(data, &mut |_| events += 1).expect("reading a slice cannot fail");
    let _ = end;
    // Every event needs a whole kernel record line with the text in it.
    let lines = data
        .split(|&b| b == b'\n')
        .filter(|l| {
            parse_record(l).is_ok_and(|r| is_vmfork_record(&r))
        })
        .count();
    assert!(events <= lines, "{events} events from {lines} vmfork lines");
});
