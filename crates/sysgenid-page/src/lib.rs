//! The generation page: a 4096-byte file that the daemon updates in place
//! and that anyone may map read-only to check the generation with no system
//! call. This is the seed's `mmap()` interface, and bytes 0..4 are exactly
//! what AWS-LC reads (`AWSLC_SYSGENID_PATH`): it stats the file, opens it
//! `O_RDONLY`, maps 4 bytes `PROT_READ, MAP_SHARED` and loads a volatile u32.
//!
//! # Layout (all fields native-endian, naturally aligned)
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 4  | `generation`: the current generation (`u32`) |
//! | 4  | 4  | `seq`: seqlock sequence, odd while a record is being written |
//! | 8  | 4  | `magic`: [`PAGE_MAGIC`] (`"SGID"`) |
//! | 12 | 4  | `layout`: [`PAGE_LAYOUT_VERSION`] |
//! | 16 | 16 | `epoch`: 128-bit id drawn at every change (differs across clones) |
//! | 32 | 8  | `changed_unix_ns`: wall-clock time of the last change |
//! | 40 | 4  | `outdated_tracked` (layout 2+): tracked watchers not yet caught up; a futex word |
//! | 44 | .. | zero, reserved |
//!
//! On a clean stop the daemon stores [`OUTDATED_STOPPED`] there (and wakes
//! the waiters), so barrier waiters on the page learn it as waiters parked
//! on the socket do.
//! Layout 1 pages (daemons before `outdated_tracked`) have zero at 40; a
//! reader uses the field only when `layout` is 2 or more
//! ([`PageReader::outdated_tracked`]). Only the runtime page carries it:
//! the device's mirror page (`device-page`) leaves it 0.
//!
//! # Memory ordering
//! The writer ([`PageWriter::publish`]) is the only writer; it runs on the
//! daemon's event loop thread. It makes `seq` odd, stores the record fields,
//! stores `generation` with `Release`, then makes `seq` even with `Release`.
//! * A reader that loads `generation` with `Acquire` ([`PageReader::generation`])
//!   and sees value *n* also sees the epoch and time written for *n* or later
//!   (the `Release` store of `generation` pairs with that `Acquire` load).
//! * A reader that needs the whole record consistently uses the seqlock
//!   ([`PageReader::record`]): `Acquire` load of `seq`, field loads, an
//!   `Acquire` fence, then `seq` again; retry if it was odd or changed.
//! * The daemon publishes the page *before* it notifies any watcher, so a
//!   watcher woken for generation *n* that then reads the page sees at least
//!   *n*.
//! * `outdated_tracked` is stored with `Release` by
//!   [`PageWriter::set_outdated_tracked`] whenever the count changes (after
//!   the core changed, before the daemon answers anyone), and loaded with
//!   `Acquire` by [`PageReader::outdated_tracked`]. After a bump it is
//!   stored after `generation`, so a reader that sees the post-bump count
//!   sees the new generation too. The writer wakes futex waiters on the
//!   word (`FUTEX_WAKE`, shared) when the count drops to 0 and after every
//!   bump ([`PageWriter::wake_outdated_waiters`]), never on other
//!   decrements: a waiter sleeps (`FUTEX_WAIT` on the value it loaded,
//!   [`PageReader::wait_outdated_tracked`]) until the barrier is satisfied
//!   or the generation moved; the kernel compares the word under its
//!   futex lock, so a change between the load and the wait is never
//!   missed.
//!
//! The file is never replaced, only rewritten in place, so a mapping made at
//! any time stays valid and current across bumps and daemon restarts.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Size of the page file and of the mapping.
pub const PAGE_SIZE: usize = 4096;
/// `"SGID"` read as a little-endian u32.
pub const PAGE_MAGIC: u32 = u32::from_le_bytes(*b"SGID");
/// Version of the layout above.
pub const PAGE_LAYOUT_VERSION: u32 = 2;
/// The first layout with `outdated_tracked` at offset 40.
pub const LAYOUT_WITH_OUTDATED: u32 = 2;
/// `outdated_tracked` of a daemon that stopped cleanly (never a count:
/// the daemon's watcher limit is far below it). The next daemon replaces
/// it at start.
pub const OUTDATED_STOPPED: u32 = u32::MAX;

/// Checks of an unchanging odd `seq` before a reader decides its writer
/// died mid-publish.
const STUCK_ODD_LIMIT: u32 = 20_000;

const OFF_GENERATION: usize = 0;
const OFF_SEQ: usize = 4;
const OFF_MAGIC: usize = 8;
const OFF_LAYOUT: usize = 12;
const OFF_EPOCH: usize = 16;
const OFF_CHANGED: usize = 32;
const OFF_OUTDATED: usize = 40;

/// One consistent view of the page's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageRecord {
    /// The generation.
    pub generation: u32,
    /// The epoch id of that generation.
    pub epoch: [u8; 16],
    /// Wall-clock time of the change, nanoseconds since the Unix epoch (0
    /// if the generation never changed).
    pub changed_unix_ns: u64,
}

/// Errors opening or validating a page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The file could not be opened, sized or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The page file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a generation page.
    #[error("{path} is not a sysgenid generation page: {why}")]
    Invalid {
        /// The page file.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PageError + '_ {
    move |source| PageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Atomic views into a mapped page. Constructed only over a live mapping of
/// at least `PAGE_SIZE` bytes, page-aligned, which outlives it.
struct Fields {
    base: *const u8,
}

impl Fields {
    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= PAGE_SIZE);
        // SAFETY: `base` is the start of a page-aligned mapping of PAGE_SIZE
        // bytes that outlives `self` (see the type's invariant); `off` is
        // 4-aligned and in bounds. Every access to the shared page goes
        // through atomics, so concurrent access from other processes is not
        // a data race from this process's point of view.
        unsafe { &*(self.base.add(off) as *const AtomicU32) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= PAGE_SIZE);
        // SAFETY: as in `u32_at`, with an 8-aligned offset.
        unsafe { &*(self.base.add(off) as *const AtomicU64) }
    }

    fn load_epoch(&self) -> [u8; 16] {
        let mut epoch = [0u8; 16];
        for (i, chunk) in epoch.chunks_exact_mut(4).enumerate() {
            let word = self.u32_at(OFF_EPOCH + 4 * i).load(Ordering::Relaxed);
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        epoch
    }

    /// The fields as they are, without the seqlock (for the writer itself).
    fn raw_record(&self) -> PageRecord {
        PageRecord {
            generation: self.u32_at(OFF_GENERATION).load(Ordering::Acquire),
            epoch: self.load_epoch(),
            changed_unix_ns: self.u64_at(OFF_CHANGED).load(Ordering::Relaxed),
        }
    }

    /// A consistent record. A writer killed between its two `seq` stores
    /// leaves `seq` odd until the next daemon republishes; rather than wait
    /// forever, a reader that sees the *same* odd `seq` for
    /// [`STUCK_ODD_LIMIT`] checks (milliseconds, with yields in between)
    /// takes the fields as they are: the generation word is always a whole
    /// published value; only epoch and time could be from another
    /// publication. A live writer moves `seq` on within nanoseconds, so a
    /// busy writer never triggers this.
    fn record(&self) -> PageRecord {
        let seq = self.u32_at(OFF_SEQ);
        let mut stuck = 0u32;
        let mut last_odd = None;
        loop {
            let before = seq.load(Ordering::Acquire);
            if before & 1 == 1 {
                if last_odd == Some(before) {
                    stuck += 1;
                    if stuck >= STUCK_ODD_LIMIT {
                        return self.raw_record();
                    }
                } else {
                    last_odd = Some(before);
                    stuck = 0;
                }
                if stuck > 64 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let record = self.raw_record();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == before {
                return record;
            }
        }
    }
}

/// The daemon's handle on the page: the only writer.
pub struct PageWriter {
    map: memmap2::MmapMut,
    _file: File,
}

impl PageWriter {
    /// Wraps an open, writable page file owned by the daemon (the daemon
    /// creates it safely, see `sysgenidd`'s runtime directory module). The
    /// file is extended to [`PAGE_SIZE`] if shorter. Existing content is
    /// kept until the first [`publish`](Self::publish).
    pub fn new(file: File, path: &Path) -> Result<PageWriter, PageError> {
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < PAGE_SIZE as u64 {
            file.set_len(PAGE_SIZE as u64).map_err(io_err(path))?;
        }
        // SAFETY: mapping a regular file the daemon owns. Other processes
        // only map it read-only; the daemon is its only writer and accesses
        // the bytes exclusively through atomics (`Fields`). The file is
        // never truncated while mapped.
        let map = unsafe { memmap2::MmapOptions::new().len(PAGE_SIZE).map_mut(&file) }
            .map_err(io_err(path))?;
        Ok(PageWriter { map, _file: file })
    }

    fn fields(&self) -> Fields {
        Fields {
            base: self.map.as_ptr(),
        }
    }

    /// What the page holds now (after a restart: what the previous daemon
    /// last published), if it carries the magic.
    pub fn existing(&self) -> Option<PageRecord> {
        let f = self.fields();
        // No seqlock: we are the only writer, and a predecessor killed
        // mid-publish may have left `seq` odd (publish repairs it).
        (f.u32_at(OFF_MAGIC).load(Ordering::Relaxed) == PAGE_MAGIC).then(|| f.raw_record())
    }

    /// Publishes a record. See the module docs for the ordering.
    pub fn publish(&mut self, record: &PageRecord) {
        let f = self.fields();
        let seq = f.u32_at(OFF_SEQ);
        let s = seq.load(Ordering::Relaxed);
        // A crash between the two stores can leave `seq` odd; make it even
        // first so the odd value below is always a fresh one.
        let s = s.wrapping_add(s & 1);
        seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        f.u32_at(OFF_MAGIC).store(PAGE_MAGIC, Ordering::Relaxed);
        f.u32_at(OFF_LAYOUT)
            .store(PAGE_LAYOUT_VERSION, Ordering::Relaxed);
        for (i, chunk) in record.epoch.chunks_exact(4).enumerate() {
            let word = u32::from_ne_bytes(chunk.try_into().expect("4-byte chunk"));
            f.u32_at(OFF_EPOCH + 4 * i).store(word, Ordering::Relaxed);
        }
        f.u64_at(OFF_CHANGED)
            .store(record.changed_unix_ns, Ordering::Relaxed);
        // The single atomic store readers of bytes 0..4 depend on.
        f.u32_at(OFF_GENERATION)
            .store(record.generation, Ordering::Release);
        seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Stores the count of tracked watchers not yet caught up (`Release`)
    /// and, when it dropped to 0, wakes the waiters on it. Returns whether
    /// it woke them.
    pub fn set_outdated_tracked(&mut self, count: u32) -> bool {
        let fields = self.fields();
        let word = fields.u32_at(OFF_OUTDATED);
        let old = word.swap(count, Ordering::Release);
        let wake = count == 0 && old != 0;
        if wake {
            self.wake_outdated_waiters();
        }
        wake
    }

    /// Wakes every process waiting on `outdated_tracked` (after a bump:
    /// their callers may now be outdated themselves).
    pub fn wake_outdated_waiters(&self) {
        let fields = self.fields();
        let word = fields.u32_at(OFF_OUTDATED);
        // Shared (not FUTEX_PRIVATE): the waiters are other processes
        // mapping the same file. Waking nobody is not an error.
        let _ = rustix::thread::futex::wake(word, rustix::thread::futex::Flags::empty(), u32::MAX);
    }

    /// Flushes the page to its file (tmpfs: a no-op; elsewhere: durability).
    pub fn flush(&self) -> std::io::Result<()> {
        self.map.flush()
    }
}

/// A read-only mapping of the page for zero-syscall checks.
pub struct PageReader {
    map: memmap2::Mmap,
}

impl PageReader {
    /// Maps the page at `path` read-only and checks that it is one. The
    /// file descriptor is closed on return; the mapping stays valid for the
    /// life of the reader, across bumps and daemon restarts.
    pub fn open(path: &Path) -> Result<PageReader, PageError> {
        let file = File::open(path).map_err(io_err(path))?;
        PageReader::from_file(&file, path)
    }

    /// Maps an already opened page file (`path` names it in errors), for a
    /// caller that inspects the descriptor (its owner, its mode) first.
    pub fn from_file(file: &File, path: &Path) -> Result<PageReader, PageError> {
        let len = file.metadata().map_err(io_err(path))?.len();
        if len < PAGE_SIZE as u64 {
            return Err(PageError::Invalid {
                path: path.display().to_string(),
                why: format!("{len} bytes, expected {PAGE_SIZE}"),
            });
        }
        // SAFETY: a read-only shared mapping of a file that its writer
        // never truncates; all reads go through atomics (`Fields`).
        let map = unsafe { memmap2::MmapOptions::new().len(PAGE_SIZE).map(file) }
            .map_err(io_err(path))?;
        let reader = PageReader { map };
        let f = reader.fields();
        let magic = f.u32_at(OFF_MAGIC).load(Ordering::Acquire);
        if magic != PAGE_MAGIC {
            return Err(PageError::Invalid {
                path: path.display().to_string(),
                why: format!("magic {magic:#010x}, expected {PAGE_MAGIC:#010x}"),
            });
        }
        Ok(reader)
    }

    fn fields(&self) -> Fields {
        Fields {
            base: self.map.as_ptr(),
        }
    }

    /// The current generation: one `Acquire` load (a plain `mov` on
    /// x86-64), no system call.
    #[inline]
    pub fn generation(&self) -> u32 {
        self.generation_atomic().load(Ordering::Acquire)
    }

    /// The generation word itself, for callers that want to hold a
    /// reference in a hot path (as AWS-LC holds its pointer).
    #[inline]
    pub fn generation_atomic(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a live, page-aligned PAGE_SIZE mapping owned
        // by `self`; the returned reference borrows `self`.
        unsafe { &*(self.map.as_ptr() as *const AtomicU32) }
    }

    /// A consistent copy of the whole record (seqlock read).
    pub fn record(&self) -> PageRecord {
        self.fields().record()
    }

    /// The page's layout version.
    pub fn layout(&self) -> u32 {
        self.fields().u32_at(OFF_LAYOUT).load(Ordering::Acquire)
    }

    /// Tracked watchers not yet caught up, as last published (`Acquire`);
    /// `None` on a layout 1 page, which does not carry it.
    pub fn outdated_tracked(&self) -> Option<u32> {
        (self.layout() >= LAYOUT_WITH_OUTDATED)
            .then(|| self.fields().u32_at(OFF_OUTDATED).load(Ordering::Acquire))
    }

    /// Sleeps while `outdated_tracked` is `seen`, until the daemon wakes
    /// waiters (the count reached 0, or a bump), `timeout` passes, or a
    /// signal or spurious wake-up; returns at once if the word is no longer
    /// `seen`. The caller loads the word again in any case.
    pub fn wait_outdated_tracked(&self, seen: u32, timeout: std::time::Duration) {
        let fields = self.fields();
        let word = fields.u32_at(OFF_OUTDATED);
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        // EAGAIN (the word changed), ETIMEDOUT and EINTR all mean: look
        // again. A read-only shared mapping may be waited on (FUTEX_WAIT
        // only reads the word).
        let _ = rustix::thread::futex::wait(
            word,
            rustix::thread::futex::Flags::empty(),
            seen,
            Some(&ts),
        );
    }
}

// SAFETY: the readers and writer hold only a mapping; all access to it goes
// through atomics, so sharing or sending them between threads is sound.
unsafe impl Send for PageReader {}
// SAFETY: see above.
unsafe impl Sync for PageReader {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn writer(dir: &Path) -> (PageWriter, std::path::PathBuf) {
        let path = dir.join("generation");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        (PageWriter::new(file, &path).unwrap(), path)
    }

    #[test]
    fn published_record_is_seen_through_a_separate_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        assert_eq!(w.existing(), None, "fresh file has no magic");
        w.publish(&PageRecord::default());
        let r = PageReader::open(&path).unwrap();
        assert_eq!(r.generation(), 0);
        let rec = PageRecord {
            generation: 42,
            epoch: *b"0123456789abcdef",
            changed_unix_ns: 99,
        };
        w.publish(&rec);
        assert_eq!(r.generation(), 42, "mapping held across the update");
        assert_eq!(r.record(), rec);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), PAGE_SIZE as u64);
        let raw = std::fs::read(&path).unwrap();
        assert_eq!(u32::from_ne_bytes(raw[0..4].try_into().unwrap()), 42);
        assert_eq!(&raw[8..12], b"SGID");
    }

    #[test]
    fn a_new_writer_keeps_what_the_old_one_published() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        let rec = PageRecord {
            generation: 7,
            epoch: [1; 16],
            changed_unix_ns: 5,
        };
        w.publish(&rec);
        let reader = PageReader::open(&path).unwrap();
        drop(w);
        let (w2, _) = writer(dir.path());
        assert_eq!(w2.existing(), Some(rec));
        assert_eq!(reader.generation(), 7);
    }

    #[test]
    fn a_writer_killed_mid_publish_does_not_hang_the_next_one_or_readers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        let rec = PageRecord {
            generation: 9,
            epoch: [9; 16],
            changed_unix_ns: 1,
        };
        w.publish(&rec);
        // Leave seq odd, as a crash between the two seq stores would.
        w.fields().u32_at(OFF_SEQ).fetch_add(1, Ordering::Relaxed);
        drop(w);
        let reader = PageReader::open(&path).unwrap();
        assert_eq!(reader.record(), rec, "bounded wait, then the fields");
        let (mut w2, _) = writer(dir.path());
        assert_eq!(w2.existing(), Some(rec));
        w2.publish(&PageRecord {
            generation: 10,
            ..rec
        });
        assert_eq!(reader.record().generation, 10);
        assert_eq!(
            reader.fields().u32_at(OFF_SEQ).load(Ordering::Relaxed) % 2,
            0
        );
    }

    #[test]
    fn outdated_count_is_published_and_wakes_a_waiter_in_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        w.publish(&PageRecord::default());
        let reader = PageReader::open(&path).unwrap();
        assert_eq!(reader.layout(), PAGE_LAYOUT_VERSION);
        assert_eq!(reader.outdated_tracked(), Some(0));
        assert!(!w.set_outdated_tracked(2), "no wake when rising");
        assert!(!w.set_outdated_tracked(1), "no wake on a decrement above 0");
        assert_eq!(reader.outdated_tracked(), Some(1));
        let waiter = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            while let Some(n @ 1..) = reader.outdated_tracked() {
                reader.wait_outdated_tracked(n, std::time::Duration::from_secs(30));
            }
            started.elapsed()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(w.set_outdated_tracked(0), "dropping to 0 wakes");
        let waited = waiter.join().unwrap();
        assert!(
            waited < std::time::Duration::from_secs(30),
            "woken, not timed out"
        );
    }

    #[test]
    fn a_layout_1_page_has_no_outdated_count() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        w.publish(&PageRecord::default());
        w.fields().u32_at(OFF_LAYOUT).store(1, Ordering::Relaxed);
        let reader = PageReader::open(&path).unwrap();
        assert_eq!(reader.outdated_tracked(), None);
    }

    #[test]
    fn non_pages_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        std::fs::write(&short, [0u8; 4]).unwrap();
        assert!(matches!(
            PageReader::open(&short),
            Err(PageError::Invalid { .. })
        ));
        let zero = dir.path().join("zero");
        std::fs::write(&zero, [0u8; PAGE_SIZE]).unwrap();
        let err = PageReader::open(&zero).err().unwrap().to_string();
        assert!(err.contains("magic"), "{err}");
        assert!(PageReader::open(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn seqlock_reader_never_sees_a_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, path) = writer(dir.path());
        w.publish(&PageRecord::default());
        let reader = PageReader::open(&path).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut seen = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let r = reader.record();
                    // The writer derives every field from the generation.
                    assert_eq!(r.epoch, [r.generation as u8; 16]);
                    assert_eq!(r.changed_unix_ns, u64::from(r.generation) * 3);
                    assert!(r.generation >= seen, "went backwards");
                    seen = r.generation;
                }
                seen
            })
        };
        for g in 1..=200_000u32 {
            w.publish(&PageRecord {
                generation: g,
                epoch: [g as u8; 16],
                changed_unix_ns: u64::from(g) * 3,
            });
        }
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }
}
