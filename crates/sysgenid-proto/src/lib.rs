//! The wire protocol between `sysgenidd` and its clients, one module so that
//! the daemon and every client library agree by construction. The prose
//! version, with byte layouts, is `docs/protocol.md`.
//!
//! The transport is an `AF_UNIX` `SOCK_SEQPACKET` socket: every frame is one
//! datagram, so there is no length prefix and no partial frame to resume.
//! A frame is a kind byte followed by fixed little-endian fields (and, for
//! two kinds, UTF-8 or JSON text). Frames longer than [`MAX_FRAME`] are a
//! protocol violation.
//!
//! # Versioning
//! The first frame of a connection is [`Request::Hello`], whose first three
//! bytes (kind, `u16` version) and the [`Reply::Error`] layout are frozen
//! forever. A daemon that does not speak the client's version answers with
//! an `Error` of code [`ErrorCode::VersionMismatch`] carrying its own
//! version, so a newer client prints a clear message instead of decoding
//! garbage.
//!
//! # Readiness
//! A watcher connection carries one unsolicited frame, [`Reply::Changed`].
//! The daemon keeps this invariant: *while the watcher is outdated, the last
//! frame it has sent is a `Changed`*. It sends one on every bump, and again
//! after every reply to a watcher that is still outdated. A client therefore
//! waits for a change by peeking (`MSG_PEEK`) at its socket, and consumes
//! frames only up to the reply of a request. The socket is readable exactly
//! while the watcher is outdated, which is what makes it usable in
//! poll/epoll/tokio like the seed's device file.
//!
//! # Lifecycle (version 2)
//! A watcher that opts in with [`Role::Watcher::lifecycle`] is a lifecycle
//! participant: it also receives [`Reply::Freeze`] and [`Reply::Thaw`], which
//! are consumed when read (never collapsed), and answers a freeze with
//! [`Request::Confirm`]. The daemon follows every such event to an outdated
//! watcher with a `Changed`, so the invariant above still holds. Orchestrators
//! send [`Request::Freeze`] and [`Request::Thaw`]. Version 1 connections
//! never see any of this (see `docs/protocol.md`, "Versioning").

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

mod details;
pub use details::{
    BumpDetails, ChangeKind, DetailError, Entropy, Hostname, RngStatus, MAX_ENTROPY, MAX_HOSTNAME,
    MIN_ENTROPY,
};

pub mod host;

/// The newest protocol version this crate speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// The oldest protocol version the daemon still serves: version 1 clients
/// keep working unchanged (without the lifecycle).
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The first version with the snapshot lifecycle (participants, freeze,
/// thaw, confirm).
pub const LIFECYCLE_VERSION: u16 = 2;

/// The freeze timeout the daemon applies when a [`Request::Freeze`] names 0.
pub const DEFAULT_FREEZE_TIMEOUT_MS: u32 = 30_000;

/// The largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 2048;

/// File name of the socket inside the runtime directory.
pub const SOCKET_NAME: &str = "sysgenid.sock";
/// File name of the generation page inside the runtime directory.
pub const PAGE_NAME: &str = "generation";
/// Environment variable naming the runtime directory.
pub const RUNTIME_DIR_ENV: &str = "SYSGENID_RUNTIME_DIR";

/// The system daemon's runtime directory.
pub const SYSTEM_RUNTIME_DIR: &str = "/run/sysgenid";

/// The runtime directory every client uses unless told otherwise:
/// `SYSGENID_RUNTIME_DIR` if set, else [`SYSTEM_RUNTIME_DIR`], for every
/// uid, so an unprivileged program reaches the system daemon with no
/// configuration. A per-user daemon is only ever used when asked for (the
/// variable, or an explicit `--runtime-dir`), so a directory another user
/// can create first (`/tmp/...`) is never a default. Part of the contract,
/// so it lives with the protocol.
pub fn default_runtime_dir() -> std::path::PathBuf {
    match std::env::var_os(RUNTIME_DIR_ENV) {
        Some(dir) if !dir.is_empty() => dir.into(),
        _ => SYSTEM_RUNTIME_DIR.into(),
    }
}

mod codes {
    pub const HELLO: u8 = 0x01;
    pub const ACK: u8 = 0x02;
    pub const WAIT_WATCHERS: u8 = 0x03;
    pub const BUMP: u8 = 0x04;
    pub const STATUS: u8 = 0x05;
    pub const FREEZE: u8 = 0x06;
    pub const THAW: u8 = 0x07;
    pub const CONFIRM: u8 = 0x08;
    pub const WELCOME: u8 = 0x81;
    pub const CHANGED: u8 = 0x82;
    pub const DONE: u8 = 0x83;
    pub const STATUS_REPORT: u8 = 0x84;
    pub const FREEZE_EVENT: u8 = 0x85;
    pub const THAW_EVENT: u8 = 0x86;
    pub const ERROR: u8 = 0xff;
}

/// What a connection is for, declared in its `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Status, bumps and barrier waits only; not a watcher.
    Control,
    /// A watcher, as one open handle of the seed's `/dev/sysgenid`.
    Watcher {
        /// Untracked watchers never hold up `WaitWatchers`.
        untracked: bool,
        /// The generation this client acknowledged on an earlier connection
        /// (reconnect after a daemon restart); `None` for a new watcher.
        acked: Option<u32>,
        /// A lifecycle participant: told to freeze and thaw (version 2+).
        lifecycle: bool,
    },
}

/// A frame sent by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// First frame of every connection.
    Hello {
        /// The client's protocol version.
        version: u16,
        /// What the connection is for.
        role: Role,
    },
    /// Acknowledge `generation` (the seed's `write()`).
    Ack {
        /// Must equal the current generation.
        generation: u32,
    },
    /// Wait until no tracked watcher is outdated (`SYSGENID_WAIT_WATCHERS`).
    WaitWatchers {
        /// Milliseconds; 0 waits forever.
        timeout_ms: u32,
    },
    /// Forced update to at least `min_generation` (`SYSGENID_FORCE_GEN_UPDATE`).
    Bump {
        /// The new generation is `max(min_generation, current + 1)`.
        min_generation: u32,
        /// Allow a minimum that jumps into the counter's last 2^20 values
        /// (`sysgenid_core::EXHAUSTION_RESERVE`; refused otherwise: it would
        /// end the mechanism for good). On the wire: an optional sixth
        /// byte, bit 0; absent means `false`, so older clients are unchanged.
        allow_exhaustion: bool,
        /// The kind of change, host entropy and a hostname. On the wire:
        /// flag bit 1, then the fields (see `docs/protocol.md`); sent only
        /// when not the default, so a plain bump is the frame of earlier
        /// releases.
        details: BumpDetails,
    },
    /// Ask for a [`StatusReport`].
    Status,
    /// Privileged (like `Bump`): freeze every lifecycle participant; the
    /// reply comes once frozen (`Done`) or when the freeze is aborted
    /// (`Error FreezeAborted`). Version 2+.
    Freeze {
        /// Abort if not frozen within this many milliseconds; 0 means
        /// [`DEFAULT_FREEZE_TIMEOUT_MS`].
        timeout_ms: u32,
    },
    /// Privileged: thaw (also when not frozen: `Done`, nothing changes).
    /// Version 2+.
    Thaw,
    /// A participant has quiesced for freeze `freeze`. Version 2+.
    Confirm {
        /// The number from the [`Reply::Freeze`] event.
        freeze: u32,
    },
}

impl Request {
    /// Whether this request exists only from [`LIFECYCLE_VERSION`] on.
    pub fn needs_lifecycle_version(&self) -> bool {
        matches!(
            self,
            Request::Freeze { .. } | Request::Thaw | Request::Confirm { .. }
        )
    }
}

/// A frame sent by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
// Status replies are rare and short-lived (built, encoded, dropped): boxing
// the report would cost every caller a pattern change for no gain.
#[allow(clippy::large_enum_variant)]
pub enum Reply {
    /// Answer to `Hello`.
    Welcome {
        /// The daemon's protocol version.
        version: u16,
        /// The current generation.
        generation: u32,
    },
    /// Unsolicited, watchers only: the watcher is outdated; `generation` is
    /// current as of sending.
    Changed {
        /// The generation to handle and acknowledge.
        generation: u32,
    },
    /// Success of `Ack`, `WaitWatchers` or `Bump`, with the generation in
    /// force when it completed (for `Bump`, the new one).
    Done {
        /// The current generation.
        generation: u32,
    },
    /// Answer to `Status`.
    Status(StatusReport),
    /// A refused request. Nothing changed.
    Error(ErrorReply),
    /// Unsolicited, participants only (version 2+): quiesce, then send
    /// [`Request::Confirm`] with `freeze`. Sent at once to a participant
    /// that registers while a freeze is in force.
    Freeze {
        /// The number of this freeze.
        freeze: u32,
        /// The generation at the time.
        generation: u32,
    },
    /// Unsolicited, participants only (version 2+): resume. Follows a
    /// completed freeze, an aborted one, or a thaw after a restore.
    Thaw {
        /// The freeze that ended.
        freeze: u32,
        /// The generation at the time.
        generation: u32,
    },
}

/// Why a request failed; each maps to the errno the seed's device would
/// have returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// Ack of a generation that is not current (`EINVAL`); value = current.
    WrongGeneration = 1,
    /// The caller's watcher is outdated (`EINTR`); value = generation.
    Interrupted = 2,
    /// Barrier timeout (`ETIMEDOUT`); value = outdated watchers.
    TimedOut = 3,
    /// Unprivileged bump (`EACCES`).
    PermissionDenied = 4,
    /// The bump would pass `u32::MAX` (`EOVERFLOW`); value = current.
    Overflow = 5,
    /// Unsupported protocol version (`EPROTONOSUPPORT`); value = the
    /// daemon's version.
    VersionMismatch = 6,
    /// Malformed or out-of-order frame (`EPROTO`); the daemon hangs up.
    ProtocolViolation = 7,
    /// A watcher-only request on a control connection (`ENOTCONN`).
    NotAWatcher = 8,
    /// A watcher limit was reached (`EUSERS`); value = the limit.
    TooManyWatchers = 9,
    /// The daemon is shutting down (`ESHUTDOWN`).
    ShuttingDown = 10,
    /// The daemon could not make the change durable (`EIO`).
    Internal = 11,
    /// The freeze was aborted (timeout, thaw, restore) and everyone was
    /// thawed (`ETIMEDOUT`); value = tracked participants that had not
    /// confirmed. Version 2+.
    FreezeAborted = 12,
    /// A lifecycle request on a connection that is not a participant
    /// (`ENOTCONN`). Version 2+.
    NotAParticipant = 13,
    /// Another freeze is in progress (`EBUSY`); value = participants it
    /// still waits for. Version 2+.
    Busy = 14,
    /// Confirmation of a freeze never asked for (`EINVAL`); value = the
    /// latest freeze number. Version 2+.
    WrongFreeze = 15,
}

impl ErrorCode {
    /// The errno a kernel implementation would return for this error.
    pub fn errno(self) -> i32 {
        match self {
            ErrorCode::WrongGeneration => 22,   // EINVAL
            ErrorCode::Interrupted => 4,        // EINTR
            ErrorCode::TimedOut => 110,         // ETIMEDOUT
            ErrorCode::PermissionDenied => 13,  // EACCES
            ErrorCode::Overflow => 75,          // EOVERFLOW
            ErrorCode::VersionMismatch => 93,   // EPROTONOSUPPORT
            ErrorCode::ProtocolViolation => 71, // EPROTO
            ErrorCode::NotAWatcher => 107,      // ENOTCONN
            ErrorCode::TooManyWatchers => 87,   // EUSERS
            ErrorCode::ShuttingDown => 108,     // ESHUTDOWN
            ErrorCode::Internal => 5,           // EIO
            ErrorCode::FreezeAborted => 110,    // ETIMEDOUT
            ErrorCode::NotAParticipant => 107,  // ENOTCONN
            ErrorCode::Busy => 16,              // EBUSY
            ErrorCode::WrongFreeze => 22,       // EINVAL
        }
    }

    fn from_u16(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            1 => WrongGeneration,
            2 => Interrupted,
            3 => TimedOut,
            4 => PermissionDenied,
            5 => Overflow,
            6 => VersionMismatch,
            7 => ProtocolViolation,
            8 => NotAWatcher,
            9 => TooManyWatchers,
            10 => ShuttingDown,
            11 => Internal,
            12 => FreezeAborted,
            13 => NotAParticipant,
            14 => Busy,
            15 => WrongFreeze,
            _ => return None,
        })
    }
}

/// A refusal: code, one number whose meaning the code defines, and a
/// sentence for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// What went wrong.
    pub code: ErrorCode,
    /// Meaning depends on `code` (see [`ErrorCode`]).
    pub value: u32,
    /// A message written for the person reading the log or terminal.
    pub message: String,
}

/// One restore-signal source as shown by `sysgenidctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SourceStatus {
    /// Source name (`vmfork`, `vmclock`, `uevent`, `manual`).
    pub name: String,
    /// Whether it is running.
    pub active: bool,
    /// What it watches, or why it is inactive.
    pub detail: String,
    /// Events it reported.
    pub events: u64,
    /// Unix time in milliseconds of its last event.
    pub last_event_unix_ms: Option<u64>,
}

/// The daemon's state as reported by `Status`. Counts are advisory: they
/// are stale as soon as they are read (see `docs/design.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatusReport {
    /// The current generation.
    pub generation: u32,
    /// The 128-bit epoch id drawn at the last change, as 32 hex digits.
    pub epoch: String,
    /// All watchers (socket and device).
    pub watchers: u32,
    /// Watchers counted by the barrier.
    pub tracked: u32,
    /// Tracked watchers that have not acknowledged the current generation.
    pub outdated: u32,
    /// Untracked watchers that have not acknowledged it.
    pub outdated_untracked: u32,
    /// Milliseconds since the daemon started.
    pub uptime_ms: u64,
    /// Unix time in milliseconds of the last generation change.
    pub last_change_unix_ms: Option<u64>,
    /// The sources that reported the last change (several when coalesced).
    pub last_change_sources: Vec<String>,
    /// For the last bump caused by a kernel source whose signal carries a
    /// timestamp (`vmfork`: the kernel log record's): microseconds from that
    /// timestamp to the page showing the new generation, i.e. the restore
    /// window as the daemon saw it. Absent before such a bump, and from
    /// daemons older than this field (clients must accept both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_kernel_lag_us: Option<u64>,
    /// The kind of the last change (`clone`, `restore`, `unknown`): what
    /// its requester said, `unknown` for kernel signals and plain bumps,
    /// and from daemons older than this field.
    #[serde(default)]
    pub last_change_kind: ChangeKind,
    /// How the kernel's random number generator was renewed before the
    /// last change was published; absent before any change this daemon
    /// made, and from daemons older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_rng: Option<RngStatus>,
    /// Restore-signal sources.
    pub sources: Vec<SourceStatus>,
    /// The runtime directory.
    pub runtime_dir: String,
    /// The device path served through FUSE, if any.
    pub device: Option<String>,
    /// The daemon's package version.
    pub daemon_version: String,
    /// The lifecycle state (`running`, `freezing`, `frozen`); absent from
    /// daemons before version 2, read as `running`.
    #[serde(default)]
    pub state: LifecycleState,
    /// Tracked participants (and the hooks) that have not confirmed the
    /// freeze in progress; 0 unless `freezing`.
    #[serde(default)]
    pub pending: u32,
    /// Milliseconds the system has been frozen; absent unless `frozen`.
    #[serde(default)]
    pub frozen_ms: Option<u64>,
    /// Registered lifecycle participants.
    #[serde(default)]
    pub participants: u32,
    /// The latest freeze number (0: none yet).
    #[serde(default)]
    pub freeze: u32,
    /// Frozen, restored since, and thawing by itself once every tracked
    /// watcher has acknowledged.
    #[serde(default)]
    pub thaw_after_acks: bool,
    /// The hooks directory, when hooks are on.
    #[serde(default)]
    pub hooks: Option<Box<HooksStatus>>,
    /// Who holds the lifecycle: trusted and untrusted registrations.
    /// Absent from daemons before it (clients must accept both).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<TrustStatus>,
}

/// Trusted and untrusted registrations in status (`--lifecycle-group`,
/// `docs/design.md`): a freeze waits only for trusted tracked
/// participants, the automatic thaw after a restore only for trusted
/// tracked watchers; `wait-watchers` counts every tracked watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TrustStatus {
    /// Tracked participants a freeze waits for (the hooks count as one).
    pub participants_trusted: u32,
    /// Tracked participants it does not wait for: not trusted.
    pub participants_untrusted: u32,
    /// Tracked watchers the thaw after a restore waits for.
    pub tracked_trusted: u32,
    /// Tracked watchers it does not wait for: not trusted.
    pub tracked_untrusted: u32,
}

/// The lifecycle state in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleState {
    /// Normal operation.
    #[default]
    Running,
    /// Participants are quiescing.
    Freezing,
    /// Everyone confirmed; safe to snapshot.
    Frozen,
}

/// The hooks directory in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HooksStatus {
    /// The directory.
    pub dir: String,
    /// Hooks found at the last run (refused files not counted).
    pub hooks: u32,
    /// Hook runs so far (one per hook per event).
    pub runs: u64,
    /// Runs that exited non-zero or could not start.
    pub failures: u64,
    /// Runs killed at the per-hook timeout.
    pub timeouts: u64,
    /// Files refused as unsafe (writable by others, symlinks out).
    pub refused: u64,
    /// The latest failure, timeout or refusal, for humans.
    pub last_problem: Option<String>,
    /// The hooks whose latest `change` run failed or timed out, each with
    /// why: each holds the change unacknowledged (a tracked watcher still
    /// outdated) until the next change's run. Absent from older daemons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holding: Vec<String>,
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero-length frame.
    #[error("empty frame")]
    Empty,
    /// Unknown kind byte.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// Length does not match the kind.
    #[error("frame of kind {kind:#04x} has {len} bytes, expected {expected}")]
    BadLength {
        /// The kind byte.
        kind: u8,
        /// Bytes received.
        len: usize,
        /// Bytes this kind has.
        expected: usize,
    },
    /// Longer than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLong(usize),
    /// A field holds a value the protocol does not define.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// Cuts `text` to at most `limit` bytes on a character boundary, marking
/// the cut with an ellipsis.
fn clip(text: &mut String, limit: usize) {
    if text.len() <= limit {
        return;
    }
    let mut end = limit.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str("...");
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn expect_len(frame: &[u8], expected: usize) -> Result<(), DecodeError> {
    if frame.len() == expected {
        Ok(())
    } else {
        Err(DecodeError::BadLength {
            kind: frame[0],
            len: frame.len(),
            expected,
        })
    }
}

fn check_frame(frame: &[u8]) -> Result<u8, DecodeError> {
    if frame.len() > MAX_FRAME {
        return Err(DecodeError::TooLong(frame.len()));
    }
    frame.first().copied().ok_or(DecodeError::Empty)
}

const HELLO_WATCHER: u8 = 1;
const BUMP_ALLOW_EXHAUSTION: u8 = 1 << 0;
const BUMP_DETAILS: u8 = 1 << 1;

/// Whether the daemon judges the sender of a request of this kind (its
/// first byte) for privilege: it then receives that frame with the
/// sender's credentials (see `sysgenidd`'s `peer` module).
pub fn is_privileged_kind(kind: u8) -> bool {
    matches!(kind, codes::BUMP | codes::FREEZE | codes::THAW)
}
const HELLO_UNTRACKED: u8 = 1 << 0;
const HELLO_HAS_ACKED: u8 = 1 << 1;
const HELLO_LIFECYCLE: u8 = 1 << 2;

/// The fields after a `Bump`'s flag byte when bit 1 is set: `u8 kind`,
/// `u16 entropy length` (0, or 32 to 512) and the bytes, `u8 hostname
/// length` (0 to 64) and the name. The frame ends there.
fn decode_bump_details(frame: &[u8]) -> Result<BumpDetails, DecodeError> {
    let short = DecodeError::Invalid("bump details cut short");
    let kind = *frame.get(6).ok_or(short.clone())?;
    let kind = ChangeKind::from_code(kind).ok_or(DecodeError::Invalid("unknown change kind"))?;
    let len = frame.get(7..9).ok_or(short.clone())?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    let entropy = frame.get(9..9 + len).ok_or(short.clone())?;
    let entropy = match len {
        0 => None,
        _ => Some(
            Entropy::new(entropy.to_vec())
                .map_err(|_| DecodeError::Invalid("bump entropy must be 32 to 512 bytes"))?,
        ),
    };
    let at = 9 + len;
    let host_len = *frame.get(at).ok_or(short.clone())? as usize;
    let host = frame.get(at + 1..at + 1 + host_len).ok_or(short)?;
    if frame.len() != at + 1 + host_len {
        return Err(DecodeError::Invalid("bytes after the bump details"));
    }
    let hostname = match host_len {
        0 => None,
        _ => Some(
            std::str::from_utf8(host)
                .ok()
                .and_then(|h| Hostname::new(h).ok())
                .ok_or(DecodeError::Invalid(
                    "bump hostname is not a valid hostname",
                ))?,
        ),
    };
    Ok(BumpDetails {
        kind,
        entropy,
        hostname,
    })
}

impl Request {
    /// Encodes into a fresh frame.
    pub fn encode(&self) -> Vec<u8> {
        let scalar = |kind: u8, v: u32| {
            let mut f = vec![kind];
            f.extend_from_slice(&v.to_le_bytes());
            f
        };
        match self {
            &Request::Hello { version, role } => {
                let mut f = vec![codes::HELLO];
                f.extend_from_slice(&version.to_le_bytes());
                let (kind, flags, acked) = match role {
                    Role::Control => (0, 0, 0),
                    Role::Watcher {
                        untracked,
                        acked,
                        lifecycle,
                    } => {
                        let mut flags = 0;
                        if untracked {
                            flags |= HELLO_UNTRACKED;
                        }
                        if lifecycle {
                            flags |= HELLO_LIFECYCLE;
                        }
                        if acked.is_some() {
                            flags |= HELLO_HAS_ACKED;
                        }
                        (HELLO_WATCHER, flags, acked.unwrap_or(0))
                    }
                };
                f.push(kind);
                f.push(flags);
                f.extend_from_slice(&acked.to_le_bytes());
                f
            }
            &Request::Ack { generation } => scalar(codes::ACK, generation),
            &Request::WaitWatchers { timeout_ms } => scalar(codes::WAIT_WATCHERS, timeout_ms),
            Request::Bump {
                min_generation,
                allow_exhaustion,
                details,
            } => {
                let mut f = scalar(codes::BUMP, *min_generation);
                let mut flags = 0;
                if *allow_exhaustion {
                    flags |= BUMP_ALLOW_EXHAUSTION;
                }
                if !details.is_default() {
                    flags |= BUMP_DETAILS;
                }
                if flags != 0 {
                    f.push(flags);
                }
                if !details.is_default() {
                    f.push(details.kind.code());
                    let entropy = details.entropy.as_ref().map_or(&[][..], |e| e.bytes());
                    f.extend_from_slice(&(entropy.len() as u16).to_le_bytes());
                    f.extend_from_slice(entropy);
                    let host = details.hostname.as_ref().map_or("", |h| h.as_str());
                    f.push(host.len() as u8);
                    f.extend_from_slice(host.as_bytes());
                }
                f
            }
            Request::Status => vec![codes::STATUS],
            &Request::Freeze { timeout_ms } => scalar(codes::FREEZE, timeout_ms),
            Request::Thaw => vec![codes::THAW],
            &Request::Confirm { freeze } => scalar(codes::CONFIRM, freeze),
        }
    }

    /// The version a `Hello` frame announces, readable even when the rest of
    /// the frame is from a future version. `None` if not a `Hello`.
    pub fn peek_hello_version(frame: &[u8]) -> Option<u16> {
        (frame.len() >= 3 && frame[0] == codes::HELLO).then(|| u16_at(frame, 1))
    }

    /// Decodes one frame.
    pub fn decode(frame: &[u8]) -> Result<Request, DecodeError> {
        let kind = check_frame(frame)?;
        match kind {
            codes::HELLO => {
                expect_len(frame, 9)?;
                let version = u16_at(frame, 1);
                let flags = frame[4];
                let role = match frame[3] {
                    0 if flags == 0 => Role::Control,
                    0 => return Err(DecodeError::Invalid("control hello with watcher flags")),
                    HELLO_WATCHER => {
                        let known = if version >= LIFECYCLE_VERSION {
                            HELLO_UNTRACKED | HELLO_HAS_ACKED | HELLO_LIFECYCLE
                        } else {
                            HELLO_UNTRACKED | HELLO_HAS_ACKED
                        };
                        if flags & !known != 0 {
                            return Err(DecodeError::Invalid("unknown hello flags"));
                        }
                        Role::Watcher {
                            untracked: flags & HELLO_UNTRACKED != 0,
                            acked: (flags & HELLO_HAS_ACKED != 0).then(|| u32_at(frame, 5)),
                            lifecycle: flags & HELLO_LIFECYCLE != 0,
                        }
                    }
                    _ => return Err(DecodeError::Invalid("unknown role")),
                };
                Ok(Request::Hello { version, role })
            }
            codes::BUMP => {
                if frame.len() < 5 {
                    expect_len(frame, 5)?;
                }
                let flags = frame.get(5).copied().unwrap_or(0);
                if flags & !(BUMP_ALLOW_EXHAUSTION | BUMP_DETAILS) != 0 {
                    return Err(DecodeError::Invalid("unknown bump flags"));
                }
                let details = if flags & BUMP_DETAILS != 0 {
                    decode_bump_details(frame)?
                } else {
                    expect_len(frame, if frame.len() > 5 { 6 } else { 5 })?;
                    BumpDetails::default()
                };
                Ok(Request::Bump {
                    min_generation: u32_at(frame, 1),
                    allow_exhaustion: flags & BUMP_ALLOW_EXHAUSTION != 0,
                    details,
                })
            }
            codes::ACK | codes::WAIT_WATCHERS | codes::FREEZE | codes::CONFIRM => {
                expect_len(frame, 5)?;
                let v = u32_at(frame, 1);
                Ok(match kind {
                    codes::ACK => Request::Ack { generation: v },
                    codes::WAIT_WATCHERS => Request::WaitWatchers { timeout_ms: v },
                    codes::FREEZE => Request::Freeze { timeout_ms: v },
                    _ => Request::Confirm { freeze: v },
                })
            }
            codes::STATUS => {
                expect_len(frame, 1)?;
                Ok(Request::Status)
            }
            codes::THAW => {
                expect_len(frame, 1)?;
                Ok(Request::Thaw)
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

impl Reply {
    /// Encodes into a fresh frame (messages are cut to fit [`MAX_FRAME`]).
    pub fn encode(&self) -> Vec<u8> {
        let scalar = |kind: u8, v: u32| {
            let mut f = vec![kind];
            f.extend_from_slice(&v.to_le_bytes());
            f
        };
        match self {
            Reply::Welcome {
                version,
                generation,
            } => {
                let mut f = vec![codes::WELCOME];
                f.extend_from_slice(&version.to_le_bytes());
                f.extend_from_slice(&generation.to_le_bytes());
                f
            }
            Reply::Changed { generation } => scalar(codes::CHANGED, *generation),
            Reply::Done { generation } => scalar(codes::DONE, *generation),
            Reply::Status(report) => {
                let encode = |r: &StatusReport| {
                    let mut f = vec![codes::STATUS_REPORT];
                    // Serialising plain structs of strings and integers to a
                    // Vec cannot fail.
                    serde_json::to_writer(&mut f, r).expect("status report serialises");
                    f
                };
                let f = encode(report);
                if f.len() <= MAX_FRAME {
                    return f;
                }
                // Too long for one frame (long paths or details): shorten
                // the free-text fields, keeping every number.
                let mut short = report.clone();
                for limit in [120, 40, 0] {
                    for src in &mut short.sources {
                        clip(&mut src.detail, limit);
                    }
                    let hooks = short.hooks.as_mut();
                    let (hooks_dir, hooks_problem, hooks_holding) = match hooks {
                        Some(h) => {
                            h.holding.truncate(16);
                            (
                                Some(&mut h.dir),
                                h.last_problem.as_mut(),
                                Some(&mut h.holding),
                            )
                        }
                        None => (None, None, None),
                    };
                    let (rng_why, rng_entropy) = match short.last_change_rng.as_mut() {
                        Some(r) => (r.not_reseeded_because.as_mut(), r.entropy_error.as_mut()),
                        None => (None, None),
                    };
                    for text in [&mut short.runtime_dir, &mut short.epoch]
                        .into_iter()
                        .chain(short.device.as_mut())
                        .chain(hooks_dir)
                        .chain(hooks_problem)
                        .chain(hooks_holding.into_iter().flatten())
                        .chain(rng_why)
                        .chain(rng_entropy)
                    {
                        clip(text, limit.max(64));
                    }
                    let f = encode(&short);
                    if f.len() <= MAX_FRAME {
                        return f;
                    }
                }
                short.sources.truncate(8);
                short.last_change_sources.truncate(8);
                encode(&short)
            }
            Reply::Error(e) => {
                let mut f = vec![codes::ERROR];
                f.extend_from_slice(&(e.code as u16).to_le_bytes());
                f.extend_from_slice(&e.value.to_le_bytes());
                let mut end = e.message.len().min(MAX_FRAME - f.len());
                while !e.message.is_char_boundary(end) {
                    end -= 1;
                }
                f.extend_from_slice(&e.message.as_bytes()[..end]);
                f
            }
            Reply::Freeze { freeze, generation } | Reply::Thaw { freeze, generation } => {
                let kind = if matches!(self, Reply::Freeze { .. }) {
                    codes::FREEZE_EVENT
                } else {
                    codes::THAW_EVENT
                };
                let mut f = vec![kind];
                f.extend_from_slice(&freeze.to_le_bytes());
                f.extend_from_slice(&generation.to_le_bytes());
                f
            }
        }
    }

    /// Whether this is an unsolicited lifecycle event (`Freeze`, `Thaw`).
    pub fn is_lifecycle_event(&self) -> bool {
        matches!(self, Reply::Freeze { .. } | Reply::Thaw { .. })
    }

    /// Decodes one frame.
    pub fn decode(frame: &[u8]) -> Result<Reply, DecodeError> {
        let kind = check_frame(frame)?;
        match kind {
            codes::WELCOME => {
                expect_len(frame, 7)?;
                Ok(Reply::Welcome {
                    version: u16_at(frame, 1),
                    generation: u32_at(frame, 3),
                })
            }
            codes::CHANGED | codes::DONE => {
                expect_len(frame, 5)?;
                let generation = u32_at(frame, 1);
                Ok(if kind == codes::CHANGED {
                    Reply::Changed { generation }
                } else {
                    Reply::Done { generation }
                })
            }
            codes::FREEZE_EVENT | codes::THAW_EVENT => {
                expect_len(frame, 9)?;
                let (freeze, generation) = (u32_at(frame, 1), u32_at(frame, 5));
                Ok(if kind == codes::FREEZE_EVENT {
                    Reply::Freeze { freeze, generation }
                } else {
                    Reply::Thaw { freeze, generation }
                })
            }
            codes::STATUS_REPORT => serde_json::from_slice(&frame[1..])
                .map(Reply::Status)
                .map_err(|_| DecodeError::Invalid("status report is not valid JSON")),
            codes::ERROR => {
                if frame.len() < 7 {
                    return Err(DecodeError::BadLength {
                        kind,
                        len: frame.len(),
                        expected: 7,
                    });
                }
                let code = ErrorCode::from_u16(u16_at(frame, 1))
                    .ok_or(DecodeError::Invalid("unknown error code"))?;
                Ok(Reply::Error(ErrorReply {
                    code,
                    value: u32_at(frame, 3),
                    message: String::from_utf8_lossy(&frame[7..]).into_owned(),
                }))
            }
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

#[cfg(test)]
mod tests;
