//! What a bump may say about the change besides its minimum: the kind of
//! change (clone or restore in place), entropy from the host to mix into
//! the kernel's pool, and the hostname the clone should take.
//!
//! Why its own module: the same three values travel in the socket's `Bump`
//! frame, in the daemon's internal request and, later, in the host
//! channel; their limits and validity rules live here once, so every
//! client refuses what the daemon would refuse, with the same words.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The fewest bytes of entropy a bump may carry (256 bits).
pub const MIN_ENTROPY: usize = 32;
/// The most bytes of entropy a bump may carry.
pub const MAX_ENTROPY: usize = 512;
/// The longest hostname a bump may carry (Linux's `HOST_NAME_MAX`).
pub const MAX_HOSTNAME: usize = 64;

/// What kind of change a bump announces, as far as the requester knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// Not said (every kernel signal, and a plain `bump`).
    #[default]
    Unknown,
    /// One of possibly several copies of a snapshot: identity must be
    /// renewed.
    Clone,
    /// The same machine put back in time: identity is kept.
    Restore,
}

impl ChangeKind {
    /// `unknown`, `clone` or `restore`: the value of `SYSGENID_KIND`.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Unknown => "unknown",
            ChangeKind::Clone => "clone",
            ChangeKind::Restore => "restore",
        }
    }

    /// The wire byte.
    pub fn code(self) -> u8 {
        match self {
            ChangeKind::Unknown => 0,
            ChangeKind::Clone => 1,
            ChangeKind::Restore => 2,
        }
    }

    /// From the wire byte.
    pub fn from_code(code: u8) -> Option<ChangeKind> {
        Some(match code {
            0 => ChangeKind::Unknown,
            1 => ChangeKind::Clone,
            2 => ChangeKind::Restore,
            _ => return None,
        })
    }
}

impl std::str::FromStr for ChangeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<ChangeKind, String> {
        match s {
            "unknown" => Ok(ChangeKind::Unknown),
            "clone" => Ok(ChangeKind::Clone),
            "restore" => Ok(ChangeKind::Restore),
            other => Err(format!(
                "unknown kind {other:?}: the kind of change is clone, restore or unknown"
            )),
        }
    }
}

/// Why entropy or a hostname was refused. Nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetailError {
    /// Entropy of a length outside [`MIN_ENTROPY`]..=[`MAX_ENTROPY`].
    #[error("entropy must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, and this is {0} bytes")]
    EntropyLength(usize),
    /// Not a hostname.
    #[error("{name:?} is not a valid hostname: {why}")]
    Hostname {
        /// What was given (cut to 80 characters).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Entropy from a privileged requester, to be mixed into the kernel's
/// pool (and credited). Its bytes are wiped when dropped, and never
/// printed: `Debug` shows the length only.
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(Zeroizing<Vec<u8>>);

impl Entropy {
    /// Takes `bytes` if their length is within the limits.
    pub fn new(bytes: Vec<u8>) -> Result<Entropy, DetailError> {
        let bytes = Zeroizing::new(bytes);
        if (MIN_ENTROPY..=MAX_ENTROPY).contains(&bytes.len()) {
            Ok(Entropy(bytes))
        } else {
            Err(DetailError::EntropyLength(bytes.len()))
        }
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entropy({} bytes)", self.0.len())
    }
}

/// A valid hostname: at most [`MAX_HOSTNAME`] bytes of dot-separated
/// labels, each 1 to 63 ASCII letters, digits and hyphens, neither
/// starting nor ending with a hyphen (RFC 1123).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostname(String);

impl Hostname {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Hostname, DetailError> {
        let refuse = |why| {
            Err(DetailError::Hostname {
                name: name.chars().take(80).collect(),
                why,
            })
        };
        if name.is_empty() {
            return refuse("it is empty");
        }
        if name.len() > MAX_HOSTNAME {
            return refuse("it is longer than 64 bytes");
        }
        for label in name.split('.') {
            if label.is_empty() {
                return refuse("it has an empty label (a leading, trailing or double dot)");
            }
            if label.len() > 63 {
                return refuse("a label is longer than 63 characters");
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return refuse("only ASCII letters, digits, hyphens and dots are allowed");
            }
            if label.starts_with('-') || label.ends_with('-') {
                return refuse("a label starts or ends with a hyphen");
            }
        }
        Ok(Hostname(name.to_string()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Hostname {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a bump says about the change besides its minimum. The default
/// (unknown kind, no entropy, no hostname) is what every bump of earlier
/// releases said, and is sent as the frame of earlier releases.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BumpDetails {
    /// Clone, restore in place, or not said.
    pub kind: ChangeKind,
    /// Host entropy to mix into the kernel's pool before the epoch is
    /// drawn.
    pub entropy: Option<Entropy>,
    /// The hostname for this change (exported to hooks as
    /// `SYSGENID_HOSTNAME`).
    pub hostname: Option<Hostname>,
}

impl BumpDetails {
    /// Whether these are the defaults (then nothing extra is sent).
    pub fn is_default(&self) -> bool {
        self.kind == ChangeKind::Unknown && self.entropy.is_none() && self.hostname.is_none()
    }
}

/// How the kernel's random number generator was renewed for the last
/// change, in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RngStatus {
    /// Whether the kernel's CRNG was reseeded before the epoch was drawn
    /// and anyone was told of the change.
    pub reseeded: bool,
    /// Who reseeded it: `kernel` (its own VM-fork reseed, before the
    /// signal the change came from) or `sysgenidd` (`RNDRESEEDCRNG`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// Why it was not reseeded (the refusal and what it means).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_reseeded_because: Option<String>,
    /// Bytes of entropy from the request mixed into the kernel's pool
    /// (credited); 0 when none came or mixing failed.
    #[serde(default)]
    pub entropy_mixed: u32,
    /// Why entropy that came with the request could not be mixed in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy_error: Option<String>,
}
