//! The slice of the FUSE protocol `/dev/sysgenid` needs, spoken directly
//! over `/dev/fuse`.
//!
//! No Rust FUSE crate fits (see `docs/device.md`): `fuser` answers
//! `FUSE_INTERRUPT` with `ENOSYS` and drops the `ioctl` argument, the others
//! lack `ioctl` or poll notifications. The protocol is small for a
//! filesystem with one regular file as its root, so it is written here
//! against `include/uapi/linux/fuse.h` (ABI 7.45 on the machine this was
//! built on; we speak 7.40, the first with `max_stack_depth`, and need no
//! later fields). Every struct below is named after its C counterpart and
//! laid out exactly like it: native-endian, naturally aligned, no implicit
//! padding. Messages are encoded and decoded field by field (no transmutes),
//! so the only `unsafe` here is the `mount(2)`/`ioctl(2)` calls.
//!
//! A request is one `read(2)` of the device: a `fuse_in_header` then the
//! opcode's arguments. A reply is one `write(2)`: a `fuse_out_header` (with
//! the request's `unique`, and `-errno` or 0) then the opcode's output.
//! Notifications are writes with `unique == 0` and the notify code in
//! `error`. Both are whole messages, so any thread may write them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `FUSE_KERNEL_VERSION`.
pub const KERNEL_VERSION: u32 = 7;
/// The minor version we speak: 7.40 added `fuse_init_out.max_stack_depth`
/// (needed by passthrough); nothing later is used.
pub const KERNEL_MINOR_VERSION: u32 = 40;
/// `FUSE_ROOT_ID`: our only inode.
pub const ROOT_ID: u64 = 1;
/// `FUSE_MIN_READ_BUFFER`; our buffer is larger (see [`READ_BUFFER`]).
pub const MIN_READ_BUFFER: usize = 8192;
/// `max_write` we announce: a write larger than this is split by the
/// kernel, and any write but 4 bytes is refused anyway.
pub const MAX_WRITE: u32 = 4096;
/// Size of the buffer each `read(2)` of the device gets.
pub const READ_BUFFER: usize = MIN_READ_BUFFER + MAX_WRITE as usize;

/// `enum fuse_opcode` (the values we act on; others get `ENOSYS`).
#[allow(missing_docs)]
pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const POLL: u32 = 40;
    pub const BATCH_FORGET: u32 = 42;
}

/// `enum fuse_notify_code`.
#[allow(missing_docs)]
pub mod notify {
    pub const POLL: i32 = 1;
    pub const INVAL_INODE: i32 = 2;
    pub const STORE: i32 = 4;
}

/// `fuse_init_in.flags` / `flags2` bits (flags2 shifted up by 32).
#[allow(missing_docs)]
pub mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const DIRECT_IO_ALLOW_MMAP: u64 = 1 << 36;
    pub const PASSTHROUGH: u64 = 1 << 37;
}

/// `fuse_open_out.open_flags`.
#[allow(missing_docs)]
pub mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const NONSEEKABLE: u32 = 1 << 2;
    pub const STREAM: u32 = 1 << 4;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

/// `FUSE_READ_LOCKOWNER` in `fuse_read_in.read_flags`: set on user
/// `read(2)`s of direct-I/O files, absent on page-cache fills.
pub const READ_LOCKOWNER: u32 = 1 << 1;
/// `FUSE_WRITE_CACHE` in `fuse_write_in.write_flags`: a page-cache
/// writeback (a writable shared mapping), not a user `write(2)`.
pub const WRITE_CACHE: u32 = 1 << 0;
/// `FUSE_POLL_SCHEDULE_NOTIFY` in `fuse_poll_in.flags`.
pub const POLL_SCHEDULE_NOTIFY: u32 = 1 << 0;

/// `FUSE_DEV_IOC_BACKING_OPEN` = `_IOW(229, 1, struct fuse_backing_map)`.
const DEV_IOC_BACKING_OPEN: libc::c_ulong = (1 << 30) | (16 << 16) | (229 << 8) | 1;

/// `struct fuse_in_header` (40 bytes).
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    /// `len`: the whole request, header included.
    pub len: u32,
    /// `opcode`.
    pub opcode: u32,
    /// `unique`: echoed in the reply; named by `FUSE_INTERRUPT`.
    pub unique: u64,
    /// `nodeid`.
    pub nodeid: u64,
    /// `uid` of the calling process (fsuid), in the server's namespace.
    pub uid: u32,
    /// `gid`.
    pub gid: u32,
    /// `pid`: the calling *thread*, in the server's pid namespace (0 if
    /// not visible there).
    pub pid: u32,
    // u16 total_extlen; u16 padding;
}

const IN_HEADER_LEN: usize = 40;
const OUT_HEADER_LEN: usize = 16;

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_ne_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8)
        .map_or(0, |s| u64::from_ne_bytes(s.try_into().expect("8 bytes")))
}

/// A decoded request: its header and the arguments of the opcodes we act
/// on. Field names follow the C structs named in each variant.
#[derive(Debug, Clone)]
pub enum Op {
    /// `fuse_init_in`: major, minor, flags | flags2 << 32.
    Init {
        /// `major`.
        major: u32,
        /// `minor`.
        minor: u32,
        /// `flags | (flags2 << 32)`.
        flags: u64,
    },
    /// `fuse_open_in.flags` (the `open(2)` flags).
    Open {
        /// `O_*` flags.
        flags: u32,
    },
    /// `fuse_read_in`.
    Read {
        /// `fh`.
        fh: u64,
        /// `offset`.
        offset: u64,
        /// `size`.
        size: u32,
        /// `read_flags` ([`READ_LOCKOWNER`]).
        read_flags: u32,
        /// `flags`: the file's current `O_*` flags (`O_NONBLOCK`).
        flags: u32,
    },
    /// `fuse_write_in` and the data after it.
    Write {
        /// `fh`.
        fh: u64,
        /// `write_flags` ([`WRITE_CACHE`]).
        write_flags: u32,
        /// The bytes written.
        data: Vec<u8>,
    },
    /// `fuse_release_in.fh`.
    Release {
        /// `fh`.
        fh: u64,
    },
    /// `fuse_ioctl_in`.
    Ioctl {
        /// `fh`.
        fh: u64,
        /// `cmd`.
        cmd: u32,
        /// `arg`: the scalar argument (restricted ioctl, `_IO` command).
        arg: u64,
    },
    /// `fuse_poll_in`.
    Poll {
        /// `fh`.
        fh: u64,
        /// `kh`: names the kernel's poll handle in notifications.
        kh: u64,
        /// `flags` ([`POLL_SCHEDULE_NOTIFY`]).
        flags: u32,
    },
    /// `fuse_interrupt_in.unique`: the request to end with `EINTR`.
    Interrupt {
        /// The interrupted request.
        unique: u64,
    },
    /// Any other opcode (its arguments unused).
    Other,
}

/// A request read from the device.
#[derive(Debug, Clone)]
pub struct Request {
    /// The header.
    pub header: InHeader,
    /// The arguments.
    pub op: Op,
}

impl Request {
    /// Decodes one message as read from the device.
    pub fn decode(buf: &[u8]) -> io::Result<Request> {
        if buf.len() < IN_HEADER_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short FUSE request",
            ));
        }
        let header = InHeader {
            len: u32_at(buf, 0),
            opcode: u32_at(buf, 4),
            unique: u64_at(buf, 8),
            nodeid: u64_at(buf, 16),
            uid: u32_at(buf, 24),
            gid: u32_at(buf, 28),
            pid: u32_at(buf, 32),
        };
        let end = (header.len as usize).clamp(IN_HEADER_LEN, buf.len());
        let a = &buf[IN_HEADER_LEN..end];
        let op = match header.opcode {
            // fuse_init_in { major, minor, max_readahead, flags, flags2, unused[11] }
            opcode::INIT => Op::Init {
                major: u32_at(a, 0),
                minor: u32_at(a, 4),
                flags: u64::from(u32_at(a, 12)) | (u64::from(u32_at(a, 16)) << 32),
            },
            // fuse_open_in { flags, open_flags }
            opcode::OPEN => Op::Open {
                flags: u32_at(a, 0),
            },
            // fuse_read_in { fh, offset, size, read_flags, lock_owner, flags, padding }
            opcode::READ => Op::Read {
                fh: u64_at(a, 0),
                offset: u64_at(a, 8),
                size: u32_at(a, 16),
                read_flags: u32_at(a, 20),
                flags: u32_at(a, 32),
            },
            // fuse_write_in { fh, offset, size, write_flags, lock_owner, flags, padding } data
            opcode::WRITE => {
                let size = u32_at(a, 16) as usize;
                Op::Write {
                    fh: u64_at(a, 0),
                    write_flags: u32_at(a, 20),
                    data: a.get(40..40 + size).unwrap_or_default().to_vec(),
                }
            }
            // fuse_release_in { fh, flags, release_flags, lock_owner }
            opcode::RELEASE => Op::Release { fh: u64_at(a, 0) },
            // fuse_ioctl_in { fh, flags, cmd, arg, in_size, out_size }
            opcode::IOCTL => Op::Ioctl {
                fh: u64_at(a, 0),
                cmd: u32_at(a, 12),
                arg: u64_at(a, 16),
            },
            // fuse_poll_in { fh, kh, flags, events }
            opcode::POLL => Op::Poll {
                fh: u64_at(a, 0),
                kh: u64_at(a, 8),
                flags: u32_at(a, 16),
            },
            // fuse_interrupt_in { unique }
            opcode::INTERRUPT => Op::Interrupt {
                unique: u64_at(a, 0),
            },
            _ => Op::Other,
        };
        Ok(Request { header, op })
    }
}

/// Writes one whole message (header + parts) with a single `writev`.
fn write_message(fd: BorrowedFd<'_>, unique: u64, error: i32, parts: &[&[u8]]) -> io::Result<()> {
    let len = OUT_HEADER_LEN + parts.iter().map(|p| p.len()).sum::<usize>();
    // struct fuse_out_header { u32 len; i32 error; u64 unique; }
    let mut header = [0u8; OUT_HEADER_LEN];
    header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&error.to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    let mut iov = Vec::with_capacity(1 + parts.len());
    iov.push(io::IoSlice::new(&header));
    iov.extend(parts.iter().map(|p| io::IoSlice::new(p)));
    loop {
        match rustix::io::writev(fd, &iov) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The device's write end: replies and notifications. Cheap to share.
#[derive(Clone, Copy)]
pub struct Channel<'a> {
    fd: BorrowedFd<'a>,
}

impl<'a> Channel<'a> {
    /// Wraps an open `/dev/fuse` descriptor.
    pub fn new(fd: BorrowedFd<'a>) -> Channel<'a> {
        Channel { fd }
    }

    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) {
        // ENOENT: the request was interrupted and already ended by the
        // kernel, or the caller died; nothing to do. Anything else means
        // the connection is gone, which the reader thread reports.
        if let Err(e) = write_message(self.fd, unique, error, parts) {
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::debug!(unique, "FUSE reply not delivered: {e}");
            }
        }
    }

    /// Replies with `-errno` and no data.
    pub fn error(&self, unique: u64, errno: i32) {
        self.send(unique, -errno, &[]);
    }

    /// Replies with success and `data`.
    pub fn ok(&self, unique: u64, data: &[u8]) {
        self.send(unique, 0, &[data]);
    }

    /// Replies to `FUSE_INIT` with `fuse_init_out`.
    pub fn init(&self, unique: u64, minor: u32, flags: u64, max_stack_depth: u32) {
        // struct fuse_init_out { major, minor, max_readahead, flags,
        //   u16 max_background, u16 congestion_threshold, max_write,
        //   time_gran, u16 max_pages, u16 map_alignment, flags2,
        //   max_stack_depth, u16 request_timeout, u16 unused[11] } = 64 bytes
        let mut o = [0u8; 64];
        o[0..4].copy_from_slice(&KERNEL_VERSION.to_ne_bytes());
        o[4..8].copy_from_slice(&minor.to_ne_bytes());
        o[8..12].copy_from_slice(&0u32.to_ne_bytes());
        o[12..16].copy_from_slice(&(flags as u32).to_ne_bytes());
        o[16..18].copy_from_slice(&64u16.to_ne_bytes());
        o[18..20].copy_from_slice(&48u16.to_ne_bytes());
        o[20..24].copy_from_slice(&MAX_WRITE.to_ne_bytes());
        o[24..28].copy_from_slice(&1u32.to_ne_bytes());
        o[28..30].copy_from_slice(&1u16.to_ne_bytes());
        o[32..36].copy_from_slice(&((flags >> 32) as u32).to_ne_bytes());
        o[36..40].copy_from_slice(&max_stack_depth.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// Replies with `fuse_attr_out` (GETATTR, SETATTR).
    pub fn attr(&self, unique: u64, attr: &Attr) {
        // struct fuse_attr_out { u64 attr_valid; u32 attr_valid_nsec; u32 dummy; fuse_attr attr; }
        let mut o = [0u8; 16 + ATTR_LEN];
        o[0..8].copy_from_slice(&ATTR_VALID_SECS.to_ne_bytes());
        attr.encode(&mut o[16..]);
        self.ok(unique, &o);
    }

    /// Replies to OPEN with `fuse_open_out`.
    pub fn open(&self, unique: u64, fh: u64, open_flags: u32, backing_id: i32) {
        // struct fuse_open_out { u64 fh; u32 open_flags; i32 backing_id; }
        let mut o = [0u8; 16];
        o[0..8].copy_from_slice(&fh.to_ne_bytes());
        o[8..12].copy_from_slice(&open_flags.to_ne_bytes());
        o[12..16].copy_from_slice(&backing_id.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// Replies to WRITE with `fuse_write_out { size, padding }`.
    pub fn written(&self, unique: u64, size: u32) {
        let mut o = [0u8; 8];
        o[0..4].copy_from_slice(&size.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// Replies to IOCTL with `fuse_ioctl_out { result, flags, in_iovs,
    /// out_iovs }`: `result` becomes the `ioctl(2)` return value.
    pub fn ioctl(&self, unique: u64, result: i32) {
        let mut o = [0u8; 16];
        o[0..4].copy_from_slice(&result.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// Ends an ioctl that returns 0 on success: `errno` 0 is that success,
    /// anything else the error `ioctl(2)` fails with.
    pub fn answer(&self, unique: u64, errno: i32) {
        match errno {
            0 => self.ioctl(unique, 0),
            errno => self.error(unique, errno),
        }
    }

    /// Replies to POLL with `fuse_poll_out { revents, padding }`.
    pub fn poll(&self, unique: u64, revents: u32) {
        let mut o = [0u8; 8];
        o[0..4].copy_from_slice(&revents.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// Replies to STATFS with an all-zero `fuse_statfs_out` (80 bytes) but
    /// for `bsize`/`frsize`/`namelen`.
    pub fn statfs(&self, unique: u64) {
        // struct fuse_kstatfs { u64 blocks, bfree, bavail, files, ffree;
        //   u32 bsize, namelen, frsize, padding; u32 spare[6]; }
        let mut o = [0u8; 80];
        o[40..44].copy_from_slice(&4096u32.to_ne_bytes());
        o[44..48].copy_from_slice(&255u32.to_ne_bytes());
        o[48..52].copy_from_slice(&4096u32.to_ne_bytes());
        self.ok(unique, &o);
    }

    /// `FUSE_NOTIFY_POLL` with `fuse_notify_poll_wakeup_out { kh }`: the
    /// kernel polls that handle again.
    pub fn notify_poll(&self, kh: u64) {
        self.send(0, notify::POLL, &[&kh.to_ne_bytes()]);
    }

    /// `FUSE_NOTIFY_INVAL_INODE` with `fuse_notify_inval_inode_out { ino,
    /// off, len }` for the whole of the root's page cache. Blocks until
    /// the pages are invalidated, so never call it while holding up an
    /// answer to a page-cache fill.
    pub fn notify_inval_root(&self) {
        let mut o = [0u8; 24];
        o[0..8].copy_from_slice(&ROOT_ID.to_ne_bytes());
        o[16..24].copy_from_slice(&(-1i64).to_ne_bytes());
        self.send(0, notify::INVAL_INODE, &[&o]);
    }
}

/// Seconds the kernel may cache our attributes: they never change.
const ATTR_VALID_SECS: u64 = 365 * 24 * 3600;
const ATTR_LEN: usize = 88;

/// `struct fuse_attr` (88 bytes) of the root file.
pub struct Attr {
    /// `size`.
    pub size: u64,
    /// `mode` (`S_IFREG | perms`).
    pub mode: u32,
    /// `mtime`/`ctime` seconds.
    pub time: u64,
    /// `gid` (the owner is always root).
    pub gid: u32,
}

impl Attr {
    fn encode(&self, o: &mut [u8]) {
        // { u64 ino, size, blocks, atime, mtime, ctime; u32 atimensec,
        //   mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags }
        o[0..8].copy_from_slice(&ROOT_ID.to_ne_bytes());
        o[8..16].copy_from_slice(&self.size.to_ne_bytes());
        o[16..24].copy_from_slice(&self.size.div_ceil(512).to_ne_bytes());
        for off in [24, 32, 40] {
            o[off..off + 8].copy_from_slice(&self.time.to_ne_bytes());
        }
        o[60..64].copy_from_slice(&self.mode.to_ne_bytes());
        o[64..68].copy_from_slice(&1u32.to_ne_bytes());
        o[72..76].copy_from_slice(&self.gid.to_ne_bytes());
        o[80..84].copy_from_slice(&4096u32.to_ne_bytes());
    }
}

/// Opens `/dev/fuse` and mounts a FUSE filesystem whose root is a regular
/// file onto `target` (itself a regular file): `rootmode=100000`,
/// `allow_other`; with `default_permissions` when `kernel_checks_access`
/// (the kernel applies the file's mode and group at open), else the daemon
/// checks access.
pub fn mount(target: &Path, kernel_checks_access: bool) -> io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let data = CString::new(format!(
        "fd={},rootmode=100000,user_id=0,group_id=0,allow_other{}",
        fd.as_raw_fd(),
        if kernel_checks_access {
            ",default_permissions"
        } else {
            ""
        }
    ))
    .expect("no NUL");
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; mount(2) does not retain them.
    let rc = unsafe {
        libc::mount(
            c"sysgenid".as_ptr(),
            target_c.as_ptr(),
            c"fuse.sysgenid".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Detaches whatever is mounted on `target` (`umount2(MNT_DETACH)`): open
/// handles keep working until closed, new opens see the file underneath.
pub fn unmount(target: &Path) -> io::Result<()> {
    let target_c = CString::new(target.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `FUSE_DEV_IOC_BACKING_OPEN`: registers `file` as a passthrough backing
/// file and returns its id for `fuse_open_out.backing_id` (Linux 6.9+,
/// needs `CAP_SYS_ADMIN` and the `FUSE_PASSTHROUGH` init flag).
pub fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> io::Result<i32> {
    // struct fuse_backing_map { i32 fd; u32 flags; u64 padding; }
    #[repr(C)]
    struct BackingMap {
        fd: i32,
        flags: u32,
        padding: u64,
    }
    let map = BackingMap {
        fd: file.as_raw_fd(),
        flags: 0,
        padding: 0,
    };
    // SAFETY: the ioctl reads a 16-byte fuse_backing_map from a pointer to
    // a live, correctly laid out struct; both descriptors are valid.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), DEV_IOC_BACKING_OPEN as _, &map) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Reads one request into `buf`; `Ok(None)` when the read should simply be
/// retried (`EINTR`, or `ENOENT`: the request was interrupted before it
/// could be read).
pub fn read_request(dev: &impl AsFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    match rustix::io::read(dev, buf) {
        Ok(n) => Ok(Some(n)),
        Err(rustix::io::Errno::INTR | rustix::io::Errno::NOENT | rustix::io::Errno::AGAIN) => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}
