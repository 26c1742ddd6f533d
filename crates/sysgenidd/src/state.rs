//! The saved state: what must survive a restart or a `kill -9` so that the
//! generation never goes backwards.
//!
//! The file `state` in the runtime directory holds two 64-byte slots. Each
//! save writes the *other* slot with a higher sequence number (`pwrite` +
//! `fdatasync`: two system calls, about a microsecond on tmpfs), and loading
//! takes the valid slot with the highest sequence. A crash mid-write can tear
//! at most the slot being written, and its CRC-32 then fails, leaving the
//! previous slot — whose generation is the last one anybody could have
//! seen, because a new generation is published only after its save returns.
//! (This replaced a write-temporary-then-rename scheme that cost seven
//! system calls per bump.)
//!
//! A file in which no slot is valid is corrupt: the daemon refuses to start
//! with instructions rather than restart silently from 0.
//!
//! Slot layout (little-endian):
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 4  | magic `SGS1` |
//! | 4  | 4  | generation |
//! | 8  | 8  | sequence (increases with every save) |
//! | 16 | 16 | epoch id |
//! | 32 | 8  | change time, ns since the Unix epoch (0: never changed) |
//! | 40 | 4  | CRC-32 of bytes 0..40 |
//! | 44 | 20 | zero |

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};

/// File name inside the runtime directory.
pub const STATE_NAME: &str = "state";
const SLOT: usize = 64;
const MAGIC: &[u8; 4] = b"SGS1";

/// The durable part of the daemon's state (kept apart from the live
/// objects, as Firecracker keeps its device state types).
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
    /// The file exists but holds no valid slot.
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

fn encode_slot(state: &SavedState, sequence: u64) -> [u8; SLOT] {
    let mut slot = [0u8; SLOT];
    slot[0..4].copy_from_slice(MAGIC);
    slot[4..8].copy_from_slice(&state.generation.to_le_bytes());
    slot[8..16].copy_from_slice(&sequence.to_le_bytes());
    slot[16..32].copy_from_slice(&state.epoch);
    slot[32..40].copy_from_slice(&state.changed_unix_ns.to_le_bytes());
    let crc = crc32fast::hash(&slot[0..40]);
    slot[40..44].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<(SavedState, u64)> {
    if slot.len() < SLOT || &slot[0..4] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(slot[40..44].try_into().ok()?);
    if crc != crc32fast::hash(&slot[0..40]) {
        return None;
    }
    let state = SavedState {
        generation: u32::from_le_bytes(slot[4..8].try_into().ok()?),
        epoch: slot[16..32].try_into().ok()?,
        changed_unix_ns: u64::from_le_bytes(slot[32..40].try_into().ok()?),
    };
    Some((state, u64::from_le_bytes(slot[8..16].try_into().ok()?)))
}

/// Picks the newest valid slot of a file's contents; `Err` says why none is.
fn decode_file(bytes: &[u8]) -> Result<(SavedState, u64), String> {
    let slots = [bytes.get(0..SLOT), bytes.get(SLOT..2 * SLOT)];
    slots
        .into_iter()
        .flatten()
        .filter_map(decode_slot)
        .max_by_key(|(_, seq)| *seq)
        .ok_or_else(|| {
            format!(
                "{} bytes and no slot with a valid magic and checksum",
                bytes.len()
            )
        })
}

/// The open state file.
pub struct StateFile {
    fd: OwnedFd,
    path: String,
    sequence: u64,
}

impl StateFile {
    /// Opens (creating if absent) the state file in `dir` and loads it:
    /// `None` if it did not exist or was empty (a fresh directory).
    pub fn open(
        dir: BorrowedFd<'_>,
        dir_path: &str,
    ) -> Result<(StateFile, Option<SavedState>), StateError> {
        let path = format!("{dir_path}/{STATE_NAME}");
        let io = |e: rustix::io::Errno| StateError::Io {
            path: path.clone(),
            source: e.into(),
        };
        let fd = rustix::fs::openat(
            dir,
            STATE_NAME,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map_err(io)?;
        let st = rustix::fs::fstat(&fd).map_err(io)?;
        if st.st_uid != rustix::process::geteuid().as_raw() || st.st_nlink != 1 {
            return Err(StateError::Corrupt {
                path,
                why: "it is not a plain file owned by this daemon; remove it".into(),
            });
        }
        let mut bytes = vec![0u8; 2 * SLOT + 1];
        let n = rustix::io::pread(&fd, &mut bytes, 0).map_err(io)?;
        bytes.truncate(n);
        if bytes.is_empty() {
            return Ok((
                StateFile {
                    fd,
                    path,
                    sequence: 0,
                },
                None,
            ));
        }
        let (state, sequence) = decode_file(&bytes).map_err(|why| StateError::Corrupt {
            path: path.clone(),
            why,
        })?;
        Ok((StateFile { fd, path, sequence }, Some(state)))
    }

    /// Saves durably into the slot not holding the newest state.
    pub fn save(&mut self, state: &SavedState) -> Result<(), StateError> {
        let sequence = self.sequence + 1;
        let slot = encode_slot(state, sequence);
        let offset = (sequence % 2) * SLOT as u64;
        let io = |source: std::io::Error| StateError::Io {
            path: self.path.clone(),
            source,
        };
        let written = rustix::io::pwrite(&self.fd, &slot, offset).map_err(|e| io(e.into()))?;
        if written != SLOT {
            return Err(io(std::io::Error::other("short write")));
        }
        rustix::fs::fdatasync(self.fd.as_fd()).map_err(|e| io(e.into()))?;
        self.sequence = sequence;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> (StateFile, Option<SavedState>) {
        let fd = std::fs::File::open(dir).unwrap();
        StateFile::open(fd.as_fd(), dir.to_str().unwrap()).unwrap()
    }

    #[test]
    fn fresh_file_loads_as_none_then_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, loaded) = open(dir.path());
        assert_eq!(loaded, None);
        for generation in 1..=5 {
            f.save(&SavedState {
                generation,
                epoch: [generation as u8; 16],
                changed_unix_ns: 9,
            })
            .unwrap();
        }
        let (_, loaded) = open(dir.path());
        assert_eq!(loaded.unwrap().generation, 5);
    }

    #[test]
    fn a_torn_newest_slot_falls_back_to_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = open(dir.path());
        let s = |generation| SavedState {
            generation,
            ..SavedState::default()
        };
        f.save(&s(1)).unwrap(); // sequence 1 -> slot 1
        f.save(&s(2)).unwrap(); // sequence 2 -> slot 0
        let path = dir.path().join(STATE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[5] ^= 0xff; // tear slot 0 (the newest)
        std::fs::write(&path, &bytes).unwrap();
        let (mut f, loaded) = open(dir.path());
        assert_eq!(loaded, Some(s(1)), "the intact older slot");
        // Saving continues from the surviving sequence and wins on reload.
        f.save(&s(3)).unwrap();
        assert_eq!(open(dir.path()).1, Some(s(3)));
    }

    #[test]
    fn garbage_is_corrupt_not_zero() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(STATE_NAME), "generation 0\n").unwrap();
        let fd = std::fs::File::open(dir.path()).unwrap();
        let err = StateFile::open(fd.as_fd(), dir.path().to_str().unwrap())
            .err()
            .expect("corrupt");
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn slot_decoding_never_panics_on_short_or_random_input() {
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 % 251) as u8).collect();
            let _ = decode_file(&bytes);
        }
    }
}
