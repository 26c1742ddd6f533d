//! The host channel's line protocol: what a hypervisor host says to the
//! daemon in its guest over vsock (`sysgenidd --host-channel vsock:PORT`),
//! and what it hears back. Shared by the daemon and the host-side client
//! (`sysgenid::host_channel`, `sysgenidctl --host-channel`), so both agree
//! by construction; the prose version, with examples for Go, Python and
//! `socat`, is `docs/protocol.md` ("The host channel").
//!
//! One JSON object per line (`\n`-terminated, at most [`HOST_MAX_LINE`]
//! bytes) in each direction, one request at a time per connection: each
//! request gets exactly one reply line, in order. Unlike the local socket
//! there is no `Hello` and no unsolicited line: orchestrators written in
//! any language (or a shell with `socat`) can speak it with a JSON library
//! and a line reader. Error names are the local socket's [`ErrorCode`]s,
//! so exit codes mean the same on both.

use serde::{Deserialize, Serialize};

use crate::{BumpDetails, ChangeKind, Entropy, ErrorCode, Hostname, StatusReport};

/// The longest line either side sends or accepts, newline included. A
/// request line longer than this is refused and its connection closed
/// (the framing is lost).
pub const HOST_MAX_LINE: usize = 4096;

/// The vsock address of the host (`VMADDR_CID_HOST`): the only peer the
/// guest's daemon serves.
pub const VMADDR_CID_HOST: u32 = 2;

/// The operations, as spelled on the wire (for error messages and docs).
pub const HOST_OPERATIONS: [&str; 6] = [
    "restored",
    "freeze",
    "thaw",
    "wait-watchers",
    "status",
    "get",
];

/// What kind of restore the host reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RestoreKind {
    /// The same machine resumed from its own snapshot.
    #[default]
    Restore,
    /// One of possibly many copies started from a shared snapshot.
    Clone,
}

impl RestoreKind {
    /// The name on the wire (and in `SYSGENID_KIND`).
    pub fn name(self) -> &'static str {
        self.change_kind().name()
    }

    /// The kind of change the daemon records (status, hooks).
    pub fn change_kind(self) -> ChangeKind {
        match self {
            RestoreKind::Restore => ChangeKind::Restore,
            RestoreKind::Clone => ChangeKind::Clone,
        }
    }

    /// Back from the recorded kind (`unknown` never comes from the host).
    pub fn from_change_kind(kind: ChangeKind) -> RestoreKind {
        match kind {
            ChangeKind::Clone => RestoreKind::Clone,
            ChangeKind::Restore | ChangeKind::Unknown => RestoreKind::Restore,
        }
    }
}

/// A request line from the host. Operations without fields are written
/// as empty struct variants (`Thaw {}`) so that unknown fields are refused
/// for them too (serde ignores them on unit variants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum HostRequest {
    /// The guest was restored or cloned: bump the generation (source
    /// `host`), after mixing in the host's entropy and reseeding the
    /// kernel's random generator.
    Restored {
        /// Restore or clone (default: restore).
        #[serde(default)]
        kind: RestoreKind,
        /// Host entropy, 32 to 512 bytes, as hex (or use `entropy_base64`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entropy_hex: Option<String>,
        /// Host entropy, 32 to 512 bytes, as standard base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        entropy_base64: Option<String>,
        /// The host name this change gives the guest (a clone's own
        /// name), handed to the hooks as `SYSGENID_HOSTNAME`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hostname: Option<String>,
    },
    /// Freeze every lifecycle participant; answered once frozen or when
    /// the freeze is aborted.
    Freeze {
        /// Milliseconds; 0 or absent: the daemon's default (30 000).
        #[serde(default)]
        timeout_ms: u32,
    },
    /// Thaw (also when not frozen).
    Thaw {},
    /// Wait until every tracked watcher has acknowledged the current
    /// generation and the hooks' `change` run has finished.
    WaitWatchers {
        /// Milliseconds; 0 or absent waits forever.
        #[serde(default)]
        timeout_ms: u32,
    },
    /// The daemon's status report.
    Status {},
    /// The current generation.
    Get {},
}

/// Why a request line could not be understood. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostDecodeError {
    /// Not JSON, or not an object.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// No `op` field, or not a string.
    #[error("malformed request: no \"op\" string (one of: {})", HOST_OPERATIONS.join(", "))]
    NoOperation,
    /// An `op` this daemon does not know.
    #[error("unknown operation {0:?} (known: {known})", known = HOST_OPERATIONS.join(", "))]
    UnknownOperation(String),
    /// A field is missing, unknown or of the wrong type.
    #[error("malformed {op:?} request: {why}")]
    BadFields {
        /// The operation.
        op: String,
        /// What serde said.
        why: String,
    },
    /// The entropy is not hex/base64, or not 32 to 512 bytes
    /// (`crate::MIN_ENTROPY`, `crate::MAX_ENTROPY`).
    #[error("{0}")]
    BadEntropy(String),
    /// The host name is not a valid host name.
    #[error("{0}")]
    BadHostname(String),
}

impl HostRequest {
    /// Parses one request line (without its newline), checking its fields
    /// (entropy size and encoding, host name).
    pub fn decode(line: &[u8]) -> Result<HostRequest, HostDecodeError> {
        let value: serde_json::Value =
            serde_json::from_slice(line).map_err(|e| HostDecodeError::Malformed(e.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(HostDecodeError::Malformed("not a JSON object".into()));
        };
        let Some(op) = object.get("op").and_then(|v| v.as_str()) else {
            return Err(HostDecodeError::NoOperation);
        };
        if !HOST_OPERATIONS.contains(&op) {
            return Err(HostDecodeError::UnknownOperation(clipped(op)));
        }
        let op = op.to_string();
        let request: HostRequest =
            serde_json::from_value(value).map_err(|e| HostDecodeError::BadFields {
                op,
                why: e.to_string(),
            })?;
        request.details()?;
        Ok(request)
    }

    /// The request as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a request always serializes");
        line.push(b'\n');
        line
    }

    /// What a `restored` says of the change, checked: its kind, its
    /// entropy (32 to 512 bytes) and its host name. Other requests: the
    /// defaults.
    pub fn details(&self) -> Result<BumpDetails, HostDecodeError> {
        let HostRequest::Restored { kind, hostname, .. } = self else {
            return Ok(BumpDetails::default());
        };
        let entropy = match self.entropy()? {
            Some(bytes) => {
                Some(Entropy::new(bytes).map_err(|e| HostDecodeError::BadEntropy(e.to_string()))?)
            }
            None => None,
        };
        let hostname = match hostname {
            Some(name) => {
                Some(Hostname::new(name).map_err(|e| HostDecodeError::BadHostname(e.to_string()))?)
            }
            None => None,
        };
        Ok(BumpDetails {
            kind: kind.change_kind(),
            entropy,
            hostname,
        })
    }

    /// The decoded entropy of a `restored` (`None`: none sent), unchecked
    /// in length ([`details`](Self::details) checks it).
    fn entropy(&self) -> Result<Option<Vec<u8>>, HostDecodeError> {
        let HostRequest::Restored {
            entropy_hex,
            entropy_base64,
            ..
        } = self
        else {
            return Ok(None);
        };
        let bytes = match (entropy_hex, entropy_base64) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(HostDecodeError::BadEntropy(
                    "send entropy_hex or entropy_base64, not both".into(),
                ))
            }
            (Some(hex), None) => decode_hex(hex).ok_or_else(|| {
                HostDecodeError::BadEntropy(
                    "entropy_hex is not an even number of hex digits".into(),
                )
            })?,
            (None, Some(b64)) => {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| {
                        HostDecodeError::BadEntropy(format!("entropy_base64 is not base64: {e}"))
                    })?
            }
        };
        Ok(Some(bytes))
    }
}

/// Lower-case hex of `bytes`.
pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}

/// At most 64 characters of a peer's text, for messages.
fn clipped(text: &str) -> String {
    text.chars().take(64).collect()
}

/// What a `restored` did, in its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RestoredReport {
    /// The kind the host reported.
    pub kind: RestoreKind,
    /// The restore was already signalled (by the kernel, within the
    /// coalescing window): no second bump; the generation is that
    /// restore's.
    pub coalesced: bool,
    /// Bytes of host entropy mixed into the kernel's pool (0: none sent).
    pub entropy_bytes: usize,
    /// Whether the kernel's random generator was forced to reseed.
    pub kernel_reseeded: bool,
    /// Why not, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_reseed_error: Option<String>,
    /// The host name this change carries (hooks get it as
    /// `SYSGENID_HOSTNAME`), if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// A reply line from the daemon: `ok` and the generation, or `ok: false`
/// with the error's name, number and message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostReply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The generation in force when it completed (every success).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u32>,
    /// The error's name (a local socket [`ErrorCode`]), when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorCode>,
    /// The number whose meaning the error code defines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<u32>,
    /// A sentence for humans, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// What a `restored` did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored: Option<RestoredReport>,
    /// A `status`'s report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Box<StatusReport>>,
}

impl HostReply {
    /// A success with the generation.
    pub fn done(generation: u32) -> HostReply {
        HostReply {
            ok: true,
            generation: Some(generation),
            ..HostReply::default()
        }
    }

    /// A refusal; nothing changed.
    pub fn error(code: ErrorCode, value: u32, message: impl Into<String>) -> HostReply {
        HostReply {
            ok: false,
            error: Some(code),
            value: Some(value),
            message: Some(message.into()),
            ..HostReply::default()
        }
    }

    /// The reply as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("a reply always serializes");
        line.push(b'\n');
        line
    }

    /// Parses one reply line (without its newline).
    pub fn decode(line: &[u8]) -> Result<HostReply, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_defaults_apply() {
        for r in [
            HostRequest::Restored {
                kind: RestoreKind::Clone,
                entropy_hex: Some("ab".repeat(32)),
                entropy_base64: None,
                hostname: Some("vm-2".into()),
            },
            HostRequest::Freeze { timeout_ms: 5 },
            HostRequest::Thaw {},
            HostRequest::WaitWatchers { timeout_ms: 0 },
            HostRequest::Status {},
            HostRequest::Get {},
        ] {
            let line = r.encode();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(HostRequest::decode(&line[..line.len() - 1]), Ok(r));
        }
        assert_eq!(
            HostRequest::decode(br#"{"op":"restored"}"#),
            Ok(HostRequest::Restored {
                kind: RestoreKind::Restore,
                entropy_hex: None,
                entropy_base64: None,
                hostname: None
            })
        );
        assert_eq!(
            HostRequest::decode(br#"{"op":"freeze"}"#),
            Ok(HostRequest::Freeze { timeout_ms: 0 })
        );
    }

    #[test]
    fn bad_lines_are_named() {
        assert!(matches!(
            HostRequest::decode(b"{not json"),
            Err(HostDecodeError::Malformed(_))
        ));
        assert!(matches!(
            HostRequest::decode(b"[1]"),
            Err(HostDecodeError::Malformed(_))
        ));
        assert_eq!(
            HostRequest::decode(br#"{"kind":"clone"}"#),
            Err(HostDecodeError::NoOperation)
        );
        assert_eq!(
            HostRequest::decode(br#"{"op":"bump"}"#),
            Err(HostDecodeError::UnknownOperation("bump".into()))
        );
        assert!(matches!(
            HostRequest::decode(br#"{"op":"freeze","timeout_ms":"soon"}"#),
            Err(HostDecodeError::BadFields { .. })
        ));
        assert!(matches!(
            HostRequest::decode(br#"{"op":"thaw","force":true}"#),
            Err(HostDecodeError::BadFields { .. })
        ));
        assert!(matches!(
            HostRequest::decode(br#"{"op":"restored","kind":"fork"}"#),
            Err(HostDecodeError::BadFields { .. })
        ));
    }

    #[test]
    fn entropy_must_be_32_to_512_bytes_in_one_encoding() {
        let line =
            |field: &str, value: String| format!(r#"{{"op":"restored","{field}":"{value}"}}"#);
        assert!(HostRequest::decode(line("entropy_hex", "00".repeat(31)).as_bytes()).is_err());
        assert!(HostRequest::decode(line("entropy_hex", "00".repeat(513)).as_bytes()).is_err());
        assert!(HostRequest::decode(line("entropy_hex", "0".repeat(65)).as_bytes()).is_err());
        assert!(HostRequest::decode(line("entropy_hex", "zz".repeat(32)).as_bytes()).is_err());
        let r = HostRequest::decode(line("entropy_hex", "0f".repeat(32)).as_bytes()).unwrap();
        let d = r.details().unwrap();
        assert_eq!(d.entropy.unwrap().bytes(), &[0x0f; 32][..]);
        // 33 bytes of 0xff in base64.
        let b64 = "/".repeat(44);
        let r = HostRequest::decode(line("entropy_base64", b64).as_bytes()).unwrap();
        assert_eq!(
            r.details().unwrap().entropy.unwrap().bytes(),
            &[0xff; 33][..]
        );
        assert!(HostRequest::decode(line("entropy_base64", "!!!!".into()).as_bytes()).is_err());
        let both = format!(
            r#"{{"op":"restored","entropy_hex":"{}","entropy_base64":"{}"}}"#,
            "00".repeat(32),
            "A".repeat(44)
        );
        assert!(HostRequest::decode(both.as_bytes()).is_err());
    }

    #[test]
    fn host_names_are_checked_and_kinds_map() {
        let ok = br#"{"op":"restored","kind":"clone","hostname":"vm-2.example"}"#;
        let d = HostRequest::decode(ok).unwrap().details().unwrap();
        assert_eq!(d.kind, ChangeKind::Clone);
        assert_eq!(d.hostname.unwrap().as_str(), "vm-2.example");
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            let line = format!(r#"{{"op":"restored","hostname":"{bad}"}}"#);
            assert!(
                matches!(
                    HostRequest::decode(line.as_bytes()),
                    Err(HostDecodeError::BadHostname(_))
                ),
                "{bad:?}"
            );
        }
        let d = HostRequest::decode(br#"{"op":"restored"}"#)
            .unwrap()
            .details()
            .unwrap();
        assert_eq!(d.kind, ChangeKind::Restore);
    }

    #[test]
    fn replies_round_trip_with_error_names() {
        let r = HostReply::error(ErrorCode::TimedOut, 3, "timed out");
        let line = r.encode();
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(r#""error":"TimedOut""#), "{text}");
        assert_eq!(HostReply::decode(&line[..line.len() - 1]).unwrap(), r);
        let d = HostReply::done(7);
        assert_eq!(
            std::str::from_utf8(&d.encode()).unwrap(),
            "{\"ok\":true,\"generation\":7}\n"
        );
    }
}
