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
                details: BumpDetails::default(),
            }
        }),
        (
            any::<u32>(),
            any::<bool>(),
            0u8..3,
            proptest::option::of(32usize..=512),
            proptest::option::of("[a-z0-9]{1,20}(\\.[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?){0,3}")
        )
            .prop_map(
                |(min_generation, allow_exhaustion, kind, entropy, hostname)| {
                    Request::Bump {
                        min_generation,
                        allow_exhaustion,
                        details: BumpDetails {
                            kind: ChangeKind::from_code(kind).unwrap(),
                            entropy: entropy.map(|n| Entropy::new(vec![0xa5; n]).unwrap()),
                            hostname: hostname.map(|h| Hostname::new(&h).unwrap()),
                        },
                    }
                }
            ),
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

    #[test]
    fn arbitrary_bump_details_never_panic(
        flags in 0u8..4,
        tail in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let mut frame = vec![0x04, 1, 0, 0, 0, flags];
        frame.extend(tail);
        if let Ok(Request::Bump { details, .. }) = Request::decode(&frame) {
            // Whatever decodes is within the limits.
            prop_assert!(details.entropy.as_ref().is_none_or(|e| (32..=512).contains(&e.bytes().len())));
            prop_assert!(details.hostname.as_ref().is_none_or(|h| h.as_str().len() <= 64));
        }
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
            allow_exhaustion: false,
            details: BumpDetails::default(),
        })
    );
    let plain = Request::Bump {
        min_generation: 10,
        allow_exhaustion: false,
        details: BumpDetails::default(),
    };
    assert_eq!(plain.encode(), old_client, "no flag byte unless set");
    let forced = Request::Bump {
        min_generation: u32::MAX,
        allow_exhaustion: true,
        details: BumpDetails::default(),
    };
    assert_eq!(forced.encode(), [0x04, 0xff, 0xff, 0xff, 0xff, 1]);
    assert!(
        Request::decode(&[0x04, 0, 0, 0, 0, 4]).is_err(),
        "unknown bump flag"
    );
    assert!(
        Request::decode(&[0x04, 0, 0, 0, 0, 2]).is_err(),
        "details flag without details"
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

#[test]
fn bump_details_follow_flag_bit_1_and_are_checked() {
    let details = BumpDetails {
        kind: ChangeKind::Clone,
        entropy: Some(Entropy::new(vec![7; 32]).unwrap()),
        hostname: Some(Hostname::new("web-3.example").unwrap()),
    };
    let bump = Request::Bump {
        min_generation: 5,
        allow_exhaustion: false,
        details: details.clone(),
    };
    let f = bump.encode();
    // kind, u32, flags (bit 1), kind 1, u16 32, 32 bytes, u8 13, the name.
    assert_eq!(f.len(), 5 + 1 + 1 + 2 + 32 + 1 + 13);
    assert_eq!(&f[5..9], &[2, 1, 32, 0]);
    assert_eq!(Request::decode(&f), Ok(bump));
    // Only the kind: no entropy, no name.
    let kind_only = Request::Bump {
        min_generation: 0,
        allow_exhaustion: true,
        details: BumpDetails {
            kind: ChangeKind::Restore,
            ..BumpDetails::default()
        },
    };
    assert_eq!(kind_only.encode(), [0x04, 0, 0, 0, 0, 3, 2, 0, 0, 0]);
    assert_eq!(Request::decode(&kind_only.encode()), Ok(kind_only));
    // Every malformed variant is refused.
    let bad = |f: &[u8]| Request::decode(f).is_err();
    assert!(bad(&[0x04, 0, 0, 0, 0, 2, 3, 0, 0, 0]), "unknown kind");
    assert!(bad(&[0x04, 0, 0, 0, 0, 2, 1, 0, 0]), "cut short");
    assert!(bad(&[0x04, 0, 0, 0, 0, 2, 1, 0, 0, 0, 9]), "trailing byte");
    let mut short_entropy = vec![0x04, 0, 0, 0, 0, 2, 1, 31, 0];
    short_entropy.extend([1; 31]);
    short_entropy.push(0);
    assert!(bad(&short_entropy), "31 bytes of entropy");
    let mut long_entropy = vec![0x04, 0, 0, 0, 0, 2, 1, 0x01, 0x02];
    long_entropy.extend([1; 513]);
    long_entropy.push(0);
    assert!(bad(&long_entropy), "513 bytes of entropy");
    let mut bad_host = vec![0x04, 0, 0, 0, 0, 2, 1, 0, 0, 4];
    bad_host.extend(b"a_b!");
    assert!(bad(&bad_host), "not a hostname");
    // The largest details fit a frame.
    let largest = Request::Bump {
        min_generation: 0,
        allow_exhaustion: true,
        details: BumpDetails {
            kind: ChangeKind::Clone,
            entropy: Some(Entropy::new(vec![1; MAX_ENTROPY]).unwrap()),
            hostname: Some(
                Hostname::new(&format!("{}.{}", "a".repeat(31), "b".repeat(32))).unwrap(),
            ),
        },
    };
    assert!(largest.encode().len() <= MAX_FRAME);
    // Entropy never shows in a debug print.
    assert!(!format!("{details:?}").contains("7, 7"));
}

#[test]
fn hostnames_and_entropy_are_validated() {
    for good in ["a", "web-3", "a.b.c", "x1.example.org", &"a".repeat(63)] {
        assert!(Hostname::new(good).is_ok(), "{good}");
    }
    let long_label = "a".repeat(64);
    let long_name = format!("{}.{}", "a".repeat(40), "b".repeat(24));
    for bad in [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        "-a",
        "a-",
        "a_b",
        "a b",
        "é",
        &long_label,
        &long_name,
    ] {
        assert!(Hostname::new(bad).is_err(), "{bad}");
    }
    assert!(Entropy::new(vec![0; 31]).is_err());
    assert!(Entropy::new(vec![0; 32]).is_ok());
    assert!(Entropy::new(vec![0; 512]).is_ok());
    assert_eq!(
        Entropy::new(vec![0; 513]).unwrap_err().to_string(),
        "entropy must be 32 to 512 bytes, and this is 513 bytes"
    );
    assert_eq!("clone".parse::<ChangeKind>(), Ok(ChangeKind::Clone));
    assert!("fork".parse::<ChangeKind>().is_err());
}

#[test]
fn kind_and_rng_status_are_optional_both_ways() {
    let f = Reply::Status(StatusReport::default()).encode();
    let text = String::from_utf8_lossy(&f);
    assert!(text.contains("\"last_change_kind\":\"unknown\""));
    assert!(!text.contains("last_change_rng"));
    let report = StatusReport {
        last_change_kind: ChangeKind::Clone,
        last_change_rng: Some(RngStatus {
            reseeded: false,
            not_reseeded_because: Some("EPERM".into()),
            entropy_mixed: 0,
            ..RngStatus::default()
        }),
        ..StatusReport::default()
    };
    let f = Reply::Status(report.clone()).encode();
    assert_eq!(Reply::decode(&f).unwrap(), Reply::Status(report));
}
