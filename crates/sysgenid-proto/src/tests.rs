use super::*;
use proptest::prelude::*;

fn role(version: u16) -> impl Strategy<Value = Role> {
    // The lifecycle flag exists from version 2 on.
    let lifecycle = if version >= LIFECYCLE_VERSION {
        any::<bool>().boxed()
    } else {
        Just(false).boxed()
    };
    prop_oneof![
        Just(Role::Control),
        (any::<bool>(), any::<Option<u32>>(), lifecycle).prop_map(
            |(untracked, acked, lifecycle)| Role::Watcher {
                untracked,
                acked,
                lifecycle
            }
        ),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<u16>()
            .prop_flat_map(|version| (Just(version), role(version)))
            .prop_map(|(version, role)| Request::Hello { version, role }),
        any::<u32>().prop_map(|timeout_ms| Request::Freeze { timeout_ms }),
        Just(Request::Thaw),
        any::<u32>().prop_map(|freeze| Request::Confirm { freeze }),
        any::<u32>().prop_map(|generation| Request::Ack { generation }),
        any::<u32>().prop_map(|timeout_ms| Request::WaitWatchers { timeout_ms }),
        (any::<u32>(), any::<bool>()).prop_map(|(min_generation, allow_exhaustion)| {
            Request::Bump {
                min_generation,
                allow_exhaustion,
            }
        }),
        Just(Request::Status),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=15).prop_map(|c| ErrorCode::from_u16(c).unwrap())
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u16>(), any::<u32>()).prop_map(|(version, generation)| Reply::Welcome {
            version,
            generation
        }),
        any::<u32>().prop_map(|generation| Reply::Changed { generation }),
        any::<u32>().prop_map(|generation| Reply::Done { generation }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(freeze, generation)| Reply::Freeze { freeze, generation }),
        (any::<u32>(), any::<u32>())
            .prop_map(|(freeze, generation)| Reply::Thaw { freeze, generation }),
        (any::<u32>(), ".{0,40}", any::<u32>()).prop_map(|(generation, epoch, watchers)| {
            Reply::Status(StatusReport {
                generation,
                epoch,
                watchers,
                ..StatusReport::default()
            })
        }),
        (error_code(), any::<u32>(), ".{0,60}").prop_map(|(code, value, message)| Reply::Error(
            ErrorReply {
                code,
                value,
                message
            }
        )),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(r in request()) {
        prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn replies_round_trip(r in reply()) {
        prop_assert_eq!(Reply::decode(&r.encode()), Ok(r));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = Request::decode(&bytes);
        let _ = Reply::decode(&bytes);
    }
}

#[test]
fn hello_layout_is_frozen() {
    let f = Request::Hello {
        version: 1,
        role: Role::Watcher {
            untracked: true,
            acked: Some(7),
            lifecycle: false,
        },
    }
    .encode();
    assert_eq!(f, [0x01, 1, 0, 1, 0b11, 7, 0, 0, 0]);
    assert_eq!(Request::peek_hello_version(&f), Some(1));
    // A future client's longer Hello still shows its version.
    let future = [0x01, 9, 0, 1, 0, 0, 0, 0, 0, 0xaa, 0xbb];
    assert_eq!(Request::peek_hello_version(&future), Some(9));
    assert!(Request::decode(&future).is_err());
}

#[test]
fn lifecycle_frames_have_their_documented_layout() {
    let participant = Request::Hello {
        version: 2,
        role: Role::Watcher {
            untracked: false,
            acked: None,
            lifecycle: true,
        },
    };
    assert_eq!(participant.encode(), [0x01, 2, 0, 1, 0b100, 0, 0, 0, 0]);
    assert!(
        Request::decode(&[0x01, 1, 0, 1, 0b100, 0, 0, 0, 0]).is_err(),
        "a version 1 Hello has no lifecycle flag"
    );
    assert_eq!(
        Request::Freeze { timeout_ms: 500 }.encode(),
        [0x06, 0xf4, 1, 0, 0]
    );
    assert_eq!(Request::Thaw.encode(), [0x07]);
    assert_eq!(Request::Confirm { freeze: 3 }.encode(), [0x08, 3, 0, 0, 0]);
    assert_eq!(
        Reply::Freeze {
            freeze: 3,
            generation: 1
        }
        .encode(),
        [0x85, 3, 0, 0, 0, 1, 0, 0, 0]
    );
    assert_eq!(
        Reply::Thaw {
            freeze: 3,
            generation: 1
        }
        .encode(),
        [0x86, 3, 0, 0, 0, 1, 0, 0, 0]
    );
    assert!(Request::Thaw.needs_lifecycle_version());
    assert!(!Request::Status.needs_lifecycle_version());
}

#[test]
fn a_version_1_status_reads_as_running() {
    let old = br#"{"generation":4,"epoch":"00","watchers":0,"tracked":0,"outdated":0,"outdated_untracked":0,"uptime_ms":1,"last_change_unix_ms":null,"last_change_sources":[],"sources":[],"runtime_dir":"/r","device":null,"daemon_version":"0.1.0"}"#;
    let mut frame = vec![0x84];
    frame.extend_from_slice(old);
    match Reply::decode(&frame).unwrap() {
        Reply::Status(s) => {
            assert_eq!((s.generation, s.state), (4, LifecycleState::Running));
            assert_eq!(s.hooks, None);
        }
        other => panic!("{other:?}"),
    }
    let json = serde_json::to_value(StatusReport {
        state: LifecycleState::Freezing,
        ..StatusReport::default()
    })
    .unwrap();
    assert_eq!(json["state"], "freezing");
}

#[test]
fn error_layout_is_frozen() {
    let f = Reply::Error(ErrorReply {
        code: ErrorCode::VersionMismatch,
        value: 1,
        message: "no".into(),
    })
    .encode();
    assert_eq!(f, [0xff, 6, 0, 1, 0, 0, 0, b'n', b'o']);
}

#[test]
fn bad_frames_are_refused_with_reasons() {
    assert_eq!(Request::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(
        Request::decode(&[0x42]),
        Err(DecodeError::UnknownKind(0x42))
    );
    assert_eq!(
        Request::decode(&[0x02, 1, 2]),
        Err(DecodeError::BadLength {
            kind: 2,
            len: 3,
            expected: 5
        })
    );
    assert_eq!(
        Request::decode(&vec![0x05; MAX_FRAME + 1]),
        Err(DecodeError::TooLong(MAX_FRAME + 1))
    );
    assert!(
        Request::decode(&[0x01, 1, 0, 0, 1, 0, 0, 0, 0]).is_err(),
        "control with flags"
    );
    assert!(
        Request::decode(&[0x01, 1, 0, 1, 0x80, 0, 0, 0, 0]).is_err(),
        "unknown flag"
    );
}

#[test]
fn long_error_messages_are_cut_on_a_char_boundary() {
    let message = "é".repeat(MAX_FRAME);
    let f = Reply::Error(ErrorReply {
        code: ErrorCode::Internal,
        value: 0,
        message,
    })
    .encode();
    assert!(f.len() <= MAX_FRAME);
    match Reply::decode(&f).unwrap() {
        Reply::Error(e) => assert!(e.message.chars().all(|c| c == 'é')),
        other => panic!("{other:?}"),
    }
}

#[test]
fn errnos_match_the_kernel() {
    assert_eq!(ErrorCode::WrongGeneration.errno(), libc_like::EINVAL);
    assert_eq!(ErrorCode::Interrupted.errno(), libc_like::EINTR);
    assert_eq!(ErrorCode::TimedOut.errno(), libc_like::ETIMEDOUT);
    assert_eq!(ErrorCode::PermissionDenied.errno(), libc_like::EACCES);
    assert_eq!(ErrorCode::Overflow.errno(), libc_like::EOVERFLOW);
}

/// x86-64 / aarch64 Linux values, written out so this crate needs no libc.
mod libc_like {
    pub const EINTR: i32 = 4;
    pub const EACCES: i32 = 13;
    pub const EINVAL: i32 = 22;
    pub const EOVERFLOW: i32 = 75;
    pub const ETIMEDOUT: i32 = 110;
}

#[test]
fn oversized_status_reports_are_shortened_to_fit_one_frame() {
    let long = "x".repeat(3000);
    let report = StatusReport {
        generation: 42,
        watchers: 7,
        runtime_dir: long.clone(),
        device: Some(long.clone()),
        sources: (0..4)
            .map(|i| SourceStatus {
                name: format!("s{i}"),
                detail: long.clone(),
                events: i,
                ..SourceStatus::default()
            })
            .collect(),
        ..StatusReport::default()
    };
    let f = Reply::Status(report).encode();
    assert!(f.len() <= MAX_FRAME, "{} bytes", f.len());
    match Reply::decode(&f).unwrap() {
        Reply::Status(s) => {
            assert_eq!((s.generation, s.watchers, s.sources.len()), (42, 7, 4));
            assert_eq!(s.sources[3].events, 3, "numbers are kept");
            assert!(s.runtime_dir.ends_with("..."));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bump_flag_byte_is_optional_and_checked() {
    let old_client = [0x04, 10, 0, 0, 0];
    assert_eq!(
        Request::decode(&old_client),
        Ok(Request::Bump {
            min_generation: 10,
            allow_exhaustion: false
        })
    );
    let plain = Request::Bump {
        min_generation: 10,
        allow_exhaustion: false,
    };
    assert_eq!(plain.encode(), old_client, "no flag byte unless set");
    let forced = Request::Bump {
        min_generation: u32::MAX,
        allow_exhaustion: true,
    };
    assert_eq!(forced.encode(), [0x04, 0xff, 0xff, 0xff, 0xff, 1]);
    assert!(
        Request::decode(&[0x04, 0, 0, 0, 0, 2]).is_err(),
        "unknown bump flag"
    );
    assert!(Request::decode(&[0x04, 0, 0, 0, 0, 1, 0]).is_err());
    assert!(is_privileged_kind(forced.encode()[0]));
    assert!(!is_privileged_kind(Request::Status.encode()[0]));
}

#[test]
fn last_kernel_lag_us_is_optional_both_ways() {
    // A report from a daemon that predates the field decodes with None.
    let mut old = vec![codes::STATUS_REPORT];
    old.extend_from_slice(
        br#"{"generation":3,"epoch":"00","watchers":0,"tracked":0,"outdated":0,
        "outdated_untracked":0,"uptime_ms":1,"last_change_unix_ms":null,
        "last_change_sources":[],"sources":[],"runtime_dir":"/r","device":null,
        "daemon_version":"0.1.0"}"#,
    );
    match Reply::decode(&old).unwrap() {
        Reply::Status(s) => {
            assert_eq!(s.generation, 3);
            assert_eq!(s.last_kernel_lag_us, None);
        }
        other => panic!("{other:?}"),
    }
    // Without a value the key is not sent at all (what older clients saw).
    let f = Reply::Status(StatusReport::default()).encode();
    assert!(!String::from_utf8_lossy(&f).contains("last_kernel_lag_us"));
    // With one it round-trips.
    let report = StatusReport {
        last_kernel_lag_us: Some(1234),
        ..StatusReport::default()
    };
    let f = Reply::Status(report.clone()).encode();
    assert!(String::from_utf8_lossy(&f).contains("\"last_kernel_lag_us\":1234"));
    assert_eq!(Reply::decode(&f).unwrap(), Reply::Status(report));
    // A newer daemon's unknown keys are ignored by this client.
    let mut newer = f.clone();
    newer.pop();
    newer.extend_from_slice(br#","a_field_from_the_future":[1,2]}"#);
    assert!(matches!(Reply::decode(&newer).unwrap(), Reply::Status(_)));
}
