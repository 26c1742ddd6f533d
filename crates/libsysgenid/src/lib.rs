//! `libsysgenid`: the C ABI of the sysgenid client.
//!
//! A thin layer over the Rust client (`sysgenid`): every function returns 0
//! or a negative errno, as the seed's `/dev/sysgenid` would have through
//! `read`/`write`/`ioctl`. The header `include/sysgenid.h` is generated from
//! this file by cbindgen (`cbindgen.toml`); a test fails when it is stale
//! (`SYSGENID_BLESS=1 cargo test -p sysgenid-c --test header` rewrites it).
//! See `docs/c.md`.
//!
//! Two things this layer adds to the Rust client:
//! * a **stable descriptor**: the watcher's socket changes when the client
//!   reconnects after a daemon restart, so `sysgenid_fd` returns a private
//!   epoll instance holding the current socket (level-triggered). It is
//!   readable exactly while the socket is, and C callers can keep it in their
//!   own poll/epoll sets forever.
//! * an **interruptible read**: a blocked `sysgenid_read` returns `-EINTR`
//!   when a signal arrives, like a blocked `read(2)` on a device.
//!
//! No panic crosses the boundary: every entry point runs under
//! `catch_unwind` and turns a panic into `-EIO`.
//!
//! The snapshot lifecycle (`SYSGENID_LIFECYCLE`, `sysgenid_read_event`,
//! `sysgenid_confirm`, `sysgenid_freeze`, `sysgenid_thaw`) is in
//! `lifecycle.rs`.

#![allow(non_camel_case_types)]

mod lifecycle;

pub use lifecycle::*;

use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use sysgenid_client::{Control, Error, LifecycleState, Probe, Watcher};

/// `sysgenid_open` flag: `sysgenid_read` returns `-EAGAIN` instead of
/// blocking when the watcher is up to date (the seed's `O_NONBLOCK`).
pub const SYSGENID_NONBLOCK: u32 = 0x1u32;
/// `sysgenid_open` flag: the watcher is not counted by
/// `sysgenid_wait_watchers` (for lazy adjusters such as a hot-path probe
/// that acknowledges when it next runs).
pub const SYSGENID_UNTRACKED: u32 = 0x2u32;

/// `sysgenid_open` flag: the watcher is a snapshot-lifecycle participant:
/// `sysgenid_read_event` tells it to freeze and thaw as well as of changes,
/// and it must `sysgenid_confirm` each freeze (tracked participants hold a
/// freeze up until they do). Needs a daemon with the lifecycle (protocol
/// 2); an older one refuses the open with `-EPROTONOSUPPORT`.
pub const SYSGENID_LIFECYCLE: u32 = 0x4u32;

/// Every flag `sysgenid_open` knows.
const KNOWN_FLAGS: u32 = SYSGENID_NONBLOCK | SYSGENID_UNTRACKED | SYSGENID_LIFECYCLE;

/// One watcher of the system generation: the seed's open file of
/// `/dev/sysgenid`. Opaque; created by `sysgenid_open`, freed by
/// `sysgenid_close`.
pub struct sysgenid_watcher {
    inner: Mutex<Inner>,
    /// The stable descriptor handed to callers: an epoll instance that holds
    /// the watcher's current socket.
    epoll: OwnedFd,
    nonblocking: bool,
    /// Opened with `SYSGENID_LIFECYCLE` (a participant).
    lifecycle: bool,
}

struct Inner {
    watcher: Watcher,
    /// The socket currently registered in `epoll`.
    registered: RawFd,
}

/// A snapshot of the daemon's counters, filled by `sysgenid_get_status`.
/// Fields may be appended in later versions; `sysgenid_get_status` takes the
/// caller's `sizeof` and fills only what fits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct sysgenid_status {
    /// The current system generation.
    pub generation: u32,
    /// All registered watchers.
    pub watchers: u32,
    /// Watchers counted by `sysgenid_wait_watchers`.
    pub tracked: u32,
    /// Tracked watchers that have not acknowledged the current generation
    /// (advisory: it may change as soon as it is read).
    pub outdated: u32,
    /// Untracked watchers that have not acknowledged it.
    pub outdated_untracked: u32,
    /// The lifecycle state: `SYSGENID_STATE_RUNNING`,
    /// `SYSGENID_STATE_FREEZING` or `SYSGENID_STATE_FROZEN` (always
    /// running with a daemon that predates the lifecycle).
    pub state: u32,
    /// Tracked participants (and the daemon's hooks) that have not
    /// confirmed the freeze in progress; 0 unless freezing.
    pub pending: u32,
    /// Registered lifecycle participants.
    pub participants: u32,
    /// The latest freeze's number (0: none yet).
    pub freeze: u32,
    /// The kind of the last change: `SYSGENID_KIND_UNKNOWN`,
    /// `SYSGENID_KIND_CLONE` or `SYSGENID_KIND_RESTORE` (unknown with a
    /// daemon that predates kinds). Appended: callers built against an
    /// older header pass a smaller `size` and never see it.
    pub last_change_kind: u32,
    /// 1 if the kernel's random number generator was reseeded before the
    /// last change was published (by the kernel's own VM-fork reseed or
    /// by the daemon), 0 if not or unknown (no change yet, an older
    /// daemon); `sysgenidctl status` says why not.
    pub kernel_reseeded: u32,
    /// Bytes of host entropy mixed into the kernel's pool for the last
    /// change (0: none).
    pub entropy_mixed: u32,
}

/// `sysgenid_status.last_change_kind` and the `kind` of
/// `sysgenid_trigger_update_details`: not said.
pub const SYSGENID_KIND_UNKNOWN: u32 = 0;
/// A clone: one of possibly several copies of a snapshot.
pub const SYSGENID_KIND_CLONE: u32 = 1;
/// A restore in place: the same machine put back in time.
pub const SYSGENID_KIND_RESTORE: u32 = 2;

/// The page word, as C sees it. cbindgen renames it to `volatile uint32_t`
/// (see `cbindgen.toml`) and does not emit it: it only spells the
/// `sysgenid_probe_open` out-parameter.
pub type sysgenid_volatile_u32 = u32;

fn neg(e: &Error) -> c_int {
    -e.errno()
}

/// Runs `f`, turning a panic into `-EIO`.
fn guard(f: impl FnOnce() -> c_int) -> c_int {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(-libc::EIO)
}

fn last_errno() -> c_int {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn timeout(ms: u32) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(u64::from(ms)))
}

impl sysgenid_watcher {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic under the lock leaves nothing half-updated that matters
        // (the Rust watcher is consistent between calls), so ignore poison.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the epoll set pointing at the current socket (it changes when
    /// the client reconnects). Closing the old socket removed it already.
    fn sync(&self, inner: &mut Inner) -> Result<(), c_int> {
        let fd = inner.watcher.as_raw_fd();
        if fd == inner.registered {
            return Ok(());
        }
        epoll_add(&self.epoll, fd)?;
        inner.registered = fd;
        Ok(())
    }

    /// Runs `op` on the Rust watcher, then re-syncs the epoll set.
    fn with<T>(&self, op: impl FnOnce(&mut Watcher) -> Result<T, Error>) -> Result<T, c_int> {
        let mut inner = self.lock();
        let result = op(&mut inner.watcher).map_err(|e| neg(&e));
        self.sync(&mut inner)?;
        result
    }
}

fn epoll_add(epoll: &OwnedFd, fd: RawFd) -> Result<(), c_int> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    for op in [libc::EPOLL_CTL_ADD, libc::EPOLL_CTL_MOD] {
        // SAFETY: `epoll` is an open epoll instance we own, `fd` an open
        // socket owned by the watcher, `ev` a valid epoll_event.
        let rc = unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut ev) };
        if rc == 0 {
            return Ok(());
        }
        let errno = last_errno();
        if errno != libc::EEXIST {
            return Err(-errno);
        }
    }
    Err(-libc::EEXIST)
}

fn open(flags: u32) -> Result<Box<sysgenid_watcher>, c_int> {
    if flags & !KNOWN_FLAGS != 0 {
        return Err(-libc::EINVAL);
    }
    let nonblocking = flags & SYSGENID_NONBLOCK != 0;
    let watcher = Watcher::builder()
        .untracked(flags & SYSGENID_UNTRACKED != 0)
        .lifecycle(flags & SYSGENID_LIFECYCLE != 0)
        .nonblocking(nonblocking)
        .open()
        .map_err(|e| neg(&e))?;
    // SAFETY: epoll_create1 has no memory-safety preconditions.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(-last_errno());
    }
    // SAFETY: `epfd` is a fresh descriptor that nothing else owns.
    let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
    let fd = watcher.as_raw_fd();
    epoll_add(&epoll, fd)?;
    Ok(Box::new(sysgenid_watcher {
        inner: Mutex::new(Inner {
            watcher,
            registered: fd,
        }),
        epoll,
        nonblocking,
        lifecycle: flags & SYSGENID_LIFECYCLE != 0,
    }))
}

/// Opens a watcher: connects to `sysgenidd` (runtime directory from
/// `SYSGENID_RUNTIME_DIR`, default `/run/sysgenid`) and registers as up to
/// date with the current generation, like `open("/dev/sysgenid")`.
///
/// `flags`: 0 or an OR of `SYSGENID_NONBLOCK`, `SYSGENID_UNTRACKED` and
/// `SYSGENID_LIFECYCLE`.
///
/// Ownership: on success `*out` is a new watcher owned by the caller, to be
/// freed with `sysgenid_close`; on failure `*out` is left untouched.
/// Blocking: waits for the daemon's handshake (one round trip).
/// Thread safety: may be called from any thread.
/// The watcher survives daemon restarts: it reconnects by itself, telling
/// the daemon what it acknowledged last, so a change missed meanwhile is
/// still delivered.
///
/// Returns 0, or:
/// - `-EINVAL`: `out` is NULL or `flags` has unknown bits;
/// - `-ENOENT`, `-ECONNREFUSED`, `-EACCES`: the daemon's socket is missing,
///   nobody listens on it, or it may not be opened;
/// - `-EPERM`: the daemon there runs as neither root nor the caller's uid
///   (someone else's, possibly planted): refused before anything is sent;
/// - `-EUSERS`: the daemon's watcher limit is reached;
/// - `-EPROTONOSUPPORT`: the daemon speaks another protocol version (or,
///   with `SYSGENID_LIFECYCLE`, predates the lifecycle);
/// - `-EMFILE`, `-ENFILE`, `-ENOMEM`: out of descriptors or memory;
/// - `-EIO`: anything unexpected.
///
/// # Safety
/// `out` must be NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_open(out: *mut *mut sysgenid_watcher, flags: u32) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        match open(flags) {
            Ok(w) => {
                // SAFETY: `out` is non-null and, by the caller's contract,
                // valid for writing one pointer.
                unsafe { out.write(Box::into_raw(w)) };
                0
            }
            Err(e) => e,
        }
    })
}

/// The watcher's descriptor, for poll/select/epoll: readable (`POLLIN`)
/// exactly while the watcher is outdated, i.e. until it acknowledges the
/// current generation. Only wait for readability on it: never read, write or
/// close it.
///
/// The number stays the same for the life of the watcher, across daemon
/// restarts (it is an epoll instance holding the watcher's connection).
/// It also becomes readable while the daemon is away; `sysgenid_read` then
/// reconnects.
///
/// Ownership: the descriptor belongs to the watcher; `sysgenid_close`
/// closes it (remove it from your epoll set first). It is close-on-exec.
/// Blocking: never. Thread safety: may be called from any thread, also
/// while another thread is inside a call on the same watcher.
///
/// Returns the descriptor (>= 0), or `-EINVAL` if `w` is NULL.
///
/// # Safety
/// `w` must be NULL or a watcher from `sysgenid_open` not yet closed.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_fd(w: *const sysgenid_watcher) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        match unsafe { w.as_ref() } {
            Some(w) => w.epoll.as_raw_fd(),
            None => -libc::EINVAL,
        }
    })
}

/// Reads the generation this watcher must handle, like `read()` on the
/// seed's device: blocks until the watcher is outdated (a restore happened
/// since it last acknowledged, or since it was opened), then stores the
/// current generation in `*generation`. It returns the same value again on
/// every call until `sysgenid_ack` acknowledges it (or a newer one when
/// another change happens first).
///
/// Blocking: yes, unless the watcher was opened with `SYSGENID_NONBLOCK`.
/// A blocked read returns `-EINTR` when a signal handler runs (it is never
/// restarted, whatever `SA_RESTART` says). If the daemon restarts, the read
/// reconnects, waiting for the daemon to come back (backoff from 10 ms to
/// 1 s; not interruptible while it waits), even with `SYSGENID_NONBLOCK`:
/// an event loop woken by the old connection's hang-up has no other event
/// that would tell it when the daemon is back.
/// Thread safety: calls on one watcher are serialized; a thread blocked here
/// does not hold the watcher's lock while it waits, so another thread may
/// `sysgenid_ack` meanwhile.
///
/// Returns 0, or:
/// - `-EAGAIN`: `SYSGENID_NONBLOCK` and the watcher is up to date;
/// - `-EINTR`: interrupted by a signal before a change arrived;
/// - `-EINVAL`: `w` or `generation` is NULL;
/// - `-EPROTO`: the daemon sent something unexpected;
/// - `-EIO` or another errno of `poll(2)`/`recv(2)`: a system call failed.
///
/// # Safety
/// `w` must be NULL or a live watcher; `generation` NULL or valid for
/// writing a `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_read(w: *mut sysgenid_watcher, generation: *mut u32) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let Some(w) = (unsafe { w.as_ref() }) else {
            return -libc::EINVAL;
        };
        if generation.is_null() {
            return -libc::EINVAL;
        }
        match read_blocking(w, |watcher| watcher.try_read()) {
            Ok(g) => {
                // SAFETY: non-null and, by contract, writable.
                unsafe { generation.write(g) };
                0
            }
            Err(e) => e,
        }
    })
}

/// The blocking read shared by `sysgenid_read` and `sysgenid_read_event`:
/// `try_op` until it yields, polling the stable descriptor in between (so a
/// signal interrupts the wait with `-EINTR`), waiting out a daemon restart
/// with backoff in both modes (see `sysgenid_read`).
fn read_blocking<T>(
    w: &sysgenid_watcher,
    mut try_op: impl FnMut(&mut Watcher) -> Result<Option<T>, Error>,
) -> Result<T, c_int> {
    let mut backoff = Duration::from_millis(10);
    loop {
        match w.with(&mut try_op) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) if w.nonblocking => return Err(-libc::EAGAIN),
            Ok(None) => {}
            // The daemon is away (restarting): wait for it to come back.
            Err(e) if [libc::ECONNRESET, libc::ECONNREFUSED, libc::ENOENT].contains(&-e) => {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
            Err(e) => return Err(e),
        }
        backoff = Duration::from_millis(10);
        let mut pfd = libc::pollfd {
            fd: w.epoll.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, -1) } < 0 {
            return Err(-last_errno());
        }
    }
}

/// Copies the first `size` bytes of `value` to `out` and zeroes the bytes
/// past it: the append-only struct convention of `sysgenid_get_status` and
/// `sysgenid_read_event`.
///
/// # Safety
/// `out` must be valid for writing `size` bytes.
unsafe fn copy_out<T: Copy>(value: &T, out: *mut u8, size: usize) {
    let ours = std::mem::size_of::<T>();
    // SAFETY: `out` is valid for `size` bytes by contract; we copy at most
    // `min(size, ours)` bytes from a live value and zero the rest.
    unsafe {
        std::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), out, size.min(ours));
        if size > ours {
            std::ptr::write_bytes(out.add(ours), 0, size - ours);
        }
    }
}

/// Acknowledges `generation`, like `write()` on the seed's device: this
/// watcher has renewed its state for it. It must be the current generation
/// (the one `sysgenid_read` returned, unless a newer change happened since);
/// the watcher's descriptor stops being readable.
///
/// Blocking: one round trip to the daemon. Thread safety: calls on one
/// watcher are serialized.
///
/// Returns 0, or:
/// - `-EINVAL`: `generation` is not the current generation (nothing
///   changes: read again, handle the newer one, ack that), or `w` is NULL;
/// - `-EIO`, `-EPROTO`: the daemon could not be reached or misbehaved.
///
/// # Safety
/// `w` must be NULL or a live watcher.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_ack(w: *mut sysgenid_watcher, generation: u32) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let Some(w) = (unsafe { w.as_ref() }) else {
            return -libc::EINVAL;
        };
        match w.with(|watcher| watcher.ack(generation)) {
            Ok(()) => 0,
            Err(e) => e,
        }
    })
}

/// Waits until every tracked watcher has acknowledged the current
/// generation: the seed's `SYSGENID_WAIT_WATCHERS` ioctl, the orchestrator's
/// barrier. `timeout_ms` 0 waits forever.
///
/// With `w` NULL, waits on a separate control connection, which is not a
/// watcher and is therefore never interrupted.
///
/// Blocking: yes, up to `timeout_ms` (it is not interrupted by signals: the
/// daemon ends the wait). Thread safety: holds the watcher's lock for the
/// whole wait, so other calls on the same watcher wait too; use a separate
/// watcher (or NULL) to wait from another thread.
///
/// Returns 0, or:
/// - `-EINTR`: this watcher is outdated, or became outdated during the wait
///   (a new change arrived): read, handle, ack, then wait again;
/// - `-ETIMEDOUT`: tracked watchers were still outdated after `timeout_ms`
///   (`sysgenid_get_status` tells how many now);
/// - `-EIO`, `-EPROTO`, or a connection errno: the daemon could not be
///   reached or misbehaved.
///
/// # Safety
/// `w` must be NULL or a live watcher.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_wait_watchers(
    w: *mut sysgenid_watcher,
    timeout_ms: u32,
) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let result = match unsafe { w.as_ref() } {
            Some(w) => w.with(|watcher| watcher.wait_watchers(timeout(timeout_ms))),
            None => Control::connect(None)
                .and_then(|mut c| c.wait_watchers(timeout(timeout_ms)))
                .map_err(|e| neg(&e)),
        };
        result.map_or_else(|e| e, |()| 0)
    })
}

/// Forces a generation update: the seed's `SYSGENID_FORCE_GEN_UPDATE`. The
/// new generation is `max(min_generation, current + 1)`; every watcher
/// (this one included) becomes outdated. Privileged: root, or
/// `CAP_SYS_ADMIN`/`CAP_CHECKPOINT_RESTORE`, or the daemon's own uid.
///
/// With `w` NULL, uses a separate control connection for the one request.
///
/// Blocking: one round trip. Thread safety: calls on one watcher are
/// serialized.
///
/// Returns 0, or:
/// - `-EACCES`: the caller may not force updates;
/// - `-EOVERFLOW`: the generation would pass `UINT32_MAX`, or the minimum
///   would exhaust the counter (see `sysgenid_trigger_update_flags`);
///   nothing changes;
/// - `-ENOENT`, `-ECONNREFUSED` (NULL `w`): the daemon is not running;
/// - `-EPERM` (NULL `w`): the daemon runs as neither root nor the caller;
/// - `-EIO`, `-EPROTO`: the daemon could not be reached or misbehaved.
///
/// # Safety
/// `w` must be NULL or a live watcher.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_trigger_update(
    w: *mut sysgenid_watcher,
    min_generation: u32,
) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let result = match unsafe { w.as_ref() } {
            Some(w) => w.with(|watcher| watcher.trigger_update(min_generation)),
            None => Control::connect(None)
                .and_then(|mut c| c.bump(min_generation))
                .map_err(|e| neg(&e)),
        };
        result.map_or_else(|e| e, |_| 0)
    })
}

/// Flag for [`sysgenid_trigger_update_flags`]: accept a minimum in the
/// counter's last 2^20 values (up to `UINT32_MAX`, after which no later
/// restore can ever be signalled).
pub const SYSGENID_UPDATE_ALLOW_EXHAUSTION: u32 = 1;

/// `sysgenid_trigger_update` with `flags`: 0, or
/// `SYSGENID_UPDATE_ALLOW_EXHAUSTION`. Unknown flags give `-EINVAL` and
/// change nothing. Without the flag, a `min_generation` above
/// 4293918719 that jumps past `current + 1` gives `-EOVERFLOW`.
///
/// # Safety
/// `w` must be NULL or a live watcher.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_trigger_update_flags(
    w: *mut sysgenid_watcher,
    min_generation: u32,
    flags: u32,
) -> c_int {
    if flags & !SYSGENID_UPDATE_ALLOW_EXHAUSTION != 0 {
        return -libc::EINVAL;
    }
    let allow = flags & SYSGENID_UPDATE_ALLOW_EXHAUSTION != 0;
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let result = match unsafe { w.as_ref() } {
            Some(w) => w.with(|watcher| {
                if allow {
                    watcher.trigger_update_allowing_exhaustion(min_generation)
                } else {
                    watcher.trigger_update(min_generation)
                }
            }),
            None => Control::connect(None)
                .and_then(|mut c| {
                    if allow {
                        c.bump_allowing_exhaustion(min_generation)
                    } else {
                        c.bump(min_generation)
                    }
                })
                .map_err(|e| neg(&e)),
        };
        result.map_or_else(|e| e, |_| 0)
    })
}

/// `sysgenid_trigger_update_flags` that also says what the change is, for
/// hooks and watchers (`SYSGENID_KIND`), hands the daemon entropy to mix
/// into the kernel's pool before it reseeds it and draws the new epoch,
/// and names the hostname the hooks get (`SYSGENID_HOSTNAME`).
///
/// - `kind`: `SYSGENID_KIND_UNKNOWN`, `SYSGENID_KIND_CLONE` or
///   `SYSGENID_KIND_RESTORE`;
/// - `entropy`, `entropy_len`: NULL and 0, or 32 to 512 bytes (read, never
///   kept: the library's copy is wiped once sent);
/// - `hostname`: NULL, or a NUL-terminated valid hostname of at most 64
///   bytes (letters, digits, hyphens, dots).
///
/// Returns what `sysgenid_trigger_update_flags` returns, and `-EINVAL`
/// (nothing sent, nothing changes) for an unknown flag or kind, an entropy
/// length outside 32..=512 (or a NULL `entropy` with a length), or an
/// invalid hostname. A daemon that predates these details refuses them
/// with `-EPROTO`, and nothing changes.
///
/// # Safety
/// `w` must be NULL or a live watcher; `entropy` NULL or valid for reading
/// `entropy_len` bytes; `hostname` NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_trigger_update_details(
    w: *mut sysgenid_watcher,
    min_generation: u32,
    flags: u32,
    kind: u32,
    entropy: *const u8,
    entropy_len: usize,
    hostname: *const std::ffi::c_char,
) -> c_int {
    if flags & !SYSGENID_UPDATE_ALLOW_EXHAUSTION != 0 {
        return -libc::EINVAL;
    }
    let allow = flags & SYSGENID_UPDATE_ALLOW_EXHAUSTION != 0;
    guard(|| {
        let Some(kind) = u8::try_from(kind)
            .ok()
            .and_then(sysgenid_client::ChangeKind::from_code)
        else {
            return -libc::EINVAL;
        };
        let entropy = match (entropy.is_null(), entropy_len) {
            (true, 0) => None,
            (true, _) => return -libc::EINVAL,
            (false, len) if len > sysgenid_client::MAX_ENTROPY => return -libc::EINVAL,
            (false, len) => {
                // SAFETY: by the caller's contract `entropy` is valid for
                // reading `len` bytes (at most MAX_ENTROPY, checked above).
                let bytes = unsafe { std::slice::from_raw_parts(entropy, len) };
                match sysgenid_client::Entropy::new(bytes.to_vec()) {
                    Ok(e) => Some(e),
                    Err(_) => return -libc::EINVAL,
                }
            }
        };
        let hostname = if hostname.is_null() {
            None
        } else {
            // SAFETY: by the caller's contract a NUL-terminated string.
            let name = unsafe { std::ffi::CStr::from_ptr(hostname) };
            match name
                .to_str()
                .ok()
                .and_then(|n| sysgenid_client::Hostname::new(n).ok())
            {
                Some(h) => Some(h),
                None => return -libc::EINVAL,
            }
        };
        let details = sysgenid_client::BumpDetails {
            kind,
            entropy,
            hostname,
        };
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let result = match unsafe { w.as_ref() } {
            Some(w) => {
                w.with(|watcher| watcher.trigger_update_with(min_generation, allow, details))
            }
            None => Control::connect(None)
                .and_then(|mut c| c.bump_with(min_generation, allow, details))
                .map_err(|e| match e {
                    Error::Protocol(_) => -libc::EPROTO,
                    e => neg(&e),
                }),
        };
        result.map_or_else(|e| e, |_| 0)
    })
}

/// Asks the daemon for its counters (generation, watchers, how many are
/// still outdated) and copies the first `size` bytes of a
/// `sysgenid_status` into `*out`; pass `sizeof(sysgenid_status)`.
/// Bytes past what this library knows are zeroed.
///
/// With `w` NULL, uses a separate control connection.
///
/// Blocking: one round trip. Thread safety: calls on one watcher are
/// serialized.
///
/// Returns 0, or `-EINVAL` (`out` NULL), or the errno of a failed
/// connection as for `sysgenid_trigger_update`.
///
/// # Safety
/// `w` must be NULL or a live watcher; `out` NULL or valid for writing
/// `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_get_status(
    w: *mut sysgenid_watcher,
    out: *mut sysgenid_status,
    size: usize,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return -libc::EINVAL;
        }
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let report = match unsafe { w.as_ref() } {
            Some(w) => w.with(|watcher| watcher.status()),
            None => Control::connect(None)
                .and_then(|mut c| c.status())
                .map_err(|e| neg(&e)),
        };
        let report = match report {
            Ok(r) => r,
            Err(e) => return e,
        };
        let status = sysgenid_status {
            generation: report.generation,
            watchers: report.watchers,
            tracked: report.tracked,
            outdated: report.outdated,
            outdated_untracked: report.outdated_untracked,
            state: match report.state {
                LifecycleState::Running => SYSGENID_STATE_RUNNING,
                LifecycleState::Freezing => SYSGENID_STATE_FREEZING,
                LifecycleState::Frozen => SYSGENID_STATE_FROZEN,
            },
            pending: report.pending,
            participants: report.participants,
            freeze: report.freeze,
            last_change_kind: u32::from(report.last_change_kind.code()),
            kernel_reseeded: u32::from(report.last_change_rng.as_ref().is_some_and(|r| r.reseeded)),
            entropy_mixed: report
                .last_change_rng
                .as_ref()
                .map_or(0, |r| r.entropy_mixed),
        };
        // SAFETY: `out` is valid for `size` bytes by contract.
        unsafe { copy_out(&status, out.cast::<u8>(), size) };
        0
    })
}

/// Closes a watcher: unregisters it from the daemon (it no longer holds up
/// `sysgenid_wait_watchers`) and closes its descriptor, like `close()` on
/// the seed's device.
///
/// Ownership: frees `w`; NULL is a no-op. Blocking: never.
/// Thread safety: no other call on `w` may be running or follow.
///
/// # Safety
/// `w` must be NULL or a live watcher from `sysgenid_open`, not used again.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_close(w: *mut sysgenid_watcher) {
    guard(|| {
        if !w.is_null() {
            // SAFETY: `w` came from `Box::into_raw` in `sysgenid_open` and,
            // by contract, is closed once and not used again.
            drop(unsafe { Box::from_raw(w) });
        }
        0
    });
}

static PROBE: OnceLock<Probe> = OnceLock::new();

/// Maps the generation page (`<runtime dir>/generation`, read-only) and
/// stores in `*generation` a pointer to the current generation, which the
/// daemon updates in place before it notifies any watcher. Reading it is
/// one memory load, no system call: the seed's `mmap()` interface, for
/// hot paths.
///
/// The page is mapped once per process: later calls return the same
/// pointer. It stays valid for the life of the process, across bumps and
/// daemon restarts (the file is rewritten in place, never replaced).
///
/// The value is a hint: after a restore there is a window before the
/// daemon learns of it, so an unchanged value does not prove nothing
/// happened. Renew state when it changes, and use a watcher's
/// `sysgenid_ack` to confirm (see `examples/c/cached_secret.c`).
///
/// Ownership: the mapping belongs to the library; never unmap or write it.
/// Blocking: opens and maps a file on the first call only.
/// Thread safety: may be called from any thread; the pointer may be read
/// from any thread.
///
/// Returns 0, or:
/// - `-EINVAL`: `generation` is NULL;
/// - `-ENOENT`, `-EACCES`: the page file is missing (daemon never ran on
///   this runtime directory) or not readable;
/// - `-EPERM`: the page is owned by neither root nor the caller's uid, or
///   is writable by group or others: it is not trusted;
/// - `-EPROTO`: the file is not a generation page;
/// - `-ENOMEM` or another errno of `open(2)`/`mmap(2)`.
///
/// # Safety
/// `generation` must be NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_probe_open(
    generation: *mut *const sysgenid_volatile_u32,
) -> c_int {
    guard(|| {
        if generation.is_null() {
            return -libc::EINVAL;
        }
        let probe = match PROBE.get() {
            Some(p) => p,
            None => match Probe::open(None) {
                // A racing thread may have set it first; keep the winner
                // (the loser's mapping was never handed out).
                Ok(p) => PROBE.get_or_init(|| p),
                Err(e) => return neg(&e),
            },
        };
        let word = probe.generation_word().as_ptr().cast_const();
        // SAFETY: non-null and, by contract, writable.
        unsafe { generation.write(word) };
        0
    })
}
