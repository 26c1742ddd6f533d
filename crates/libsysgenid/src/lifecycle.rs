//! The snapshot lifecycle in the C ABI: a watcher opened with
//! `SYSGENID_LIFECYCLE` is a participant that `sysgenid_read_event` tells to
//! freeze, thaw or renew, and that `sysgenid_confirm`s each freeze;
//! `sysgenid_freeze` / `sysgenid_thaw` are the orchestrator's side. Kept
//! apart from the plain watcher functions, which behave exactly as before
//! (the ABI only grows: a new flag bit, new functions, fields appended to
//! `sysgenid_status`). Model: `docs/lifecycle.md`.

use std::ffi::c_int;

use sysgenid_client::{Control, Event};

use crate::{guard, neg, read_blocking, sysgenid_watcher, timeout};

/// `sysgenid_event.kind`: quiesce, then `sysgenid_confirm(w, ev.freeze)`.
pub const SYSGENID_EVENT_FREEZE: u32 = 1;
/// `sysgenid_event.kind`: resume (the freeze ended: thawed, aborted, or
/// thawed by itself after a restore or at the freeze bound).
pub const SYSGENID_EVENT_THAW: u32 = 2;
/// `sysgenid_event.kind`: the generation changed: renew, then
/// `sysgenid_ack(w, ev.generation)`. Reported on every read until
/// acknowledged.
pub const SYSGENID_EVENT_CHANGE: u32 = 3;

/// `sysgenid_status.state`: normal operation.
pub const SYSGENID_STATE_RUNNING: u32 = 0;
/// `sysgenid_status.state`: participants are quiescing.
pub const SYSGENID_STATE_FREEZING: u32 = 1;
/// `sysgenid_status.state`: every participant confirmed; safe to snapshot.
pub const SYSGENID_STATE_FROZEN: u32 = 2;

/// One lifecycle event, filled by `sysgenid_read_event`. Fields may be
/// appended in later versions; `sysgenid_read_event` takes the caller's
/// `sizeof` and fills only what fits.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct sysgenid_event {
    /// `SYSGENID_EVENT_FREEZE`, `SYSGENID_EVENT_THAW` or
    /// `SYSGENID_EVENT_CHANGE`.
    pub kind: u32,
    /// The generation: the new one for a change, the current one for a
    /// freeze or thaw.
    pub generation: u32,
    /// The freeze's number (to pass to `sysgenid_confirm`); the freeze that
    /// ended for a thaw; 0 for a change.
    pub freeze: u32,
}

impl From<Event> for sysgenid_event {
    fn from(event: Event) -> Self {
        match event {
            Event::Freeze { freeze, generation } => sysgenid_event {
                kind: SYSGENID_EVENT_FREEZE,
                generation,
                freeze,
            },
            Event::Thaw { freeze, generation } => sysgenid_event {
                kind: SYSGENID_EVENT_THAW,
                generation,
                freeze,
            },
            Event::Change { generation } => sysgenid_event {
                kind: SYSGENID_EVENT_CHANGE,
                generation,
                freeze: 0,
            },
        }
    }
}

/// Reads the next lifecycle event: a freeze, a thaw, or a change of the
/// generation, and copies the first `size` bytes of a `sysgenid_event` into
/// `*event`; pass `sizeof(sysgenid_event)`. Bytes past what this library
/// knows are zeroed.
///
/// Freeze and thaw events are returned once each, in order; a change is
/// returned again on every call until `sysgenid_ack` acknowledges it. On a
/// watcher opened without `SYSGENID_LIFECYCLE` only changes arrive (use
/// `sysgenid_read` there). On a lifecycle watcher use this function, not
/// `sysgenid_read`, which skips freeze and thaw events: a freeze nobody
/// confirms holds the freeze up until its timeout.
///
/// A participant that registers while the system is frozen reads a freeze
/// first (it counts as frozen already; confirming does no harm).
///
/// Blocking, signals, daemon restarts and thread safety: as
/// `sysgenid_read` (`-EAGAIN` with `SYSGENID_NONBLOCK` when there is no
/// event; `-EINTR` when a signal handler runs while blocked). The
/// descriptor of `sysgenid_fd` is readable while an event is waiting.
///
/// Returns 0, or:
/// - `-EAGAIN`: `SYSGENID_NONBLOCK` and no event is waiting;
/// - `-EINTR`: interrupted by a signal before an event arrived;
/// - `-EINVAL`: `w` or `event` is NULL;
/// - `-EPROTO`: the daemon sent something unexpected;
/// - `-EIO` or another errno of `poll(2)`/`recv(2)`: a system call failed.
///
/// # Safety
/// `w` must be NULL or a live watcher; `event` NULL or valid for writing
/// `size` bytes.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_read_event(
    w: *mut sysgenid_watcher,
    event: *mut sysgenid_event,
    size: usize,
) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let Some(w) = (unsafe { w.as_ref() }) else {
            return -libc::EINVAL;
        };
        if event.is_null() {
            return -libc::EINVAL;
        }
        let got = match read_blocking(w, |watcher| watcher.try_read_event()) {
            Ok(e) => sysgenid_event::from(e),
            Err(e) => return e,
        };
        // SAFETY: `event` is valid for `size` bytes by contract.
        unsafe { crate::copy_out(&got, event.cast::<u8>(), size) };
        0
    })
}

/// Confirms that this participant has quiesced for freeze `freeze` (the
/// `freeze` field of its `SYSGENID_EVENT_FREEZE`). The freeze completes once
/// every tracked participant confirmed. Confirming a freeze that already
/// ended succeeds and changes nothing (its thaw is on the way).
///
/// Blocking: one round trip. Thread safety: calls on one watcher are
/// serialized.
///
/// Returns 0, or:
/// - `-EINVAL`: `w` is NULL, or `freeze` is a freeze this watcher was never
///   asked to confirm;
/// - `-ENOTCONN`: the watcher was not opened with `SYSGENID_LIFECYCLE`
///   (nothing is sent);
/// - `-EIO`, `-EPROTO`: the daemon could not be reached or misbehaved.
///
/// # Safety
/// `w` must be NULL or a live watcher.
#[no_mangle]
pub unsafe extern "C" fn sysgenid_confirm(w: *mut sysgenid_watcher, freeze: u32) -> c_int {
    guard(|| {
        // SAFETY: by the caller's contract `w` is NULL or a live watcher.
        let Some(w) = (unsafe { w.as_ref() }) else {
            return -libc::EINVAL;
        };
        // Checked here: the daemon treats a confirmation on a plain
        // watcher's connection as a protocol violation and drops it.
        if !w.lifecycle {
            return -libc::ENOTCONN;
        }
        match w.with(|watcher| watcher.confirm(freeze)) {
            Ok(()) => 0,
            Err(e) => e,
        }
    })
}

/// Freezes every lifecycle participant before a snapshot (the
/// orchestrator's side; privileged like `sysgenid_trigger_update`), on a
/// separate control connection. Returns once every tracked participant
/// (and every hook of the daemon) confirmed, at once if the system is
/// frozen already. `timeout_ms` 0 takes the daemon's default.
///
/// Blocking: up to `timeout_ms` (not interrupted by signals).
/// Thread safety: may be called from any thread.
///
/// Returns 0 (frozen), or:
/// - `-ETIMEDOUT`: the timeout passed first: the freeze was aborted and
///   every participant thawed again (`sysgenid_get_status` tells how many
///   were pending while one is in progress);
/// - `-EACCES`: the caller may not freeze;
/// - `-EPROTONOSUPPORT`: the daemon predates the lifecycle;
/// - `-EBUSY`, or another negative errno the daemon reports for a refused
///   freeze;
/// - `-ENOENT`, `-ECONNREFUSED`: the daemon is not running;
/// - `-EIO`, `-EPROTO`: the daemon could not be reached or misbehaved.
#[no_mangle]
pub extern "C" fn sysgenid_freeze(timeout_ms: u32) -> c_int {
    guard(
        || match Control::connect(None).and_then(|mut c| c.freeze(timeout(timeout_ms))) {
            Ok(_) => 0,
            Err(e) => neg(&e),
        },
    )
}

/// Thaws every participant (privileged), on a separate control connection.
/// Succeeds and changes nothing when nothing is frozen; a freeze still in
/// progress is aborted.
///
/// Blocking: one round trip. Thread safety: may be called from any thread.
///
/// Returns 0, or `-EACCES`, `-EPROTONOSUPPORT`, or a connection errno as for
/// `sysgenid_freeze`.
#[no_mangle]
pub extern "C" fn sysgenid_thaw() -> c_int {
    guard(|| match Control::connect(None).and_then(|mut c| c.thaw()) {
        Ok(_) => 0,
        Err(e) => neg(&e),
    })
}
