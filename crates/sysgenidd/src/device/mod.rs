//! `/dev/sysgenid`: the seed's device ABI served through FUSE.
//!
//! The daemon mounts a FUSE filesystem whose root is a regular file onto
//! the device path (an empty regular file, created if missing) and answers
//! the protocol itself ([`fuse`]). Every open handle is a watcher in the
//! same `Core` as the socket clients, so status, bumps, acks and the
//! barrier see both kinds alike. Design notes, the deviations from a real
//! character device and measured latencies are in `docs/device.md`.
//!
//! Like the socket and the host channel, the device is a transport only
//! (the FUSE protocol, the caller's credentials, parked requests): what a
//! barrier wait or a forced update answers is decided in
//! [`crate::requests`], and the device returns that reply's errno.
//!
//! # Threads
//! With FUSE passthrough (the usual case, Linux 6.9+) the event loop reads
//! `/dev/fuse` itself: the descriptor is non-blocking and registered in the
//! loop's poll set ([`Device::poll_fd`], [`Device::on_readable`]), so a
//! device request costs one wake-up, as a socket request does, and the
//! watcher state keeps its one owner. In page-cache mode a reader thread
//! reads the requests instead (the loop's cache invalidation after a bump
//! waits for page fills, which it then must not be the one to answer) and
//! forwards them to the loop as [`DeviceRequest`]s through the forwarding
//! function the loop gave [`Device::start`]. Either way, what needs no
//! state (attributes, flush, page-cache fills) is answered by whoever read
//! it, and the loop answers the rest by writing to the same descriptor
//! (replies are whole messages, safe from any thread).
//! Requests that must wait (a blocking `read`, `SYSGENID_WAIT_WATCHERS`)
//! are *parked*: remembered by their `unique` and answered later, on a
//! bump, an ack, a close, a deadline, or `FUSE_INTERRUPT` (→ `EINTR`).
//! The kernel hands out a `FUSE_INTERRUPT` only after the request it
//! names, and requests are handled in the order read, so an interrupt
//! always arrives after its request.
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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sysgenid_core::{Generation, Tracking, WatcherId};

use sysgenid_page::{PageRecord, PageWriter};

use crate::requests;
use crate::runtime_dir::RuntimeDir;
use crate::service::BumpError;
use crate::watchers::Watchers;
use crate::work::{BumpRequest, Pending, PrivilegedBump, Requester, WorkList};
pub use access::WriteAccess;
use fuse::{opcode, Channel, InHeader, Op, Request};

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

/// A parked `SYSGENID_WAIT_WATCHERS`: its FUSE `unique` and handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ParkedWait {
    unique: u64,
    fh: u64,
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
    waits: Pending<ParkedWait>,
    /// Who may open for writing.
    access: WriteAccess,
    /// Set when the loop reads `/dev/fuse` itself (passthrough mode): what
    /// the reader thread would otherwise hold.
    served_here: Option<Box<Served>>,
}

/// What the loop needs to read and answer `/dev/fuse` itself.
struct Served {
    /// The request buffer, reused.
    buf: Vec<u8>,
    /// The device page, for page-cache fills (none come in passthrough
    /// mode; answered anyway).
    page: File,
    attr: fuse::Attr,
}

/// What [`Device::on_readable`] left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Every queued request was read: wait for the next readiness event.
    Drained,
    /// The per-turn budget ran out: read again next turn.
    More,
    /// The kernel ended the connection (unmounted or aborted).
    Gone,
}

/// Requests read from `/dev/fuse` per loop turn, so socket clients are not
/// starved by a flood of device calls.
const REQUESTS_PER_TURN: usize = 64;

/// A request forwarded by the reader thread.
#[derive(Debug)]
pub struct DeviceRequest(Request);

/// How the reader thread hands a request to the loop; false when the loop
/// is gone (the thread then ends).
pub type Forward = Box<dyn Fn(DeviceRequest) -> bool + Send>;

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Why the daemon runs without the device (not an error: the startup line
/// says it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Disabled {
    /// `--device off`.
    #[error("off (--device off)")]
    Off,
    /// The default, and not root.
    #[error("off (not root; pass --device PATH to serve one)")]
    NotRoot,
    /// The default, and `/dev/sysgenid` is taken.
    #[error("off ({DEFAULT_PATH} is not free: {0})")]
    DefaultTaken(String),
    /// No `/dev/fuse`.
    #[error("off (/dev/fuse is missing, so {0} cannot be served; load the fuse module, or in a container pass /dev/fuse in)")]
    NoFuse(String),
    /// The default, and mounting was refused (a container without
    /// `CAP_SYS_ADMIN`, seccomp, a security module).
    #[error("off (mounting {path} was refused: {error}; pass --device PATH to insist)")]
    MountRefused {
        /// The mount point.
        path: String,
        /// What the kernel said.
        error: String,
    },
}

/// Why a device that should be served cannot be: the daemon stops.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve the device {path}: {step}: {source} (pass --device off to run without it)")]
pub struct DeviceError {
    /// The mount point.
    path: String,
    /// What was being done.
    step: &'static str,
    /// What failed.
    source: std::io::Error,
}

/// What [`Device::start`] did.
pub enum Started {
    /// Serving the device.
    Serving(Device),
    /// Running without it, and why.
    Disabled(Disabled),
}

/// Decides the mount point from the setting.
fn resolve(setting: &Setting) -> Result<PathBuf, Disabled> {
    match setting {
        Setting::Off => Err(Disabled::Off),
        Setting::Path(p) => Ok(p.clone()),
        Setting::Default => {
            if !rustix::process::geteuid().is_root() {
                return Err(Disabled::NotRoot);
            }
            let p = PathBuf::from(DEFAULT_PATH);
            match check_mount_point(&p) {
                Ok(_) => Ok(p),
                Err(why) => Err(Disabled::DefaultTaken(why)),
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
    /// Mounts the device (unless off) and starts its reader thread, which
    /// hands requests to the loop through `forward`.
    pub fn start(
        setting: &Setting,
        dir: &RuntimeDir,
        record: &PageRecord,
        forward: Forward,
        access: WriteAccess,
    ) -> Result<Started, DeviceError> {
        let path = match resolve(setting) {
            Ok(p) => p,
            Err(why) => return Ok(Started::Disabled(why)),
        };
        if !Path::new("/dev/fuse").exists() {
            return Ok(Started::Disabled(Disabled::NoFuse(
                path.display().to_string(),
            )));
        }
        let fail = |step: &'static str| {
            let path = path.display().to_string();
            move |source: std::io::Error| DeviceError { path, step, source }
        };
        let refused = |why: String| std::io::Error::other(why);
        // Whether we created the mount point (removed again if the mount
        // fails: nothing is left behind).
        let mut created = false;
        match check_mount_point(&path)
            .map_err(refused)
            .map_err(fail("refusing the mount point"))?
        {
            MountPoint::Stale => {
                tracing::warn!(
                    "replacing the stale device mount on {} left by a daemon that died",
                    path.display()
                );
                fuse::unmount(&path).map_err(fail("detaching the stale mount"))?;
                if let MountPoint::Absent = check_mount_point(&path)
                    .map_err(refused)
                    .map_err(fail("after detaching"))?
                {
                    create_mount_point(&path).map_err(fail("creating"))?;
                    created = true;
                }
            }
            MountPoint::Absent => {
                create_mount_point(&path).map_err(fail("creating"))?;
                created = true;
            }
            MountPoint::EmptyFile => {}
        }
        let undo = |path: &Path| {
            if created {
                if let Ok(MountPoint::EmptyFile) = check_mount_point(path) {
                    let _ = std::fs::remove_file(path);
                }
            }
        };
        let (mut mirror, page) = match open_device_page(dir) {
            Ok(opened) => opened,
            Err(e) => {
                undo(&path);
                return Err(fail("preparing the device page")(e));
            }
        };
        mirror.publish(record);
        let fd = match fuse::mount(&path, access.kernel_checked()) {
            Ok(fd) => fd,
            // Not asked for by name: a system that may not mount (a
            // container without CAP_SYS_ADMIN, seccomp, a security
            // module) runs without the device, like one without
            // /dev/fuse.
            Err(e) if *setting == Setting::Default => {
                undo(&path);
                return Ok(Started::Disabled(Disabled::MountRefused {
                    path: path.display().to_string(),
                    error: e.to_string(),
                }));
            }
            Err(e) => {
                undo(&path);
                return Err(fail("mount")(e));
            }
        };
        let mmap = match handshake(&fd, &page) {
            Ok(mode) => mode,
            Err(e) => {
                let _ = fuse::unmount(&path);
                undo(&path);
                return Err(fail("FUSE handshake")(e));
            }
        };
        let fuse = Arc::new(fd);
        let served_here = match mmap {
            MmapMode::Passthrough(_) => {
                // Served from the loop's poll set: one wake-up per request,
                // like a socket request. Nothing here may touch the mount
                // (the loop is not serving it yet); in passthrough mode
                // mappings go to the page file, so no early GETATTR is
                // needed.
                rustix::fs::fcntl_setfl(&*fuse, rustix::fs::OFlags::NONBLOCK)
                    .map_err(|e| fail("making /dev/fuse non-blocking")(e.into()))?;
                drop(forward);
                Some(Box::new(Served {
                    buf: vec![0u8; fuse::READ_BUFFER],
                    page,
                    attr: root_attr(access.file_mode(), access.file_gid()),
                }))
            }
            MmapMode::PageCache => {
                // Page-cache mode keeps a reader thread: the loop's
                // invalidation after a bump waits for page fills, which
                // must then be answered by someone else.
                let reader_fd = fuse.clone();
                let attr = root_attr(access.file_mode(), access.file_gid());
                std::thread::Builder::new()
                    .name("device".into())
                    .spawn(move || reader(reader_fd, page, forward, attr))
                    .map_err(fail("starting its thread"))?;
                // The root inode starts with size 0 until its first
                // GETATTR, and a mapping touched before that would fault
                // (SIGBUS) in page-cache mode: fetch the attributes now
                // (answered by the reader thread).
                std::fs::metadata(&path).map_err(fail("checking the mount"))?;
                None
            }
        };
        Ok(Started::Serving(Device {
            fuse,
            mirror,
            path,
            mmap,
            handles: HashMap::new(),
            next_fh: 1,
            reads: Vec::new(),
            waits: Pending::default(),
            access,
            served_here,
        }))
    }

    /// The `/dev/fuse` descriptor, when the loop is to read it from its
    /// poll set (passthrough mode) and call [`Device::on_readable`];
    /// `None` when a reader thread forwards requests instead.
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        self.served_here.as_ref().map(|_| self.fuse.as_fd())
    }

    /// Reads and answers the requests queued on `/dev/fuse` (at most
    /// [`REQUESTS_PER_TURN`]): stateless ones as the reader thread would,
    /// the rest through [`Device::handle`]. The kernel hands a request to
    /// userspace before any `FUSE_INTERRUPT` naming it, and each request is
    /// handled before the next is read, so an interrupt never overtakes its
    /// request here either.
    pub fn on_readable(&mut self, watchers: &mut Watchers, work: &mut WorkList) -> Readiness {
        for _ in 0..REQUESTS_PER_TURN {
            let Some(served) = self.served_here.as_mut() else {
                return Readiness::Gone;
            };
            let n = match rustix::io::read(&*self.fuse, &mut served.buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN) => return Readiness::Drained,
                // Interrupted before we read it, or a signal: read on.
                Err(rustix::io::Errno::INTR | rustix::io::Errno::NOENT) => continue,
                Err(e) => {
                    if e != rustix::io::Errno::NODEV {
                        tracing::error!("device: reading /dev/fuse failed: {e}");
                    }
                    self.served_here = None;
                    return Readiness::Gone;
                }
            };
            let Ok(request) = Request::decode(&served.buf[..n]) else {
                continue;
            };
            let ch = Channel::new(self.fuse.as_fd());
            match answer_stateless(ch, &served.attr, &served.page, request, &served.buf) {
                Stateless::Answered => {}
                Stateless::Destroyed => {
                    self.served_here = None;
                    return Readiness::Gone;
                }
                Stateless::Stateful(request) => self.handle(DeviceRequest(request), watchers, work),
            }
        }
        Readiness::More
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

    fn watcher(&self, fh: u64) -> Option<WatcherId> {
        self.handles.get(&fh).map(|h| h.watcher)
    }

    /// Handles one forwarded request: one function per operation. What
    /// follows for others (a settle, a forced update) goes on `work`.
    pub fn handle(&mut self, request: DeviceRequest, watchers: &mut Watchers, work: &mut WorkList) {
        let DeviceRequest(Request { header, op }) = request;
        match op {
            Op::Open { flags } => self.open(&header, flags, watchers),
            Op::Release { fh } => self.release(header.unique, fh, watchers, work),
            Op::Read {
                fh, size, flags, ..
            } => self.read(header.unique, fh, size, flags, watchers),
            Op::Write { fh, data, .. } => self.write(header.unique, fh, &data, watchers, work),
            Op::Poll { fh, kh, flags } => self.poll(header.unique, fh, kh, flags, watchers),
            Op::Ioctl { fh, cmd, arg } => self.ioctl(&header, fh, cmd, arg, watchers, work),
            Op::Interrupt { unique } => self.interrupt(unique),
            Op::Init { .. } | Op::Other => self.channel().error(header.unique, libc::ENOSYS),
        }
    }

    /// `open(2)`: a new watcher, if the limits allow (`EUSERS`) and, for
    /// write access, the caller is privileged (`EACCES`).
    fn open(&mut self, header: &InHeader, flags: u32, watchers: &mut Watchers) {
        let unique = header.unique;
        let read_only = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
        // A handle opened for writing can map the shared page
        // writable (the kernel checks only the FUSE file's mode; with
        // passthrough the backing file is reopened read-write, and
        // without it the page cache is shared by every mapper). An
        // unprivileged writer could then hide a restore from every
        // program that maps /dev/sysgenid, so write opens are for
        // privileged callers; everyone may open read-only, which
        // reads, polls and maps but cannot acknowledge.
        if watchers.check_admission(header.uid).is_err() {
            // Before the privilege check: a full daemon answers EUSERS to
            // everyone.
            self.channel().error(unique, libc::EUSERS);
            return;
        }
        // With a device group the kernel has checked this open already
        // (`access`).
        if !read_only
            && !self.access.kernel_checked()
            && !crate::peer::process_may_bump(header.pid, header.uid)
        {
            crate::log_limited!(
                crate::ratelimit::Kind::Device,
                info,
                uid = header.uid,
                pid = header.pid,
                "device: refused a write open by an unprivileged process (open it read-only, or use the socket client to acknowledge)"
            );
            self.channel().error(unique, libc::EACCES);
            return;
        }
        // A read-only handle can never acknowledge (write(2) needs
        // write access), so it never holds up the barrier.
        let tracking = if read_only {
            Tracking::Untracked
        } else {
            Tracking::Tracked
        };
        // A writer holds the thaw after a restore only if trusted (`trust`),
        // judged on the opening thread, blocked in open(2) meanwhile.
        let trusted = tracking == Tracking::Tracked && {
            let who = crate::trust::Identity {
                pid: i32::try_from(header.pid).unwrap_or(0),
                uid: header.uid,
                gid: header.gid,
            };
            watchers
                .trust()
                .trusts(who, || crate::trust::process_groups(who.pid))
        };
        let Ok(id) = watchers.admit(header.uid, tracking, None, trusted) else {
            self.channel().error(unique, libc::EUSERS);
            return;
        };
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
        let ch = self.channel();
        match self.mmap {
            MmapMode::Passthrough(id) => ch.open(unique, fh, DIRECT_IO | PASSTHROUGH, id),
            MmapMode::PageCache => ch.open(unique, fh, DIRECT_IO | STREAM, 0),
        }
    }

    /// The last `close(2)` of a handle: the watcher goes, and with it
    /// whatever it had parked.
    fn release(&mut self, unique: u64, fh: u64, watchers: &mut Watchers, work: &mut WorkList) {
        if let Some(h) = self.handles.remove(&fh) {
            if watchers.release(h.watcher, h.uid) {
                work.settle();
            }
        }
        self.reads.retain(|&(_, f)| f != fh);
        self.waits.remove_where(|w| w.fh == fh);
        self.channel().ok(unique, &[]);
    }

    /// `read(2)`: the new generation, `EAGAIN` when non-blocking and up to
    /// date, else parked until a bump.
    fn read(&mut self, unique: u64, fh: u64, size: u32, flags: u32, watchers: &Watchers) {
        let ch = self.channel();
        match self.watcher(fh).map(|w| watchers.poll_read(w)) {
            None | Some(Err(_)) => ch.error(unique, libc::EBADF),
            Some(_) if size == 0 => ch.ok(unique, &[]),
            Some(_) if size < 4 => ch.error(unique, libc::EINVAL),
            Some(Ok(Some(generation))) => ch.ok(unique, &generation.to_ne_bytes()),
            Some(Ok(None)) if flags & libc::O_NONBLOCK as u32 != 0 => {
                ch.error(unique, libc::EAGAIN)
            }
            Some(Ok(None)) => self.reads.push((unique, fh)),
        }
    }

    /// `write(2)`: acknowledges the generation written (`EINVAL` if it is
    /// not the current one).
    fn write(
        &mut self,
        unique: u64,
        fh: u64,
        data: &[u8],
        watchers: &mut Watchers,
        work: &mut WorkList,
    ) {
        let ch = self.channel();
        let Some(id) = self.watcher(fh) else {
            ch.error(unique, libc::EBADF);
            return;
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            ch.error(unique, libc::EINVAL);
            return;
        };
        match watchers.ack(id, u32::from_ne_bytes(bytes)) {
            Ok(changed) => {
                if changed {
                    work.settle();
                }
                ch.written(unique, 4);
            }
            Err(_) => ch.error(unique, libc::EINVAL),
        }
    }

    /// `poll(2)`: readable while outdated; remembers the kernel's handle to
    /// notify on the next bump.
    fn poll(&mut self, unique: u64, fh: u64, kh: u64, flags: u32, watchers: &Watchers) {
        let ch = Channel::new(self.fuse.as_fd());
        let Some(h) = self.handles.get_mut(&fh) else {
            ch.error(unique, libc::EBADF);
            return;
        };
        if flags & fuse::POLL_SCHEDULE_NOTIFY != 0 {
            h.poll_kh = Some(kh);
        }
        let outdated = watchers.is_outdated(h.watcher).unwrap_or(false);
        let revents = if outdated {
            (libc::POLLIN | libc::POLLRDNORM) as u32
        } else {
            0
        };
        ch.poll(unique, revents);
    }

    /// The seed's three ioctls.
    fn ioctl(
        &mut self,
        header: &InHeader,
        fh: u64,
        cmd: u32,
        arg: u64,
        watchers: &mut Watchers,
        work: &mut WorkList,
    ) {
        let unique = header.unique;
        let ch = self.channel();
        let Some(id) = self.watcher(fh) else {
            ch.error(unique, libc::EBADF);
            return;
        };
        match cmd {
            SYSGENID_GET_OUTDATED_WATCHERS => ch.ioctl(unique, watchers.counts().outdated as i32),
            SYSGENID_WAIT_WATCHERS => match requests::wait_answer(watchers, Some(id)) {
                Some(reply) => ch.answer(unique, requests::errno(&reply)),
                // The seed's argument: a timeout in milliseconds, 0 none.
                None => self.waits.add(
                    ParkedWait { unique, fh },
                    (arg > 0).then(|| Instant::now() + Duration::from_millis(arg)),
                ),
            },
            SYSGENID_FORCE_GEN_UPDATE => {
                if !crate::peer::process_may_bump(header.pid, header.uid) {
                    crate::log_limited!(
                        crate::ratelimit::Kind::Device,
                        warn,
                        uid = header.uid,
                        pid = header.pid,
                        "device: refused SYSGENID_FORCE_GEN_UPDATE (needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)"
                    );
                    ch.error(unique, libc::EACCES);
                } else if let Ok(min) = u32::try_from(arg) {
                    // The loop bumps, fans out, then calls `answer_bump`.
                    // The seed's ioctl has no flag: an exhausting minimum
                    // is refused (EOVERFLOW).
                    work.bump(PrivilegedBump {
                        request: BumpRequest {
                            min,
                            ..BumpRequest::default()
                        },
                        requester: Requester::Device(unique),
                    });
                } else {
                    ch.error(unique, libc::EINVAL);
                }
            }
            _ => ch.error(unique, libc::ENOTTY),
        }
    }

    /// `FUSE_INTERRUPT`: a parked request's caller got a signal (`EINTR`).
    fn interrupt(&mut self, target: u64) {
        let ch = Channel::new(self.fuse.as_fd());
        if let Some(i) = self.reads.iter().position(|&(u, _)| u == target) {
            self.reads.swap_remove(i);
            ch.error(target, libc::EINTR);
        } else if !self.waits.remove_where(|w| w.unique == target).is_empty() {
            ch.error(target, libc::EINTR);
        }
        // Otherwise it was already answered: nothing to do (an
        // interrupt never gets a reply of its own).
    }

    /// Ends a forced update queued as [`Requester::Device`].
    pub fn answer_bump(&self, unique: u64, result: &Result<Generation, BumpError>) {
        // Overflow and an exhausting minimum: EOVERFLOW; anything else EIO.
        self.channel()
            .answer(unique, requests::errno(&requests::bump_reply(result)));
    }

    /// After a bump (the page is published): make mappings current, then
    /// wake blocked readers and pollers. Barrier waits are settled by
    /// [`Device::settle`], which the loop calls next.
    pub fn on_bump(&mut self, watchers: &Watchers) {
        self.mirror.publish(watchers.record());
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
                .and_then(|h| watchers.poll_read(h.watcher).ok().flatten());
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
    pub fn settle(&mut self, watchers: &Watchers) {
        let ch = Channel::new(self.fuse.as_fd());
        let handles = &self.handles;
        let done = self.waits.settle(|w| {
            let Some(h) = handles.get(&w.fh) else {
                return Some(libc::EBADF);
            };
            requests::wait_answer(watchers, Some(h.watcher)).map(|reply| requests::errno(&reply))
        });
        for (w, errno) in done {
            ch.answer(w.unique, errno);
        }
    }

    /// Ends barrier waits whose deadline passed with `ETIMEDOUT`.
    pub fn expire(&mut self, now: Instant) {
        let ch = Channel::new(self.fuse.as_fd());
        for w in self.waits.expire(now) {
            ch.error(w.unique, libc::ETIMEDOUT);
        }
    }

    /// The earliest barrier deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits.next_deadline()
    }

    /// Clean exit: ends parked requests, detaches the mount and removes
    /// the mount point. Handles still open get `ENOTCONN` from then on.
    pub fn shutdown(&mut self) {
        let ch = Channel::new(self.fuse.as_fd());
        for (unique, _) in self.reads.drain(..) {
            ch.error(unique, libc::ENOTCONN);
        }
        for w in self.waits.drain() {
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

/// The root file's attributes (they never change): `mode` the permission
/// bits, `gid` the group.
fn root_attr(mode: u32, gid: u32) -> fuse::Attr {
    fuse::Attr {
        size: sysgenid_page::PAGE_SIZE as u64,
        mode: libc::S_IFREG | mode,
        time: now_secs(),
        gid,
    }
}

/// What [`answer_stateless`] did with a request.
enum Stateless {
    /// Answered (or needs no answer).
    Answered,
    /// `FUSE_DESTROY`: answered; the connection ends.
    Destroyed,
    /// Needs the watchers: for [`Device::handle`].
    Stateful(Request),
}

/// Answers what needs no state (attributes, flush, page-cache fills of the
/// mapping, refused writebacks); hands back the rest. `buf` is the raw
/// request (for `fuse_access_in`).
fn answer_stateless(
    ch: Channel<'_>,
    attr: &fuse::Attr,
    page: &File,
    request: Request,
    buf: &[u8],
) -> Stateless {
    let unique = request.header.unique;
    match (&request.op, request.header.opcode) {
        (_, opcode::GETATTR | opcode::SETATTR) => ch.attr(unique, attr),
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
            return Stateless::Destroyed;
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
            // A page-cache fill of a mapping (fallback mode): the page as
            // it is now. In that mode it is answered by the reader thread,
            // never by the loop, so the loop's invalidation after a bump
            // cannot wait on itself.
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
        ) => return Stateless::Stateful(request),
        _ => ch.error(unique, libc::ENOSYS),
    }
    Stateless::Answered
}

/// The reader thread of page-cache mode: answers what needs no state,
/// forwards the rest to the loop.
fn reader(fd: Arc<OwnedFd>, page: File, forward: Forward, attr: fuse::Attr) {
    let mut buf = vec![0u8; fuse::READ_BUFFER];
    let ch = Channel::new(fd.as_fd());
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
        match answer_stateless(ch, &attr, &page, request, &buf) {
            Stateless::Answered => {}
            Stateless::Destroyed => return,
            Stateless::Stateful(request) => {
                if !forward(DeviceRequest(request)) {
                    return;
                }
            }
        }
    }
}
