//! `/dev/sysgenid`: the seed's device ABI served through FUSE.
//!
//! The daemon mounts a FUSE filesystem whose root is a regular file onto
//! the device path (an empty regular file, created if missing) and answers
//! the protocol itself ([`fuse`]). Every open handle is a watcher in the
//! same [`Core`] as the socket clients, so status, bumps, acks and the
//! barrier see both kinds alike. Design notes, the deviations from a real
//! character device and measured latencies are in `docs/device.md`.
//!
//! # Threads
//! A reader thread reads requests from `/dev/fuse`. It answers on its own
//! what needs no state (attributes, flush, page-cache fills of the mapping
//! in fallback mode) and forwards the rest to the event loop as
//! [`Command::Device`]. The loop owns [`Device`] and answers by writing to
//! the same descriptor (replies are whole messages, safe from any thread).
//! Requests that must wait (a blocking `read`, `SYSGENID_WAIT_WATCHERS`)
//! are *parked*: remembered by their `unique` and answered later, on a
//! bump, an ack, a close, a deadline, or `FUSE_INTERRUPT` (→ `EINTR`).
//! Because one channel carries every request to the loop in order, an
//! interrupt always arrives after the request it names.
//!
//! # The mapping
//! With FUSE passthrough (Linux 6.9+), every open names the page file
//! `<runtime dir>/generation` as its backing file, while `FOPEN_DIRECT_IO`
//! keeps `read`/`write` coming to us: `mmap` maps the page file itself.
//! Mapped readers see a bump the instant the page is published, and a
//! mapping outlives the daemon (killed or not) with no `SIGBUS`, staying
//! current across restarts. Without passthrough the mapping is FUSE page
//! cache (`FUSE_DIRECT_IO_ALLOW_MMAP`): fills are answered from the page,
//! and each bump invalidates the cache before any watcher wakes.

pub mod access;
pub mod fuse;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sysgenid_core::{Barrier, Core, CoreError, Tracking, WatcherId};

use sysgenid_page::{PageRecord, PageWriter};

use crate::runtime_dir::RuntimeDir;
use crate::server::{Command, Limits, LoopHandle};
use crate::service::BumpError;
pub use access::WriteAccess;
use fuse::{opcode, Channel, Op, Request};

/// `SYSGENID_IOCTL`, the seed's ioctl type.
pub const SYSGENID_IOCTL: u32 = 0x2d;
/// `SYSGENID_GET_OUTDATED_WATCHERS` = `_IO(0x2d, 1)`.
pub const SYSGENID_GET_OUTDATED_WATCHERS: u32 = SYSGENID_IOCTL << 8 | 1;
/// `SYSGENID_WAIT_WATCHERS` = `_IO(0x2d, 2)`; arg: timeout in ms, 0 = none.
pub const SYSGENID_WAIT_WATCHERS: u32 = SYSGENID_IOCTL << 8 | 2;
/// `SYSGENID_FORCE_GEN_UPDATE` = `_IO(0x2d, 3)`; arg: minimum generation.
pub const SYSGENID_FORCE_GEN_UPDATE: u32 = SYSGENID_IOCTL << 8 | 3;

/// The default device path.
pub const DEFAULT_PATH: &str = "/dev/sysgenid";

/// What `--device` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `off`.
    Off,
    /// Not given: `/dev/sysgenid` when root and the path is free.
    Default,
    /// A path.
    Path(PathBuf),
}

impl Setting {
    /// Parses the flag's value (`off` or a path).
    pub fn parse(value: Option<&str>) -> Setting {
        match value {
            None | Some("") => Setting::Default,
            Some("off") | Some("none") => Setting::Off,
            Some(path) => Setting::Path(PathBuf::from(path)),
        }
    }
}

/// How `mmap` of the device is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmapMode {
    /// FUSE passthrough to the page file (`backing_id`).
    Passthrough(i32),
    /// FUSE page cache filled from the page, invalidated on bumps.
    PageCache,
}

/// One open handle: a watcher.
struct Handle {
    watcher: WatcherId,
    uid: u32,
    /// The kernel's poll handle, when it asked to be notified.
    poll_kh: Option<u64>,
}

struct ParkedWait {
    unique: u64,
    fh: u64,
    deadline: Option<Instant>,
}

/// What the loop must do after a device request.
#[derive(Debug, Default)]
pub struct Effect {
    /// A watcher was acknowledged or released: re-evaluate barrier waits.
    pub settle: bool,
    /// A privileged `SYSGENID_FORCE_GEN_UPDATE`: bump to at least `.1`,
    /// then call [`Device::answer_bump`] with `.0`.
    pub bump: Option<(u64, u32)>,
}

/// The device frontend, owned by the event loop.
pub struct Device {
    fuse: Arc<OwnedFd>,
    /// The device page: what mappings of the device show.
    mirror: PageWriter,
    path: PathBuf,
    mmap: MmapMode,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Parked blocking reads: (unique, fh).
    reads: Vec<(u64, u64)>,
    waits: Vec<ParkedWait>,
    /// Who may open for writing.
    access: WriteAccess,
}

/// A request forwarded by the reader thread.
#[derive(Debug)]
pub struct DeviceRequest(Request);

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Why there is no device, for the startup line.
pub type Disabled = String;

/// Decides the mount point from the setting; `Err` is a reason to run
/// without the device (`Ok(None)` from [`Device::start`]), or, for an
/// explicit path, a fatal error.
fn resolve(setting: &Setting) -> Result<PathBuf, (bool, String)> {
    match setting {
        Setting::Off => Err((false, "off (--device off)".into())),
        Setting::Path(p) => Ok(p.clone()),
        Setting::Default => {
            if !rustix::process::geteuid().is_root() {
                return Err((
                    false,
                    "off (not root; pass --device PATH to serve one)".into(),
                ));
            }
            let p = PathBuf::from(DEFAULT_PATH);
            match check_mount_point(&p) {
                Ok(_) => Ok(p),
                Err(why) => Err((false, format!("off ({DEFAULT_PATH} is not free: {why})"))),
            }
        }
    }
}

/// What is at the mount point now.
enum MountPoint {
    Absent,
    EmptyFile,
    /// A FUSE mount whose server is gone (`ENOTCONN`).
    Stale,
}

fn check_mount_point(path: &Path) -> Result<MountPoint, String> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MountPoint::Absent),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(MountPoint::Stale),
        Err(e) => Err(format!("cannot inspect it: {e}")),
        Ok(md) => {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let parent_dev = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| m.dev());
            if parent_dev.is_some_and(|d| d != md.dev()) {
                // Attributes may come from the kernel's cache even when the
                // server is gone; an open reaches the server and tells.
                if std::fs::File::open(path)
                    .is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN))
                {
                    return Ok(MountPoint::Stale);
                }
                return Err(
                    "something is already mounted on it (another sysgenidd?); stop it first".into(),
                );
            }
            if md.file_type().is_char_device() {
                return Err("it is a character device (the kernel driver?)".into());
            }
            if !md.file_type().is_file() {
                return Err("it is not a regular file".into());
            }
            if md.len() != 0 {
                return Err(format!(
                    "it is a regular file of {} bytes, not an empty mount point",
                    md.len()
                ));
            }
            Ok(MountPoint::EmptyFile)
        }
    }
}

impl Device {
    /// Mounts the device (unless off) and starts its reader thread.
    /// `Ok(Err(why))`: running without the device, and why.
    pub fn start(
        setting: &Setting,
        dir: &RuntimeDir,
        record: &PageRecord,
        handle: LoopHandle,
        access: WriteAccess,
    ) -> Result<Result<Device, Disabled>, String> {
        let path = match resolve(setting) {
            Ok(p) => p,
            Err((_, why)) => return Ok(Err(why)),
        };
        if !Path::new("/dev/fuse").exists() {
            return Ok(Err(format!(
                "off (/dev/fuse is missing, so {} cannot be served; load the fuse module)",
                path.display()
            )));
        }
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            format!(
                "cannot serve the device {}: {what}: {e} (pass --device off to run without it)",
                path.display()
            )
        };
        match check_mount_point(&path).map_err(|why| fail("refusing the mount point", &why))? {
            MountPoint::Stale => {
                tracing::warn!(
                    "replacing the stale device mount on {} left by a daemon that died",
                    path.display()
                );
                fuse::unmount(&path).map_err(|e| fail("detaching the stale mount", &e))?;
                if let MountPoint::Absent =
                    check_mount_point(&path).map_err(|why| fail("after detaching", &why))?
                {
                    create_mount_point(&path).map_err(|e| fail("creating", &e))?;
                }
            }
            MountPoint::Absent => create_mount_point(&path).map_err(|e| fail("creating", &e))?,
            MountPoint::EmptyFile => {}
        }
        let (mut mirror, page) =
            open_device_page(dir).map_err(|e| fail("preparing the device page", &e))?;
        mirror.publish(record);
        let fd = fuse::mount(&path, access.kernel_checked()).map_err(|e| fail("mount", &e))?;
        let mmap = match handshake(&fd, &page) {
            Ok(mode) => mode,
            Err(e) => {
                let _ = fuse::unmount(&path);
                return Err(fail("FUSE handshake", &e));
            }
        };
        let fuse = Arc::new(fd);
        let reader_fd = fuse.clone();
        std::thread::Builder::new()
            .name("device".into())
            .spawn({
                let (mode, gid) = (access.file_mode(), access.file_gid());
                move || reader(reader_fd, page, handle, mode, gid)
            })
            .map_err(|e| fail("starting its thread", &e))?;
        // The root inode starts with size 0 until its first GETATTR, and a
        // mapping touched before that would fault (SIGBUS) in page-cache
        // mode: fetch the attributes now (answered by the reader thread).
        std::fs::metadata(&path).map_err(|e| fail("checking the mount", &e))?;
        Ok(Ok(Device {
            fuse,
            mirror,
            path,
            mmap,
            handles: HashMap::new(),
            next_fh: 1,
            reads: Vec::new(),
            waits: Vec::new(),
            access,
        }))
    }

    /// For status and the startup line.
    pub fn describe(&self) -> String {
        format!(
            "{} (FUSE, mmap {}, {})",
            self.path.display(),
            match self.mmap {
                MmapMode::Passthrough(_) => "passthrough to the page",
                MmapMode::PageCache => "via page cache",
            },
            self.access.describe()
        )
    }

    fn channel(&self) -> Channel<'_> {
        Channel::new(self.fuse.as_fd())
    }

    /// Handles one forwarded request.
    pub fn handle(
        &mut self,
        request: DeviceRequest,
        core: &mut Core,
        per_uid: &mut HashMap<u32, u32>,
        limits: &Limits,
    ) -> Effect {
        let DeviceRequest(Request { header, op }) = request;
        let unique = header.unique;
        let mut effect = Effect::default();
        let ch = Channel::new(self.fuse.as_fd());
        let watcher = |fh: &u64| self.handles.get(fh).map(|h| h.watcher);
        match op {
            Op::Open { flags } => {
                let counts = core.counts();
                let mine = per_uid.get(&header.uid).copied().unwrap_or(0);
                if counts.watchers >= limits.max_watchers || mine >= limits.max_watchers_per_uid {
                    ch.error(unique, libc::EUSERS);
                    return effect;
                }
                let read_only = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
                // A handle opened for writing can map the shared page
                // writable (the kernel checks only the FUSE file's mode; with
                // passthrough the backing file is reopened read-write, and
                // without it the page cache is shared by every mapper). An
                // unprivileged writer could then hide a restore from every
                // program that maps /dev/sysgenid, so write opens are for
                // privileged callers; everyone may open read-only, which
                // reads, polls and maps but cannot acknowledge.
                // With a device group the kernel has checked this open
                // already (`access`).
                if !read_only
                    && !self.access.kernel_checked()
                    && !crate::peer::process_may_bump(header.pid, header.uid)
                {
                    tracing::info!(
                        uid = header.uid,
                        pid = header.pid,
                        "device: refused a write open by an unprivileged process (open it read-only, or use the socket client to acknowledge)"
                    );
                    ch.error(unique, libc::EACCES);
                    return effect;
                }
                // A read-only handle can never acknowledge (write(2) needs
                // write access), so it never holds up the barrier.
                let tracking = if read_only {
                    Tracking::Untracked
                } else {
                    Tracking::Tracked
                };
                let id = core.register(tracking, None);
                *per_uid.entry(header.uid).or_insert(0) += 1;
                let fh = self.next_fh;
                self.next_fh += 1;
                self.handles.insert(
                    fh,
                    Handle {
                        watcher: id,
                        uid: header.uid,
                        poll_kh: None,
                    },
                );
                // DIRECT_IO: read/write/poll/ioctl come to us even with
                // passthrough (only mmap goes to the backing file). The
                // kernel refuses STREAM with PASSTHROUGH (FOPEN_PASSTHROUGH_MASK).
                use fuse::fopen::{DIRECT_IO, PASSTHROUGH, STREAM};
                match self.mmap {
                    MmapMode::Passthrough(id) => ch.open(unique, fh, DIRECT_IO | PASSTHROUGH, id),
                    MmapMode::PageCache => ch.open(unique, fh, DIRECT_IO | STREAM, 0),
                }
            }
            Op::Release { fh } => {
                if let Some(h) = self.handles.remove(&fh) {
                    effect.settle = core.unregister(h.watcher).is_ok();
                    if let Some(n) = per_uid.get_mut(&h.uid) {
                        *n -= 1;
                        if *n == 0 {
                            per_uid.remove(&h.uid);
                        }
                    }
                }
                self.reads.retain(|&(_, f)| f != fh);
                self.waits.retain(|w| w.fh != fh);
                ch.ok(unique, &[]);
            }
            Op::Read {
                fh, size, flags, ..
            } => match watcher(&fh).map(|w| core.poll_read(w)) {
                None | Some(Err(_)) => ch.error(unique, libc::EBADF),
                Some(_) if size == 0 => ch.ok(unique, &[]),
                Some(_) if size < 4 => ch.error(unique, libc::EINVAL),
                Some(Ok(Some(generation))) => ch.ok(unique, &generation.to_ne_bytes()),
                Some(Ok(None)) if flags & libc::O_NONBLOCK as u32 != 0 => {
                    ch.error(unique, libc::EAGAIN)
                }
                Some(Ok(None)) => self.reads.push((unique, fh)),
            },
            Op::Write { fh, data, .. } => {
                let Some(id) = watcher(&fh) else {
                    ch.error(unique, libc::EBADF);
                    return effect;
                };
                let Ok(bytes) = <[u8; 4]>::try_from(data.as_slice()) else {
                    ch.error(unique, libc::EINVAL);
                    return effect;
                };
                match core.ack(id, u32::from_ne_bytes(bytes)) {
                    Ok(changed) => {
                        effect.settle = changed;
                        ch.written(unique, 4);
                    }
                    Err(_) => ch.error(unique, libc::EINVAL),
                }
            }
            Op::Poll { fh, kh, flags } => {
                let Some(h) = self.handles.get_mut(&fh) else {
                    ch.error(unique, libc::EBADF);
                    return effect;
                };
                if flags & fuse::POLL_SCHEDULE_NOTIFY != 0 {
                    h.poll_kh = Some(kh);
                }
                let outdated = core.is_outdated(h.watcher).unwrap_or(false);
                let revents = if outdated {
                    (libc::POLLIN | libc::POLLRDNORM) as u32
                } else {
                    0
                };
                ch.poll(unique, revents);
            }
            Op::Ioctl { fh, cmd, arg } => {
                let Some(id) = watcher(&fh) else {
                    ch.error(unique, libc::EBADF);
                    return effect;
                };
                match cmd {
                    SYSGENID_GET_OUTDATED_WATCHERS => {
                        ch.ioctl(unique, core.counts().outdated as i32)
                    }
                    SYSGENID_WAIT_WATCHERS => match core.barrier(Some(id)) {
                        Ok(Barrier::Satisfied) => ch.ioctl(unique, 0),
                        Ok(Barrier::Interrupted { .. }) => ch.error(unique, libc::EINTR),
                        Ok(Barrier::Pending { .. }) => self.waits.push(ParkedWait {
                            unique,
                            fh,
                            deadline: (arg > 0)
                                .then(|| Instant::now() + Duration::from_millis(arg)),
                        }),
                        Err(_) => ch.error(unique, libc::EIO),
                    },
                    SYSGENID_FORCE_GEN_UPDATE => {
                        if !crate::peer::process_may_bump(header.pid, header.uid) {
                            tracing::warn!(
                                uid = header.uid,
                                pid = header.pid,
                                "device: refused SYSGENID_FORCE_GEN_UPDATE (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)"
                            );
                            ch.error(unique, libc::EACCES);
                        } else if let Ok(min) = u32::try_from(arg) {
                            effect.bump = Some((unique, min));
                        } else {
                            ch.error(unique, libc::EINVAL);
                        }
                    }
                    _ => ch.error(unique, libc::ENOTTY),
                }
            }
            Op::Interrupt { unique: target } => {
                if let Some(i) = self.reads.iter().position(|&(u, _)| u == target) {
                    self.reads.swap_remove(i);
                    ch.error(target, libc::EINTR);
                } else if let Some(i) = self.waits.iter().position(|w| w.unique == target) {
                    self.waits.swap_remove(i);
                    ch.error(target, libc::EINTR);
                }
                // Otherwise it was already answered: nothing to do (an
                // interrupt never gets a reply of its own).
            }
            Op::Init { .. } | Op::Other => ch.error(unique, libc::ENOSYS),
        }
        effect
    }

    /// Ends a forced update started by [`Effect::bump`].
    pub fn answer_bump(&self, unique: u64, result: &Result<u32, BumpError>) {
        match result {
            Ok(_) => self.channel().ioctl(unique, 0),
            Err(BumpError::Core(CoreError::Overflow { .. })) => {
                self.channel().error(unique, libc::EOVERFLOW)
            }
            Err(_) => self.channel().error(unique, libc::EIO),
        }
    }

    /// After a bump (the page is published): make mappings current, then
    /// wake blocked readers and pollers. Barrier waits are settled by
    /// [`Device::settle`], which the loop calls next.
    pub fn on_bump(&mut self, core: &Core, record: &PageRecord) {
        self.mirror.publish(record);
        let ch = Channel::new(self.fuse.as_fd());
        if self.mmap == MmapMode::PageCache {
            // Before any watcher wakes; the reader thread answers the
            // refill, so the loop holds nothing the invalidation waits on.
            ch.notify_inval_root();
        }
        for (unique, fh) in std::mem::take(&mut self.reads) {
            let generation = self
                .handles
                .get(&fh)
                .and_then(|h| core.poll_read(h.watcher).ok().flatten());
            match generation {
                Some(g) => ch.ok(unique, &g.to_ne_bytes()),
                None => self.reads.push((unique, fh)),
            }
        }
        for h in self.handles.values_mut() {
            if let Some(kh) = h.poll_kh.take() {
                ch.notify_poll(kh);
            }
        }
    }

    /// Answers every parked barrier wait that is no longer pending.
    pub fn settle(&mut self, core: &Core) {
        let ch = Channel::new(self.fuse.as_fd());
        self.waits.retain(|w| {
            let Some(h) = self.handles.get(&w.fh) else {
                ch.error(w.unique, libc::EBADF);
                return false;
            };
            match core.barrier(Some(h.watcher)) {
                Ok(Barrier::Pending { .. }) => true,
                Ok(Barrier::Satisfied) => {
                    ch.ioctl(w.unique, 0);
                    false
                }
                Ok(Barrier::Interrupted { .. }) => {
                    ch.error(w.unique, libc::EINTR);
                    false
                }
                Err(_) => {
                    ch.error(w.unique, libc::EIO);
                    false
                }
            }
        });
    }

    /// Ends barrier waits whose deadline passed with `ETIMEDOUT`.
    pub fn expire(&mut self, now: Instant) {
        let ch = Channel::new(self.fuse.as_fd());
        self.waits.retain(|w| match w.deadline {
            Some(d) if d <= now => {
                ch.error(w.unique, libc::ETIMEDOUT);
                false
            }
            _ => true,
        });
    }

    /// The earliest barrier deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits.iter().filter_map(|w| w.deadline).min()
    }

    /// Clean exit: ends parked requests, detaches the mount and removes
    /// the mount point. Handles still open get `ENOTCONN` from then on.
    pub fn shutdown(&mut self) {
        let ch = Channel::new(self.fuse.as_fd());
        for (unique, _) in self.reads.drain(..) {
            ch.error(unique, libc::ENOTCONN);
        }
        for w in self.waits.drain(..) {
            ch.error(w.unique, libc::ENOTCONN);
        }
        if let Err(e) = fuse::unmount(&self.path) {
            tracing::warn!("cannot unmount {}: {e}", self.path.display());
            return;
        }
        if let Ok(MountPoint::EmptyFile) = check_mount_point(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Name of the device page in the runtime directory.
pub const DEVICE_PAGE_NAME: &str = "device-page";

/// Opens (creating) `<runtime dir>/device-page` for the daemon to write
/// and read-only for the kernel. It is a separate file from the runtime
/// page so that a writable mapping of the device (see `docs/device.md`)
/// can never touch the page socket clients map.
fn open_device_page(dir: &RuntimeDir) -> std::io::Result<(PageWriter, File)> {
    use rustix::fs::{Mode, OFlags};
    let path = dir.path().join(DEVICE_PAGE_NAME);
    let open = |flags: OFlags| {
        rustix::fs::openat(
            dir.fd(),
            DEVICE_PAGE_NAME,
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
    };
    let rw = File::from(open(OFlags::CREATE | OFlags::RDWR)?);
    let md = rw.metadata()?;
    use std::os::unix::fs::MetadataExt;
    if !md.is_file() || md.uid() != rustix::process::geteuid().as_raw() || md.nlink() != 1 {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file of ours with one link; remove it",
            path.display()
        )));
    }
    let writer = PageWriter::new(rw, &path).map_err(std::io::Error::other)?;
    let ro = File::from(open(OFlags::RDONLY)?);
    Ok((writer, ro))
}

fn create_mount_point(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o666)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map(drop)
}

/// Answers `FUSE_INIT` and sets up passthrough if the kernel offers it.
fn handshake(fd: &OwnedFd, page: &File) -> std::io::Result<MmapMode> {
    let mut buf = vec![0u8; fuse::READ_BUFFER];
    let request = loop {
        if let Some(n) = fuse::read_request(fd, &mut buf)? {
            break Request::decode(&buf[..n])?;
        }
    };
    let Op::Init {
        major,
        minor,
        flags: offered,
    } = request.op
    else {
        return Err(std::io::Error::other(format!(
            "expected FUSE_INIT, got opcode {}",
            request.header.opcode
        )));
    };
    let ch = Channel::new(fd.as_fd());
    if major != fuse::KERNEL_VERSION || minor < 27 {
        ch.error(request.header.unique, libc::EPROTO);
        return Err(std::io::Error::other(format!(
            "kernel FUSE ABI {major}.{minor} is too old (need 7.27+)"
        )));
    }
    use fuse::init_flags as f;
    let want = f::INIT_EXT | f::DIRECT_IO_ALLOW_MMAP | f::PASSTHROUGH | f::BIG_WRITES;
    let flags = offered & want;
    if flags & f::DIRECT_IO_ALLOW_MMAP == 0 && flags & f::PASSTHROUGH == 0 {
        tracing::warn!("this kernel offers neither FUSE passthrough nor direct-I/O mmap: mmap of the device will fail");
    }
    let passthrough = std::env::var_os("SYSGENIDD_DEVICE_NO_PASSTHROUGH").is_none()
        && flags & f::PASSTHROUGH != 0;
    let flags = if passthrough {
        flags
    } else {
        flags & !f::PASSTHROUGH
    };
    ch.init(
        request.header.unique,
        minor.min(fuse::KERNEL_MINOR_VERSION),
        flags,
        if passthrough { 2 } else { 0 },
    );
    if passthrough {
        match fuse::backing_open(fd.as_fd(), page.as_fd()) {
            Ok(id) => return Ok(MmapMode::Passthrough(id)),
            Err(e) => tracing::warn!(
                "FUSE passthrough unavailable ({e}); mappings of the device use the page cache and get SIGBUS if sysgenidd dies"
            ),
        }
    }
    Ok(MmapMode::PageCache)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The reader thread: answers what needs no state, forwards the rest.
fn reader(fd: Arc<OwnedFd>, page: File, handle: LoopHandle, mode: u32, gid: u32) {
    let mut buf = vec![0u8; fuse::READ_BUFFER];
    let ch = Channel::new(fd.as_fd());
    let attr = fuse::Attr {
        size: sysgenid_page::PAGE_SIZE as u64,
        mode: libc::S_IFREG | mode,
        time: now_secs(),
        gid,
    };
    loop {
        let n = match fuse::read_request(&*fd, &mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                if errno_of(&e) != libc::ENODEV {
                    tracing::error!("device: reading /dev/fuse failed: {e}");
                }
                return;
            }
        };
        let request = match Request::decode(&buf[..n]) {
            Ok(r) => r,
            Err(_) => continue,
        };
        let unique = request.header.unique;
        match (&request.op, request.header.opcode) {
            (_, opcode::GETATTR | opcode::SETATTR) => ch.attr(unique, &attr),
            (_, opcode::FORGET | opcode::BATCH_FORGET) => {}
            (_, opcode::FLUSH | opcode::FSYNC) => ch.ok(unique, &[]),
            (_, opcode::STATFS) => ch.statfs(unique),
            (_, opcode::LOOKUP) => ch.error(unique, libc::ENOENT),
            (_, opcode::ACCESS) => {
                // fuse_access_in { u32 mask; u32 padding; }
                let mask = buf
                    .get(40..44)
                    .map_or(0, |b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
                if mask & libc::X_OK as u32 != 0 {
                    ch.error(unique, libc::EACCES)
                } else {
                    ch.ok(unique, &[])
                }
            }
            (_, opcode::DESTROY) => {
                ch.ok(unique, &[]);
                return;
            }
            (
                Op::Read {
                    offset,
                    size,
                    read_flags,
                    ..
                },
                _,
            ) if read_flags & fuse::READ_LOCKOWNER == 0 => {
                // A page-cache fill of a mapping (fallback mode): the page
                // as it is now. Answered here, never by the loop, so the
                // loop's invalidation after a bump cannot wait on itself.
                let mut data = vec![0u8; (*size as usize).min(sysgenid_page::PAGE_SIZE)];
                let n = page.read_at(&mut data, *offset).unwrap_or(0);
                ch.ok(unique, &data[..n]);
            }
            (Op::Write { write_flags, .. }, _) if write_flags & fuse::WRITE_CACHE != 0 => {
                // Writeback of a writable shared mapping: never accepted.
                ch.error(unique, libc::EPERM)
            }
            (
                Op::Open { .. }
                | Op::Release { .. }
                | Op::Read { .. }
                | Op::Write { .. }
                | Op::Ioctl { .. }
                | Op::Poll { .. }
                | Op::Interrupt { .. },
                _,
            ) => {
                if !handle.send(Command::Device(DeviceRequest(request))) {
                    return;
                }
            }
            _ => ch.error(unique, libc::ENOSYS),
        }
    }
}
