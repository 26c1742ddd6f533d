//! The snapshot lifecycle on the client side: the events a participant reads
//! (freeze, thaw, change), its confirmation, and the orchestrator's freeze
//! and thaw. Kept apart from the plain watcher so that code which never opts
//! in reads exactly as before. The model is `docs/lifecycle.md`.

use std::time::Duration;

use sysgenid_proto::{Reply, Request, LIFECYCLE_VERSION};

use crate::conn::Try;
use crate::{expect_done, Control, Error, ErrorCode, Watcher};

/// What a lifecycle participant is told, in the order it happened.
///
/// ```no_run
/// use sysgenid::{Event, Watcher};
/// let mut w = Watcher::builder().lifecycle(true).open()?;
/// loop {
///     match w.read_event()? {
///         Event::Freeze { freeze, .. } => {
///             // flush, drop secrets, stop handing out ids ...
///             w.confirm(freeze)?;
///         }
///         Event::Thaw { .. } => { /* resume */ }
///         Event::Change { generation } => {
///             // reseed, regenerate ids ...
///             w.ack(generation)?;
///         }
///     }
/// }
/// # Ok::<(), sysgenid::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Quiesce, then [`Watcher::confirm`] this freeze. Also the first event
    /// of a participant that registers while the system is frozen (it then
    /// counts as frozen already; confirming does no harm).
    Freeze {
        /// The freeze's number, to confirm.
        freeze: u32,
        /// The generation at the time.
        generation: u32,
    },
    /// Resume: the freeze ended (thawed, aborted, or thawed by itself after
    /// a restore or at the freeze bound).
    Thaw {
        /// The freeze that ended.
        freeze: u32,
        /// The generation at the time.
        generation: u32,
    },
    /// The generation changed: renew, then [`Watcher::ack`] it. Reported
    /// again on every read until acknowledged, as in [`Watcher::read`].
    Change {
        /// The new generation.
        generation: u32,
    },
}

impl Event {
    pub(crate) fn from_reply(reply: &Reply) -> Option<Event> {
        match *reply {
            Reply::Freeze { freeze, generation } => Some(Event::Freeze { freeze, generation }),
            Reply::Thaw { freeze, generation } => Some(Event::Thaw { freeze, generation }),
            Reply::Changed { generation } => Some(Event::Change { generation }),
            _ => None,
        }
    }

    /// `freeze`, `thaw` or `change`: the names `sysgenidctl` and hooks use.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Freeze { .. } => "freeze",
            Event::Thaw { .. } => "thaw",
            Event::Change { .. } => "change",
        }
    }

    /// The generation the event carries.
    pub fn generation(&self) -> u32 {
        match *self {
            Event::Freeze { generation, .. }
            | Event::Thaw { generation, .. }
            | Event::Change { generation } => generation,
        }
    }
}

/// What a participant remembers of the freezes it was told of, for
/// reconnections: freeze numbers belong to one daemon run, so each is kept
/// with the connection it came on. One piece for the sync [`Watcher`] and
/// the async watcher.
#[derive(Debug, Default)]
pub(crate) struct Freezes {
    /// Counts reconnections.
    conn_no: u64,
    /// The freeze last told of and not yet thawed from, with the connection
    /// it came on.
    frozen: Option<(u32, u64)>,
    /// The latest freeze told of, with its connection (kept after the thaw).
    last: Option<(u32, u64)>,
}

impl Freezes {
    /// Remembers an event the participant is about to be given.
    pub(crate) fn note(&mut self, event: Event) -> Event {
        match event {
            Event::Freeze { freeze, .. } => {
                self.frozen = Some((freeze, self.conn_no));
                self.last = self.frozen;
            }
            Event::Thaw { .. } => self.frozen = None,
            Event::Change { .. } => {}
        }
        event
    }

    /// Whether `freeze` was told of on an earlier connection (so by a daemon
    /// that is gone): confirming it succeeds and sends nothing.
    pub(crate) fn told_before_reconnecting(&self, freeze: u32) -> bool {
        matches!(self.last, Some((id, on)) if id == freeze && on != self.conn_no)
    }

    /// The number of the current connection.
    pub(crate) fn conn_no(&self) -> u64 {
        self.conn_no
    }

    /// Counts a reconnection to a daemon that welcomed at `generation`. A
    /// daemon that restarted comes up running: a participant that was
    /// frozen is to be told to thaw (the returned event), unless the new
    /// daemon froze it again (`refrozen`, asked only then: it sends that
    /// Freeze right behind the Welcome).
    pub(crate) fn reconnected(
        &mut self,
        generation: u32,
        refrozen: impl FnOnce() -> bool,
    ) -> Option<Event> {
        self.conn_no += 1;
        let (freeze, _) = self.frozen?;
        (!refrozen()).then_some(Event::Thaw { freeze, generation })
    }
}

impl Watcher {
    /// Blocks for the next lifecycle event (in non-blocking mode:
    /// [`Error::WouldBlock`] when there is none). Freeze and thaw events are
    /// returned once each, in order; a change is returned on every call
    /// until acknowledged (or [`skip`](Self::skip)ped). On a watcher opened
    /// without [`lifecycle`](crate::WatcherBuilder::lifecycle) only changes
    /// arrive.
    ///
    /// Events that arrive while a request waits for its reply are kept and
    /// returned first; after a request, read until
    /// [`try_read_event`](Self::try_read_event) gives `None` before polling
    /// the descriptor again.
    pub fn read_event(&mut self) -> Result<Event, Error> {
        let event = self.blocking(|w| match w.events.pop_front() {
            Some(event) => Ok(Try::Ready(event)),
            None => w.conn.try_event(w.skipped),
        })?;
        Ok(self.freezes.note(event))
    }

    /// Like [`read_event`](Self::read_event) but never blocks: `Ok(None)`
    /// when there is nothing.
    pub fn try_read_event(&mut self) -> Result<Option<Event>, Error> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(self.freezes.note(event)));
        }
        let event = match self.conn.try_event(self.skipped) {
            Ok(Try::Ready(event)) => Some(event),
            Ok(Try::WouldBlock) => None,
            Err(Error::Disconnected) if self.opts.reconnect => {
                self.reconnect_once()?;
                match self.events.pop_front() {
                    Some(event) => Some(event),
                    None => match self.conn.try_event(self.skipped)? {
                        Try::Ready(event) => Some(event),
                        Try::WouldBlock => None,
                    },
                }
            }
            Err(e) => return Err(e),
        };
        Ok(event.map(|e| self.freezes.note(e)))
    }

    /// Confirms that this participant has quiesced for freeze `freeze`.
    /// Confirming a freeze that already ended succeeds and changes nothing
    /// (its thaw is on the way); one never asked for is refused.
    ///
    /// A freeze read before the daemon restarted is gone with that daemon:
    /// confirming it afterwards succeeds and sends nothing (its thaw is
    /// reported by the reconnection).
    pub fn confirm(&mut self, freeze: u32) -> Result<(), Error> {
        // The daemon treats a Confirm from a plain watcher (or on a
        // version 1 connection) as a protocol violation and hangs up:
        // refuse it here, sending nothing, with the code it would name.
        if !self.opts.lifecycle {
            return Err(Error::Refused {
                code: ErrorCode::NotAParticipant,
                message: "this watcher is not a lifecycle participant; open it with lifecycle(true) to confirm freezes".into(),
            });
        }
        if self.freezes.told_before_reconnecting(freeze) {
            return Ok(());
        }
        let before = self.freezes.conn_no();
        match self.request(&Request::Confirm { freeze }) {
            Err(Error::Refused {
                code: ErrorCode::WrongFreeze,
                ..
            }) if self.freezes.conn_no() != before => Ok(()),
            other => other.map(drop),
        }
    }

    /// Leaves `generation` unacknowledged (the watcher stays outdated and
    /// keeps holding up `wait-watchers`) but stops reporting it: the next
    /// read waits for a newer generation or a lifecycle event. For a
    /// renewal that failed and should not be retried in a loop.
    pub fn skip(&mut self, generation: u32) {
        self.skipped = Some(generation);
    }
}

impl Control {
    /// Freezes every lifecycle participant (privileged, like
    /// [`bump`](Self::bump)). Returns the generation once the system is
    /// frozen (at once if it already is);
    /// [`Error::FreezeAborted`] if `timeout` (`None`: the daemon's default,
    /// 30 s) passed first, in which case everyone was thawed again.
    pub fn freeze(&mut self, timeout: Option<Duration>) -> Result<u32, Error> {
        self.require_lifecycle()?;
        self.conn.send(&Request::Freeze {
            timeout_ms: crate::timeout_ms(timeout),
        })?;
        expect_done(self.conn.reply()?)
    }

    /// Thaws (privileged). Succeeds and changes nothing when not frozen; a
    /// freeze still in progress is aborted.
    pub fn thaw(&mut self) -> Result<u32, Error> {
        self.require_lifecycle()?;
        self.conn.send(&Request::Thaw)?;
        expect_done(self.conn.reply()?)
    }

    fn require_lifecycle(&self) -> Result<(), Error> {
        if self.version >= LIFECYCLE_VERSION {
            return Ok(());
        }
        Err(Error::VersionMismatch {
            daemon: self.version,
            message: format!(
                "this sysgenidd speaks protocol {}, which has no snapshot lifecycle (freeze/thaw need protocol {LIFECYCLE_VERSION}): upgrade the daemon",
                self.version
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freezes_thaw_on_reconnect_only_when_frozen_and_not_frozen_again() {
        let mut f = Freezes::default();
        f.note(Event::Freeze {
            freeze: 3,
            generation: 1,
        });
        assert!(!f.told_before_reconnecting(3));
        assert_eq!(
            f.reconnected(2, || false),
            Some(Event::Thaw {
                freeze: 3,
                generation: 2
            })
        );
        assert!(f.told_before_reconnecting(3));
        assert!(!f.told_before_reconnecting(4));
        assert_eq!(f.reconnected(2, || true), None);
        f.note(Event::Thaw {
            freeze: 3,
            generation: 2,
        });
        assert_eq!(f.reconnected(2, || panic!("not frozen: not asked")), None);
        assert_eq!(f.conn_no(), 3);
        assert!(f.told_before_reconnecting(3));
    }
}
