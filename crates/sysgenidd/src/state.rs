//! The saved state: what must survive a restart or a `kill -9` so that the
//! generation never goes backwards.
//!
//! It is a small text file, `state`, in the runtime directory, replaced
//! atomically (write `state.tmp`, `fsync`, `rename`, `fsync` the directory)
//! *before* a new generation is published anywhere. A crash at any instant
//! therefore leaves either the old or the new state, and no client can have
//! seen a generation the file does not hold. A CRC-32 line detects a torn or
//! edited file; a corrupt file stops the daemon with instructions instead of
//! restarting silently from 0.
//!
//! ```text
//! sysgenid-state 1
//! generation 5
//! epoch 8f1c...32 hex digits
//! changed_unix_ns 1764284000000000000
//! crc32 1a2b3c4d
//! ```

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};

use rustix::fs::{Mode, OFlags};

/// File name inside the runtime directory.
pub const STATE_NAME: &str = "state";
const STATE_TMP: &str = "state.tmp";
const HEADER: &str = "sysgenid-state 1";

/// The durable part of the daemon's state (Firecracker-style: separate from
/// the live objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SavedState {
    /// The generation.
    pub generation: u32,
    /// The epoch id drawn when it was reached.
    pub epoch: [u8; 16],
    /// When it was reached (0: never changed).
    pub changed_unix_ns: u64,
}

/// Why the state could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("state file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file exists but is not a valid state file.
    #[error("state file {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// Formats an epoch as 32 lowercase hex digits.
pub fn epoch_hex(epoch: &[u8; 16]) -> String {
    epoch.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_epoch(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl SavedState {
    /// The file's text.
    pub fn encode(&self) -> String {
        let body = format!(
            "{HEADER}\ngeneration {}\nepoch {}\nchanged_unix_ns {}\n",
            self.generation,
            epoch_hex(&self.epoch),
            self.changed_unix_ns
        );
        let crc = crc32fast::hash(body.as_bytes());
        format!("{body}crc32 {crc:08x}\n")
    }

    /// Parses the file's text; `Err` says what is wrong.
    pub fn decode(text: &str) -> Result<SavedState, String> {
        let crc_at = text
            .rfind("crc32 ")
            .ok_or_else(|| "no checksum line (truncated?)".to_string())?;
        let (body, crc_line) = text.split_at(crc_at);
        let want = u32::from_str_radix(crc_line.trim_start_matches("crc32 ").trim_end(), 16)
            .map_err(|_| "unreadable checksum".to_string())?;
        let got = crc32fast::hash(body.as_bytes());
        if want != got {
            return Err(format!("checksum {got:08x} does not match {want:08x}"));
        }
        let mut lines = body.lines();
        if lines.next() != Some(HEADER) {
            return Err(format!("first line is not {HEADER:?}"));
        }
        let mut field = |name: &str| -> Result<String, String> {
            let line = lines.next().ok_or_else(|| format!("missing {name}"))?;
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::to_string)
                .ok_or_else(|| format!("expected {name}, found {line:?}"))
        };
        let generation = field("generation")?
            .parse()
            .map_err(|_| "generation is not a u32".to_string())?;
        let epoch = parse_epoch(&field("epoch")?).ok_or("epoch is not 32 hex digits")?;
        let changed_unix_ns = field("changed_unix_ns")?
            .parse()
            .map_err(|_| "changed_unix_ns is not a u64".to_string())?;
        Ok(SavedState {
            generation,
            epoch,
            changed_unix_ns,
        })
    }

    /// Loads the state from `dir` (an open runtime directory). `Ok(None)`
    /// if there is no state file yet.
    pub fn load(dir: BorrowedFd<'_>, dir_path: &str) -> Result<Option<SavedState>, StateError> {
        let path = format!("{dir_path}/{STATE_NAME}");
        let fd = match rustix::fs::openat(
            dir,
            STATE_NAME,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => {
                return Err(StateError::Io {
                    path,
                    source: e.into(),
                })
            }
        };
        let mut text = String::new();
        let mut file = std::fs::File::from(fd);
        std::io::Read::read_to_string(&mut file, &mut text).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        SavedState::decode(&text)
            .map(Some)
            .map_err(|why| StateError::Corrupt { path, why })
    }

    /// Saves atomically and durably into `dir`.
    pub fn save(&self, dir: BorrowedFd<'_>, dir_path: &str) -> Result<(), StateError> {
        let io = |source: std::io::Error| StateError::Io {
            path: format!("{dir_path}/{STATE_NAME}"),
            source,
        };
        // A stale temporary (from a crash mid-save) is ours to replace; a
        // symlink planted there is not followed (O_NOFOLLOW) and fails.
        let _ = rustix::fs::unlinkat(dir, STATE_TMP, rustix::fs::AtFlags::empty());
        let fd = rustix::fs::openat(
            dir,
            STATE_TMP,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(|e| io(e.into()))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(self.encode().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        drop(file);
        rustix::fs::renameat(dir, STATE_TMP, dir, STATE_NAME).map_err(|e| io(e.into()))?;
        rustix::fs::fsync(dir.as_fd()).map_err(|e| io(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn round_trips_and_detects_corruption() {
        let s = SavedState {
            generation: 77,
            epoch: [0xab; 16],
            changed_unix_ns: 123,
        };
        let text = s.encode();
        assert_eq!(SavedState::decode(&text), Ok(s));
        let flipped = text.replace("generation 77", "generation 78");
        assert!(SavedState::decode(&flipped)
            .unwrap_err()
            .contains("checksum"));
        assert!(SavedState::decode(&text[..text.len() / 2]).is_err());
        assert!(SavedState::decode("").is_err());
    }

    #[test]
    fn save_then_load_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        let p = dir.path().to_str().unwrap();
        assert_eq!(SavedState::load(fd.as_fd(), p).unwrap(), None);
        let s = SavedState {
            generation: 3,
            ..SavedState::default()
        };
        s.save(fd.as_fd(), p).unwrap();
        assert_eq!(SavedState::load(fd.as_fd(), p).unwrap(), Some(s));
        std::fs::write(dir.path().join(STATE_NAME), "garbage").unwrap();
        assert!(matches!(
            SavedState::load(fd.as_fd(), p),
            Err(StateError::Corrupt { .. })
        ));
    }
}
