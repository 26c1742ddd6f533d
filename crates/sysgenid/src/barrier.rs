//! The barrier wait (`wait_watchers`) without a daemon hop when the page
//! can answer it.
//!
//! The daemon publishes the count of outdated tracked watchers on the page
//! and wakes futex waiters on it when it reaches 0 and after every bump
//! (`sysgenid_page`, layout 2). A waiter that sees 0 there is answered
//! exactly as the daemon would answer (`Done`: nothing outdated), one
//! wake-up after the last acknowledgement instead of a message from the
//! daemon. Everything else is still the daemon's to say, over the socket:
//! * the caller's own watcher is outdated (the page's generation is not the
//!   one it acknowledged, or its socket is readable): the daemon answers
//!   `Interrupted`;
//! * the timeout passed: the daemon answers `TimedOut` with its count (or
//!   `Done` if the barrier completed meanwhile), asked with a 1 ms wait;
//! * the connection hung up (checked before every answer from the page, and
//!   at least every [`LIVENESS_SLICE`] while waiting): the daemon stopped,
//!   and the socket path reports it (or reconnects) as before;
//! * a page without the count (an older daemon): the socket, as before;
//! * the daemon stopped cleanly (it stores `OUTDATED_STOPPED` and wakes the
//!   waiters): the `ShuttingDown` refusal parked socket waiters get;
//! * [`UNCHANGED_WAKES`] wake-ups in a row that found the word and the
//!   generation unchanged: anyone who maps the page can `FUTEX_WAKE` the
//!   word in a loop (the daemon wakes only when the count reaches 0 or the
//!   generation changes), which once kept a waiter spinning (2.3 s of CPU
//!   in a 5 s wait). The waiter stops trusting the page and asks the
//!   daemon, whose answer only the daemon can send.

use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags};
use sysgenid_page::PageReader;

use crate::Error;
use sysgenid_proto::ErrorCode;

/// What the daemon says to parked barrier waits on a clean exit.
const SHUTTING_DOWN: &str = "sysgenidd is shutting down; retry when it is back";

/// The longest a waiter sleeps on the page without checking that its
/// connection is alive (a daemon killed with `kill -9` wakes nobody).
pub(crate) const LIVENESS_SLICE: Duration = Duration::from_millis(100);

/// Early wake-ups in a row with nothing changed after which a waiter asks
/// the daemon instead (a signal or a rare spurious wake-up is one; a wake
/// flood by another process is thousands).
pub(crate) const UNCHANGED_WAKES: u32 = 3;

/// The runtime page, mapped the first time a barrier wait needs it (and
/// only if it passes the owner checks `Probe::open` makes).
pub(crate) struct BarrierPage {
    path: PathBuf,
    page: Option<PageReader>,
    tried: bool,
}

impl BarrierPage {
    pub(crate) fn new(path: PathBuf) -> BarrierPage {
        BarrierPage {
            path,
            page: None,
            tried: false,
        }
    }

    fn get(&mut self) -> Option<&PageReader> {
        if !self.tried {
            self.tried = true;
            // The page must pass the checks `Probe::open` makes (owner,
            // writers); an untrusted or missing page leaves the socket.
            self.page = std::fs::File::open(&self.path).ok().and_then(|file| {
                crate::trust::check_page(&file, &self.path).ok()?;
                PageReader::from_file(&file, &self.path).ok()
            });
        }
        self.page.as_ref()
    }
}

/// What the page said.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PageAnswer {
    /// No tracked watcher is outdated (and the caller is not): done.
    Satisfied,
    /// Ask the daemon, waiting at most this long (`None`: forever).
    AskDaemon(Option<Duration>),
}

/// Whether `fd` is readable or hung up, without waiting.
fn has_news(fd: BorrowedFd<'_>) -> Result<bool, Error> {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::Io(e.into())),
        }
    }
}

/// Waits on the page for the barrier. `conn` is the caller's connection
/// (news on it is the daemon's to interpret); `acked` the generation the
/// caller's own watcher acknowledged, if it is a watcher.
pub(crate) fn wait_on_page(
    page: &mut BarrierPage,
    conn: BorrowedFd<'_>,
    timeout: Option<Duration>,
    acked: Option<u32>,
) -> Result<PageAnswer, Error> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
    let Some(page) = page.get() else {
        return Ok(PageAnswer::AskDaemon(timeout));
    };
    // (count, generation, when) seen before the last sleep, and how many
    // sleeps in a row ended early with both unchanged.
    let mut last: Option<(u32, u32, Instant, Duration)> = None;
    let mut unchanged_wakes = 0;
    loop {
        let Some(outdated) = page.outdated_tracked() else {
            return Ok(PageAnswer::AskDaemon(remaining()));
        };
        if outdated == sysgenid_page::OUTDATED_STOPPED {
            return Err(Error::Refused {
                code: ErrorCode::ShuttingDown,
                message: SHUTTING_DOWN.into(),
            });
        }
        // The count is loaded before the generation: after a bump the
        // daemon stores the generation first, so a post-bump count comes
        // with the post-bump generation.
        let own_outdated = acked.is_some_and(|a| page.generation() != a);
        if own_outdated || has_news(conn)? {
            return Ok(PageAnswer::AskDaemon(remaining()));
        }
        if outdated == 0 {
            return Ok(PageAnswer::Satisfied);
        }
        let generation = page.generation();
        if let Some((seen, seen_generation, slept_at, slept_for)) = last {
            let early = slept_at.elapsed() < slept_for;
            if early && seen == outdated && seen_generation == generation {
                unchanged_wakes += 1;
                if unchanged_wakes >= UNCHANGED_WAKES {
                    // Someone else is waking the word: the page cannot be
                    // trusted to sleep on.
                    return Ok(PageAnswer::AskDaemon(remaining()));
                }
            } else {
                unchanged_wakes = 0;
            }
        }
        let slice = match remaining() {
            Some(left) if left.is_zero() => return Ok(PageAnswer::AskDaemon(Some(left))),
            Some(left) => left.min(LIVENESS_SLICE),
            None => LIVENESS_SLICE,
        };
        last = Some((outdated, generation, Instant::now(), slice));
        page.wait_outdated_tracked(outdated, slice);
    }
}
