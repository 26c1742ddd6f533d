//! The wire protocol decoders (`Request::decode`, `Reply::decode`,
//! `Request::peek_hello_version`) on arbitrary frames: never panic, and
//! whatever decodes re-encodes to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sysgenid_proto::{Reply, Request, MAX_FRAME};

fuzz_target!(|frame: &[u8]| {
    let _ = Request::peek_hello_version(frame);
    if let Ok(request) = Request::decode(frame) {
        assert!(frame.len() <= MAX_FRAME);
        let again = Request::decode(&request.encode()).expect("re-encoded request decodes");
        assert_eq!(again, request);
    }
    if let Ok(reply) = Reply::decode(frame) {
        assert!(frame.len() <= MAX_FRAME);
        let again = Reply::decode(&reply.encode()).expect("re-encoded reply decodes");
        match (&reply, &again) {
            // Messages are cut to fit a frame when encoded (lossy UTF-8
            // decoding can make them longer than the frame they came in).
            (Reply::Error(a), Reply::Error(b)) => {
                assert_eq!((a.code, a.value), (b.code, b.value));
                assert!(a.message.starts_with(&b.message));
            }
            _ => assert_eq!(again, reply),
        }
    }
});
