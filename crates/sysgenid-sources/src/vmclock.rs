//! `vmclock` source: the `vm_generation_counter` in the vmclock shared page
//! (`/dev/vmclock0`).
//!
//! Why this exists: the vmclock device (Linux `ptp_vmclock`, ACPI
//! `AMZNC10C` / CID `VMCLOCK`, exposed by Firecracker 1.15+) gives the guest
//! a page written by the hypervisor. When the hypervisor sets
//! `VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT` it bumps `vm_generation_counter`
//! every time the guest is loaded from a snapshot. Reading that counter is the
//! most direct restore signal there is and needs no log parsing.
//!
//! Layout and protocol follow `include/uapi/linux/vmclock-abi.h`
//! (`struct vmclock_abi`, 112 bytes, little endian):
//!
//! * constant fields `magic` (`0x4b4c4356`, "VCLK"), `size` (of the region,
//!   must be at least the struct size), `version` (1) are checked first;
//! * the rest is protected by a seqlock, `seq_count`: odd means an update is
//!   in progress. We read `seq_count`, the fields, an acquire fence, and
//!   `seq_count` again, and retry (bounded, [`SEQ_RETRIES`]) until both reads
//!   are equal and even;
//! * `vm_generation_counter` is only meaningful with
//!   `VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT` (bit 8); without it the source is
//!   inactive.
//!
//! Waiting: when the device sets `VMCLOCK_FLAG_NOTIFICATION_PRESENT` (bit 9,
//! Linux 7.0+) the hypervisor notifies every time `seq_count` becomes a new
//! even value and the driver turns that into `POLLIN` on the device file; the
//! file's "last seen" `seq_count` is updated by `read()`, so after each wake
//! we `pread()` the structure before re-checking. Without notifications (or
//! when the path is not a character device, e.g. a test file) the page is
//! re-read every [`SourceConfig::vmclock_interval`](crate::SourceConfig)
//! (default [`DEFAULT_INTERVAL`], 1 s): a restore is then seen at most one
//! interval late.
//!
//! The page is mapped read-only (the driver refuses anything else) and only
//! ever accessed through atomic loads on raw pointers, never through Rust
//! references, since the hypervisor writes it concurrently.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};

use crate::{Source, SourceError, SourceEvent};

/// Source name.
pub const NAME: &str = "vmclock";
/// Default device path.
pub const DEFAULT_PATH: &str = "/dev/vmclock0";
/// Default re-check interval when the device has no notifications.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

/// `VMCLOCK_MAGIC`, "VCLK" little endian.
pub const VMCLOCK_MAGIC: u32 = 0x4b4c_4356;
/// Supported `version`.
pub const VMCLOCK_VERSION: u16 = 1;
/// `sizeof(struct vmclock_abi)`.
pub const VMCLOCK_ABI_SIZE: usize = 112;
/// `VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT`.
pub const FLAG_VM_GEN_COUNTER_PRESENT: u64 = 1 << 8;
/// `VMCLOCK_FLAG_NOTIFICATION_PRESENT`.
pub const FLAG_NOTIFICATION_PRESENT: u64 = 1 << 9;
/// Seqlock read attempts before [`VmclockError::SeqlockTimeout`].
pub const SEQ_RETRIES: u32 = 1000;

/// Field offsets in `struct vmclock_abi`.
pub mod offsets {
    /// `__le32 magic`
    pub const MAGIC: usize = 0;
    /// `__le32 size`
    pub const SIZE: usize = 4;
    /// `__le16 version` (followed by `counter_id`, `time_type`)
    pub const VERSION: usize = 8;
    /// `__le32 seq_count`
    pub const SEQ_COUNT: usize = 12;
    /// `__le64 disruption_marker`
    pub const DISRUPTION_MARKER: usize = 16;
    /// `__le64 flags`
    pub const FLAGS: usize = 24;
    /// `__u8 clock_status`
    pub const CLOCK_STATUS: usize = 34;
    /// `__le64 vm_generation_counter`
    pub const VM_GENERATION_COUNTER: usize = 104;
}

/// A consistent read of the fields this crate uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmclockSnapshot {
    /// `size` field.
    pub size: u32,
    /// `seq_count` the fields were read under (even).
    pub seq_count: u32,
    /// `flags` field.
    pub flags: u64,
    /// `disruption_marker` (changes on live migration *and* restore).
    pub disruption_marker: u64,
    /// `vm_generation_counter`, `None` unless
    /// [`FLAG_VM_GEN_COUNTER_PRESENT`] is set.
    pub vm_generation_counter: Option<u64>,
}

impl VmclockSnapshot {
    /// Whether the device notifies (`poll()`) on updates.
    pub fn notification_present(&self) -> bool {
        self.flags & FLAG_NOTIFICATION_PRESENT != 0
    }
}

/// Why the page cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmclockError {
    /// Fewer bytes than `struct vmclock_abi`.
    #[error("page is {len} bytes, smaller than struct vmclock_abi ({VMCLOCK_ABI_SIZE} bytes)")]
    TooShort {
        /// Bytes available.
        len: usize,
    },
    /// Not a vmclock page.
    #[error("bad magic {found:#010x}, expected {VMCLOCK_MAGIC:#010x} (\"VCLK\")")]
    BadMagic {
        /// Magic found.
        found: u32,
    },
    /// `size` field smaller than the structure.
    #[error("size field {size} is smaller than struct vmclock_abi ({VMCLOCK_ABI_SIZE} bytes)")]
    BadSize {
        /// Size found.
        size: u32,
    },
    /// Unknown ABI version.
    #[error("unsupported vmclock_abi version {found}, expected {VMCLOCK_VERSION}")]
    BadVersion {
        /// Version found.
        found: u16,
    },
    /// `seq_count` stayed odd or kept changing.
    #[error("no consistent read after {retries} attempts (seq_count odd or changing: hypervisor update in progress)")]
    SeqlockTimeout {
        /// Attempts made.
        retries: u32,
    },
}

/// Read access to a vmclock page: a plain byte slice, or the live mapping.
trait PageAccess {
    fn len(&self) -> usize;
    /// Little-endian u32 at an aligned `off`, with acquire ordering.
    fn u32_at(&self, off: usize) -> u32;
    /// Little-endian u64 at an aligned `off`, relaxed.
    fn u64_at(&self, off: usize) -> u64;
}

impl PageAccess for [u8] {
    fn len(&self) -> usize {
        <[u8]>::len(self)
    }
    fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self[off..off + 4]);
        u32::from_le_bytes(b)
    }
    fn u64_at(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self[off..off + 8]);
        u64::from_le_bytes(b)
    }
}

/// Live, concurrently written memory (the mapped device page).
struct RawPage<'a> {
    map: &'a MmapRaw,
}

impl PageAccess for RawPage<'_> {
    fn len(&self) -> usize {
        self.map.len()
    }
    fn u32_at(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.map.len() && off % 4 == 0);
        let ptr = self.map.as_ptr().wrapping_add(off);
        debug_assert_eq!(ptr as usize % 4, 0);
        // SAFETY: `ptr` is inside the live mapping (checked above; the map
        // is borrowed for `'a`) and 4-byte aligned (page-aligned base, offset
        // multiple of 4). The memory is only written by the hypervisor / other
        // processes, never through Rust references in this process, and only
        // loaded here (atomic loads on read-only memory are allowed).
        let v =
            unsafe { AtomicU32::from_ptr(ptr.cast::<u32>().cast_mut()) }.load(Ordering::Acquire);
        u32::from_le(v)
    }
    fn u64_at(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.map.len() && off % 8 == 0);
        let ptr = self.map.as_ptr().wrapping_add(off);
        debug_assert_eq!(ptr as usize % 8, 0);
        // SAFETY: as in `u32_at`, with 8-byte alignment (offset multiple of 8).
        let v =
            unsafe { AtomicU64::from_ptr(ptr.cast::<u64>().cast_mut()) }.load(Ordering::Relaxed);
        u64::from_le(v)
    }
}

fn read_page<P: PageAccess + ?Sized>(p: &P) -> Result<VmclockSnapshot, VmclockError> {
    if p.len() < VMCLOCK_ABI_SIZE {
        return Err(VmclockError::TooShort { len: p.len() });
    }
    let magic = p.u32_at(offsets::MAGIC);
    if magic != VMCLOCK_MAGIC {
        return Err(VmclockError::BadMagic { found: magic });
    }
    let size = p.u32_at(offsets::SIZE);
    if (size as usize) < VMCLOCK_ABI_SIZE {
        return Err(VmclockError::BadSize { size });
    }
    // Low 16 bits of the little-endian word at 8 are `version`.
    let version = (p.u32_at(offsets::VERSION) & 0xffff) as u16;
    if version != VMCLOCK_VERSION {
        return Err(VmclockError::BadVersion { found: version });
    }
    for attempt in 0..SEQ_RETRIES {
        let seq = p.u32_at(offsets::SEQ_COUNT); // acquire
        if seq & 1 == 0 {
            let flags = p.u64_at(offsets::FLAGS);
            let disruption_marker = p.u64_at(offsets::DISRUPTION_MARKER);
            let counter = p.u64_at(offsets::VM_GENERATION_COUNTER);
            // Order the field loads before the re-read of seq_count
            // (pairs with the writer's barrier before making seq even).
            fence(Ordering::Acquire);
            if p.u32_at(offsets::SEQ_COUNT) == seq {
                return Ok(VmclockSnapshot {
                    size,
                    seq_count: seq,
                    flags,
                    disruption_marker,
                    vm_generation_counter: (flags & FLAG_VM_GEN_COUNTER_PRESENT != 0)
                        .then_some(counter),
                });
            }
        }
        if attempt < 100 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    Err(VmclockError::SeqlockTimeout {
        retries: SEQ_RETRIES,
    })
}

/// Validate and read a vmclock page from bytes (e.g. a copy of the page, or
/// fuzzer input). Never panics.
pub fn read_vmclock(page: &[u8]) -> Result<VmclockSnapshot, VmclockError> {
    read_page(page)
}

/// A read-only mapping of the vmclock page.
#[derive(Debug)]
pub struct VmclockMapping {
    file: File,
    map: MmapRaw,
    char_device: bool,
}

impl VmclockMapping {
    /// Open `path` read-only and map its first page (or the whole file, if a
    /// regular file is shorter than a page).
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let unavailable = |reason: String| SourceError::Unavailable { name: NAME, reason };
        let file = File::open(path).map_err(|e| {
            unavailable(if e.kind() == io::ErrorKind::NotFound {
                format!("{} not found", path.display())
            } else {
                format!("cannot open {}: {e}", path.display())
            })
        })?;
        let meta = file
            .metadata()
            .map_err(|e| SourceError::io(format!("stat {}", path.display()), e))?;
        let page = rustix::param::page_size();
        let char_device = meta.file_type().is_char_device();
        let len = if meta.is_file() {
            usize::try_from(meta.len()).unwrap_or(usize::MAX).min(page)
        } else {
            page
        };
        if len < VMCLOCK_ABI_SIZE {
            return Err(unavailable(format!(
                "{}: {}",
                path.display(),
                VmclockError::TooShort { len }
            )));
        }
        let map = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&file)
            .map_err(|e| SourceError::io(format!("mapping {}", path.display()), e))?;
        Ok(VmclockMapping {
            file,
            map,
            char_device,
        })
    }

    /// Consistent read of the live page.
    pub fn read(&self) -> Result<VmclockSnapshot, VmclockError> {
        read_page(&RawPage { map: &self.map })
    }
}

/// How the source waits between checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitMode {
    /// `poll()` on the device (`VMCLOCK_FLAG_NOTIFICATION_PRESENT`).
    Poll,
    /// Re-read every interval.
    Interval(Duration),
}

/// The `vmclock` source.
#[derive(Debug)]
pub struct VmclockSource {
    path: PathBuf,
    mapping: VmclockMapping,
    interval: Duration,
    mode: WaitMode,
    last_counter: u64,
}

impl VmclockSource {
    /// Open and validate the page; records the current generation counter as
    /// the baseline. Fails with [`SourceError::Unavailable`] when the device
    /// is missing, invalid, or has no generation counter.
    pub fn open(path: &Path, interval: Duration) -> Result<Self, SourceError> {
        let mapping = VmclockMapping::open(path)?;
        let unavailable = |reason: String| SourceError::Unavailable { name: NAME, reason };
        let snap = mapping
            .read()
            .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let Some(counter) = snap.vm_generation_counter else {
            return Err(unavailable(format!(
                "{}: VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT not set (no generation counter; \
                 valid vmclock_abi, flags {:#x})",
                path.display(),
                snap.flags
            )));
        };
        let mode = if snap.notification_present() && mapping.char_device {
            WaitMode::Poll
        } else {
            WaitMode::Interval(interval)
        };
        Ok(VmclockSource {
            path: path.to_owned(),
            mapping,
            interval,
            mode,
            last_counter: counter,
        })
    }

    /// How this source waits.
    pub fn wait_mode(&self) -> WaitMode {
        self.mode
    }

    /// The generation counter last seen.
    pub fn last_counter(&self) -> u64 {
        self.last_counter
    }

    /// Re-read the page; returns an event if the counter changed since the
    /// last check (or since open).
    pub fn check(&mut self) -> Result<Option<SourceEvent>, SourceError> {
        let snap = self.mapping.read()?;
        let Some(counter) = snap.vm_generation_counter else {
            return Err(SourceError::Unavailable {
                name: NAME,
                reason: format!(
                    "{}: VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT was cleared",
                    self.path.display()
                ),
            });
        };
        if counter == self.last_counter {
            return Ok(None);
        }
        let old = std::mem::replace(&mut self.last_counter, counter);
        tracing::info!(
            source = NAME,
            old,
            new = counter,
            "vm_generation_counter changed"
        );
        Ok(Some(SourceEvent {
            source: NAME,
            detail: format!("vm_generation_counter changed {old} -> {counter}"),
            kernel_time_us: None,
        }))
    }

    /// Block until the page may have changed.
    fn wait(&mut self) -> Result<(), SourceError> {
        match self.mode {
            WaitMode::Interval(d) => {
                std::thread::sleep(d);
                Ok(())
            }
            WaitMode::Poll => {
                use rustix::event::{poll, PollFd, PollFlags};
                let mut fds = [PollFd::new(&self.mapping.file, PollFlags::IN)];
                match poll(&mut fds, None) {
                    Ok(_) => {}
                    Err(rustix::io::Errno::INTR) => return Ok(()),
                    Err(e) => {
                        return Err(SourceError::io(
                            format!("poll {}", self.path.display()),
                            e.into(),
                        ))
                    }
                }
                let revents = fds[0].revents();
                if revents.intersects(PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL) {
                    tracing::warn!(
                        source = NAME,
                        ?revents,
                        interval = ?self.interval,
                        "vmclock poll() not usable; re-checking on an interval instead"
                    );
                    self.mode = WaitMode::Interval(self.interval);
                    return Ok(());
                }
                // read() updates the file's last-seen seq_count; without it
                // every later poll() returns at once.
                let mut buf = [0u8; VMCLOCK_ABI_SIZE];
                if let Err(e) = self.mapping.file.read_at(&mut buf, 0) {
                    tracing::warn!(source = NAME, error = %e, "vmclock read() failed after poll");
                    std::thread::sleep(self.interval);
                }
                Ok(())
            }
        }
    }
}

impl Source for VmclockSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        match self.mode {
            WaitMode::Poll => format!(
                "{} vm_generation_counter (poll notifications)",
                self.path.display()
            ),
            WaitMode::Interval(d) => format!(
                "{} vm_generation_counter (re-checked every {d:?})",
                self.path.display()
            ),
        }
    }

    fn into_poll_source(self: Box<Self>) -> Result<Box<dyn crate::PollSource>, Box<dyn Source>> {
        Err(self) // waits in its own thread
    }

    fn run(mut self: Box<Self>, emit: &mut dyn FnMut(SourceEvent)) -> Result<(), SourceError> {
        loop {
            self.wait()?;
            match self.check() {
                Ok(Some(ev)) => emit(ev),
                Ok(None) => {}
                Err(SourceError::Vmclock(e @ VmclockError::SeqlockTimeout { .. })) => {
                    tracing::warn!(source = NAME, error = %e, "vmclock read failed; retrying");
                    std::thread::sleep(self.interval.min(Duration::from_millis(100)));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::sync::atomic::AtomicBool;
    use std::sync::{mpsc, Arc};

    /// Builds a page laid out exactly like `struct vmclock_abi`.
    struct PageBuilder {
        bytes: Vec<u8>,
    }

    impl PageBuilder {
        fn new(len: usize) -> Self {
            let mut p = PageBuilder {
                bytes: vec![0; len],
            };
            p.u32(offsets::MAGIC, VMCLOCK_MAGIC)
                .u32(offsets::SIZE, 4096)
                .u16(offsets::VERSION, VMCLOCK_VERSION);
            p.bytes[10] = 0xff; // counter_id = VMCLOCK_COUNTER_INVALID
            p.bytes[11] = 0; // time_type = UTC
            p.u32(offsets::SEQ_COUNT, 2)
                .u64(offsets::FLAGS, FLAG_VM_GEN_COUNTER_PRESENT)
                .u64(offsets::VM_GENERATION_COUNTER, 5);
            p
        }
        fn u16(&mut self, off: usize, v: u16) -> &mut Self {
            self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
            self
        }
        fn u32(&mut self, off: usize, v: u32) -> &mut Self {
            self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
            self
        }
        fn u64(&mut self, off: usize, v: u64) -> &mut Self {
            self.bytes[off..off + 8].copy_from_slice(&v.to_le_bytes());
            self
        }
        fn file(&self) -> tempfile::NamedTempFile {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(&self.bytes).unwrap();
            f.flush().unwrap();
            f
        }
    }

    /// A writable shared mapping of the test file: the "hypervisor".
    struct Writer {
        map: MmapRaw,
    }

    impl Writer {
        fn new(file: &tempfile::NamedTempFile) -> Self {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(file.path())
                .unwrap();
            Writer {
                map: MmapOptions::new().map_raw(&f).unwrap(),
            }
        }
        fn a32(&self, off: usize) -> &AtomicU32 {
            assert!(off + 4 <= self.map.len() && off % 4 == 0);
            // SAFETY: in bounds, aligned, mapping outlives the reference, and
            // the page is only accessed atomically by the tests.
            unsafe { AtomicU32::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
        }
        fn a64(&self, off: usize) -> &AtomicU64 {
            assert!(off + 8 <= self.map.len() && off % 8 == 0);
            // SAFETY: as in `a32`.
            unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().add(off).cast()) }
        }
        /// Seqlock-protected update, the way a hypervisor does it.
        fn update(&self, counter: u64, marker: u64) {
            let seq = self.a32(offsets::SEQ_COUNT);
            let s = seq.load(Ordering::Relaxed);
            seq.store(s.wrapping_add(1), Ordering::Relaxed);
            fence(Ordering::Release);
            self.a64(offsets::VM_GENERATION_COUNTER)
                .store(counter.to_le(), Ordering::Relaxed);
            std::hint::spin_loop();
            self.a64(offsets::DISRUPTION_MARKER)
                .store(marker.to_le(), Ordering::Relaxed);
            seq.store(s.wrapping_add(2), Ordering::Release);
        }
    }

    #[test]
    fn reads_valid_page() {
        let s = read_vmclock(&PageBuilder::new(4096).bytes).unwrap();
        assert_eq!(
            s,
            VmclockSnapshot {
                size: 4096,
                seq_count: 2,
                flags: FLAG_VM_GEN_COUNTER_PRESENT,
                disruption_marker: 0,
                vm_generation_counter: Some(5),
            }
        );
        assert!(!s.notification_present());
        // exactly the struct size is enough
        let mut p = PageBuilder::new(VMCLOCK_ABI_SIZE);
        p.u32(offsets::SIZE, VMCLOCK_ABI_SIZE as u32);
        assert!(read_vmclock(&p.bytes).is_ok());
    }

    #[test]
    fn refuses_bad_pages_with_clear_errors() {
        let e = read_vmclock(&PageBuilder::new(4096).bytes[..100]).unwrap_err();
        assert_eq!(e, VmclockError::TooShort { len: 100 });
        assert!(e.to_string().contains("112"), "{e}");

        let mut p = PageBuilder::new(4096);
        p.u32(offsets::MAGIC, 0x1234_5678);
        let e = read_vmclock(&p.bytes).unwrap_err();
        assert_eq!(e, VmclockError::BadMagic { found: 0x1234_5678 });
        assert_eq!(
            e.to_string(),
            "bad magic 0x12345678, expected 0x4b4c4356 (\"VCLK\")"
        );

        let mut p = PageBuilder::new(4096);
        p.u32(offsets::SIZE, 64);
        assert_eq!(
            read_vmclock(&p.bytes).unwrap_err(),
            VmclockError::BadSize { size: 64 }
        );

        let mut p = PageBuilder::new(4096);
        p.u16(offsets::VERSION, 2);
        let e = read_vmclock(&p.bytes).unwrap_err();
        assert_eq!(e, VmclockError::BadVersion { found: 2 });
        assert!(e.to_string().contains("version 2"), "{e}");

        let mut p = PageBuilder::new(4096);
        p.u32(offsets::SEQ_COUNT, 7);
        assert_eq!(
            read_vmclock(&p.bytes).unwrap_err(),
            VmclockError::SeqlockTimeout {
                retries: SEQ_RETRIES
            }
        );
    }

    #[test]
    fn counter_absent_flag() {
        let mut p = PageBuilder::new(4096);
        p.u64(offsets::FLAGS, FLAG_NOTIFICATION_PRESENT);
        let s = read_vmclock(&p.bytes).unwrap();
        assert_eq!(s.vm_generation_counter, None);
        assert!(s.notification_present());

        let f = p.file();
        let e = VmclockSource::open(f.path(), DEFAULT_INTERVAL).unwrap_err();
        match e {
            SourceError::Unavailable { name, reason } => {
                assert_eq!(name, "vmclock");
                assert!(
                    reason.contains("VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT not set"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // And select("auto") reports it as inactive with that reason.
        let cfg = crate::SourceConfig {
            kmsg_path: "/nonexistent".into(),
            vmclock_path: f.path().to_owned(),
            vmclock_interval: DEFAULT_INTERVAL,
        };
        let sel = crate::select("auto", &cfg).unwrap();
        let (_, reason) = sel.inactive.iter().find(|(n, _)| *n == "vmclock").unwrap();
        assert!(reason.contains("GEN_COUNTER_PRESENT"), "{reason}");
    }

    #[test]
    fn mapped_file_validation() {
        let mut p = PageBuilder::new(4096);
        p.u32(offsets::MAGIC, 0);
        let f = p.file();
        let e = VmclockSource::open(f.path(), DEFAULT_INTERVAL).unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");

        let short = tempfile::NamedTempFile::new().unwrap();
        let e = VmclockSource::open(short.path(), DEFAULT_INTERVAL).unwrap_err();
        assert!(
            e.to_string().contains("smaller than struct vmclock_abi"),
            "{e}"
        );

        let e =
            VmclockSource::open(Path::new("/nonexistent/vmclock0"), DEFAULT_INTERVAL).unwrap_err();
        assert_eq!(
            e.to_string(),
            "source vmclock is unavailable: /nonexistent/vmclock0 not found"
        );
    }

    #[test]
    fn counter_change_detected_by_check() {
        let mut p = PageBuilder::new(4096);
        // Notifications advertised, but a regular file cannot poll: interval.
        p.u64(
            offsets::FLAGS,
            FLAG_VM_GEN_COUNTER_PRESENT | FLAG_NOTIFICATION_PRESENT,
        );
        let f = p.file();
        let mut src = VmclockSource::open(f.path(), Duration::from_millis(5)).unwrap();
        assert_eq!(
            src.wait_mode(),
            WaitMode::Interval(Duration::from_millis(5))
        );
        assert_eq!(src.last_counter(), 5);
        assert_eq!(src.check().unwrap(), None);
        let w = Writer::new(&f);
        w.update(6, 1);
        let ev = src.check().unwrap().unwrap();
        assert_eq!(ev.source, "vmclock");
        assert_eq!(ev.detail, "vm_generation_counter changed 5 -> 6");
        assert_eq!(src.check().unwrap(), None);
        // Only the disruption marker changes (live migration): no event.
        w.update(6, 2);
        assert_eq!(src.check().unwrap(), None);
        // Flag cleared: unrecoverable.
        w.a64(offsets::FLAGS).store(0, Ordering::Relaxed);
        assert!(matches!(src.check(), Err(SourceError::Unavailable { .. })));
    }

    #[test]
    fn run_emits_on_change() {
        let f = PageBuilder::new(4096).file();
        let src = VmclockSource::open(f.path(), Duration::from_millis(5)).unwrap();
        assert!(
            src.describe().contains("re-checked every 5ms"),
            "{}",
            src.describe()
        );
        let (tx, rx) = mpsc::channel();
        // The source thread runs until the test process exits.
        std::thread::spawn(move || {
            let _ = Box::new(src).run(&mut |ev| {
                let _ = tx.send(ev);
            });
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(rx.try_recv().is_err(), "no event before a change");
        let w = Writer::new(&f);
        w.update(9, 9);
        let ev = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(ev.detail, "vm_generation_counter changed 5 -> 9");
        w.update(10, 10);
        let ev = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(ev.detail, "vm_generation_counter changed 9 -> 10");
    }

    /// A writer thread updates two fields under the seqlock, stalling while
    /// `seq_count` is odd; readers of the mapping must never see them differ.
    #[test]
    fn concurrent_writer_no_torn_reads() {
        let f = PageBuilder::new(4096).file();
        let mapping = VmclockMapping::open(f.path()).unwrap();
        let w = Writer::new(&f);
        w.update(1, 1);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut k = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    w.update(k, k);
                    if k % 64 == 0 {
                        std::thread::yield_now();
                    }
                }
                k
            })
        };
        let (mut ok, mut timeouts) = (0u32, 0u32);
        let mut last = 0;
        // At least 20 000 reads, and on until the writer has really run
        // concurrently (on a busy 2-CPU machine it may not get a CPU at
        // first), with a 10 s bound.
        let started = std::time::Instant::now();
        let mut reads = 0u32;
        while reads < 20_000
            || (last < 100 && started.elapsed() < std::time::Duration::from_secs(10))
        {
            reads += 1;
            match mapping.read() {
                Ok(s) => {
                    let c = s.vm_generation_counter.unwrap();
                    assert_eq!(c, s.disruption_marker, "torn read: {s:?}");
                    assert_eq!(s.seq_count % 2, 0);
                    assert!(c >= last, "counter went backwards");
                    last = c;
                    ok += 1;
                }
                Err(VmclockError::SeqlockTimeout { .. }) => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        eprintln!("reads ok {ok}, timeouts {timeouts}, writes {writes}");
        assert!(ok > 0);
        assert!(writes > 1);
    }

    proptest! {
        #[test]
        fn read_vmclock_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = read_vmclock(&bytes);
        }

        #[test]
        fn read_vmclock_never_panics_near_valid(
            tail in proptest::collection::vec(any::<u8>(), 0..200),
            size in any::<u32>(), word8 in any::<u32>(), seq in any::<u32>(),
        ) {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&VMCLOCK_MAGIC.to_le_bytes());
            bytes.extend_from_slice(&size.to_le_bytes());
            bytes.extend_from_slice(&(word8 & 0xffff_0000 | 1).to_le_bytes());
            bytes.extend_from_slice(&seq.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(s) = read_vmclock(&bytes) {
                prop_assert!(s.seq_count % 2 == 0 && s.size as usize >= VMCLOCK_ABI_SIZE);
            }
        }
    }
}
