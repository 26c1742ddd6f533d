//! The snapshot lifecycle: `running` → `freezing` → `frozen` → `running`,
//! the participants that quiesce before a snapshot, and the rules that make
//! sure a freeze always ends. Pure, like the generation logic next door: no
//! clocks (time is passed in as milliseconds of a monotonic clock), no I/O.
//!
//! The daemon turns requests and deaths into calls here and each returned
//! [`Transition`] into frames: who to tell and whom to answer is decided
//! here, how to send it is not. `docs/lifecycle.md` has the diagram.
//!
//! # The rules
//! * A freeze moves `running` to `freezing` and asks every participant to
//!   quiesce; each freeze has a number ([`FreezeId`]) so a late confirmation
//!   of an earlier, aborted freeze never counts for the next one.
//! * When no tracked participant is left unconfirmed the state is `frozen`.
//!   If the deadline passes first the freeze is *aborted*: everyone is told
//!   to thaw and the state is `running` again.
//! * A participant that joins while `freezing` is asked to quiesce and is
//!   waited for; one that joins while `frozen` is frozen at once (told, not
//!   waited for). One that leaves no longer holds anything up.
//! * Thawing moves `frozen` to `running`; while `freezing` it aborts the
//!   freeze; while `running` it succeeds and changes nothing.
//! * A restore (a generation bump) while `frozen` thaws by itself once no
//!   tracked watcher is outdated, unless [`Config::thaw_on_restore`] is off;
//!   a restore while `freezing` aborts the freeze.
//! * No state lasts forever: a freeze that has been `frozen` for
//!   [`Config::max_frozen_ms`] thaws by itself.

use slab::Slab;

use crate::Tracking;

/// Milliseconds on a monotonic clock the caller reads (the core never does).
pub type Millis = u64;

/// The number of one freeze, counted from 1; carried by the freeze event and
/// by the participant's confirmation.
pub type FreezeId = u32;

/// The lifecycle state, as shown in status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Normal operation.
    Running,
    /// A freeze was asked for; participants are quiescing.
    Freezing,
    /// Every tracked participant confirmed; the system may be snapshotted.
    Frozen,
}

impl State {
    /// The name used in status and docs: `running`, `freezing`, `frozen`.
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Freezing => "freezing",
            State::Frozen => "frozen",
        }
    }
}

/// Names one participant; valid until [`Lifecycle::leave`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(usize);

impl ParticipantId {
    /// The raw index, for logs and tables.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Settings of the lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Thaw by itself after a restore while frozen, once no tracked watcher
    /// is outdated (the default). Off leaves thawing to the orchestrator.
    pub thaw_on_restore: bool,
    /// The longest the system stays frozen before it thaws by itself;
    /// `None` never (not recommended: a dead orchestrator wedges everyone).
    pub max_frozen_ms: Option<Millis>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            thaw_on_restore: true,
            max_frozen_ms: Some(DEFAULT_MAX_FROZEN_MS),
        }
    }
}

/// The default freeze bound: ten minutes, longer than any snapshot of a
/// reasonable guest takes and short enough that a dead orchestrator does not
/// leave the machine quiesced for the rest of the day.
pub const DEFAULT_MAX_FROZEN_MS: Millis = 600_000;

/// Why a request was refused. Refusals change nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// Another freeze is in progress (one at a time).
    #[error("freeze {id} is already in progress with {pending} participant(s) still to confirm")]
    Busy {
        /// The freeze in progress.
        id: FreezeId,
        /// Tracked participants that have not confirmed it.
        pending: u32,
    },
    /// A confirmation of a freeze that was never asked for.
    #[error("freeze {confirmed} was never asked for; the latest freeze is {latest}")]
    WrongFreeze {
        /// The number confirmed.
        confirmed: FreezeId,
        /// The latest freeze number.
        latest: FreezeId,
    },
    /// A freeze number space exhausted (after 4 billion freezes).
    #[error("no freeze number is left")]
    Exhausted,
    /// The participant id is not registered (a frontend bug).
    #[error("unknown participant {0}")]
    UnknownParticipant(usize),
}

/// Why a freeze was aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortReason {
    /// The deadline passed with participants unconfirmed.
    TimedOut,
    /// A thaw was asked for before the freeze completed.
    ThawRequested,
    /// The generation changed (a restore) before the freeze completed.
    Restored,
    /// The orchestrator that asked for it went away.
    RequesterGone,
}

/// Why the system thawed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThawReason {
    /// An orchestrator asked for it.
    Requested,
    /// Restored while frozen and every tracked watcher acknowledged.
    Restored,
    /// Frozen for [`Config::max_frozen_ms`].
    Bound,
}

/// What happened, for the frontend to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// `running` → `freezing`: tell every participant to quiesce.
    FreezeStarted {
        /// The new freeze.
        id: FreezeId,
    },
    /// `freezing` → `frozen`: the freeze request succeeds. When it happens
    /// inside [`Lifecycle::freeze`] (nobody to wait for), it follows
    /// `FreezeStarted`.
    Frozen {
        /// The freeze.
        id: FreezeId,
    },
    /// `freezing` → `running`: the freeze request fails; tell every
    /// participant to thaw.
    Aborted {
        /// The freeze.
        id: FreezeId,
        /// Tracked participants that had not confirmed.
        pending: u32,
        /// Why.
        reason: AbortReason,
    },
    /// `frozen` → `running`: tell every participant to thaw.
    Thawed {
        /// The freeze that ended.
        id: FreezeId,
        /// Why.
        reason: ThawReason,
    },
}

/// The answer to [`Lifecycle::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The new participant.
    pub id: ParticipantId,
    /// `Some` when a freeze is in force: tell the participant to quiesce
    /// right after it registers (while `frozen` it already counts as
    /// frozen; while `freezing` the freeze waits for it if tracked).
    pub freeze: Option<FreezeId>,
}

/// The lifecycle's numbers at one instant, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleCounts {
    /// The state.
    pub state: State,
    /// The latest freeze number (0: none yet).
    pub freeze: FreezeId,
    /// Registered participants.
    pub participants: u32,
    /// Of those, the tracked ones: a freeze waits for them.
    pub tracked_participants: u32,
    /// Tracked participants that have not confirmed the freeze in progress
    /// (0 unless `freezing`).
    pub pending: u32,
    /// How long the system has been frozen (`None` unless `frozen`).
    pub frozen_ms: Option<Millis>,
    /// Frozen, restored since, and waiting for watchers to acknowledge
    /// before thawing by itself.
    pub thaw_after_acks: bool,
}

#[derive(Debug, Clone, Copy)]
struct Participant {
    tracking: Tracking,
    /// Confirmed the freeze in progress (meaningful while `freezing`).
    confirmed: bool,
}

/// The lifecycle state machine. See the module docs for the rules.
#[derive(Debug)]
pub struct Lifecycle {
    config: Config,
    state: State,
    freeze: FreezeId,
    participants: Slab<Participant>,
    /// Tracked participants unconfirmed, while `freezing`.
    pending: u32,
    /// While `freezing`: when the freeze aborts.
    deadline: Millis,
    /// While `frozen`: since when.
    frozen_since: Millis,
    /// While `frozen`: a restore happened; thaw once watchers caught up.
    thaw_after_acks: bool,
}

impl Lifecycle {
    /// A running system with no participants.
    pub fn new(config: Config) -> Lifecycle {
        Lifecycle {
            config,
            state: State::Running,
            freeze: 0,
            participants: Slab::new(),
            pending: 0,
            deadline: 0,
            frozen_since: 0,
            thaw_after_acks: false,
        }
    }

    /// The settings.
    pub fn config(&self) -> Config {
        self.config
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Registers a participant. See [`Joined::freeze`] for what to tell it.
    pub fn join(&mut self, tracking: Tracking) -> Joined {
        let waited_for = self.state == State::Freezing && tracking == Tracking::Tracked;
        let id = ParticipantId(self.participants.insert(Participant {
            tracking,
            confirmed: !waited_for,
        }));
        if waited_for {
            self.pending += 1;
        }
        Joined {
            id,
            freeze: (self.state != State::Running).then_some(self.freeze),
        }
    }

    /// Removes a participant; if the freeze was waiting only for it, the
    /// system is now frozen.
    pub fn leave(
        &mut self,
        id: ParticipantId,
        now: Millis,
    ) -> Result<Option<Transition>, LifecycleError> {
        let p = self
            .participants
            .try_remove(id.0)
            .ok_or(LifecycleError::UnknownParticipant(id.0))?;
        if self.state == State::Freezing && p.tracking == Tracking::Tracked && !p.confirmed {
            self.pending -= 1;
            return Ok(self.complete_if_done(now));
        }
        Ok(None)
    }

    /// Asks for a freeze that must complete by `now + timeout_ms`. While
    /// `frozen` this succeeds at once with no transition (`Ok(vec![])`: the
    /// request is answered as frozen); while `freezing` it is refused.
    pub fn freeze(
        &mut self,
        now: Millis,
        timeout_ms: Millis,
    ) -> Result<Vec<Transition>, LifecycleError> {
        match self.state {
            State::Frozen => return Ok(Vec::new()),
            State::Freezing => {
                return Err(LifecycleError::Busy {
                    id: self.freeze,
                    pending: self.pending,
                })
            }
            State::Running => {}
        }
        let id = self
            .freeze
            .checked_add(1)
            .ok_or(LifecycleError::Exhausted)?;
        self.freeze = id;
        self.state = State::Freezing;
        self.deadline = now.saturating_add(timeout_ms);
        self.pending = 0;
        for (_, p) in self.participants.iter_mut() {
            p.confirmed = p.tracking == Tracking::Untracked;
            if !p.confirmed {
                self.pending += 1;
            }
        }
        let mut out = vec![Transition::FreezeStarted { id }];
        out.extend(self.complete_if_done(now));
        Ok(out)
    }

    /// A participant confirms freeze `id`. Confirming an earlier freeze, or
    /// again, or while not `freezing`, succeeds and changes nothing (its
    /// thaw is on its way); confirming a freeze never asked for is refused.
    pub fn confirm(
        &mut self,
        participant: ParticipantId,
        id: FreezeId,
        now: Millis,
    ) -> Result<Option<Transition>, LifecycleError> {
        if id > self.freeze {
            return Err(LifecycleError::WrongFreeze {
                confirmed: id,
                latest: self.freeze,
            });
        }
        let freezing = self.state == State::Freezing && id == self.freeze;
        let p = self
            .participants
            .get_mut(participant.0)
            .ok_or(LifecycleError::UnknownParticipant(participant.0))?;
        if !freezing || p.confirmed {
            return Ok(None);
        }
        p.confirmed = true;
        self.pending -= 1;
        Ok(self.complete_if_done(now))
    }

    /// Asks for a thaw: `frozen` → `running`, `freezing` → aborted,
    /// `running` → nothing (`None`).
    pub fn thaw(&mut self) -> Option<Transition> {
        match self.state {
            State::Running => None,
            State::Freezing => Some(self.abort(AbortReason::ThawRequested)),
            State::Frozen => Some(self.end(ThawReason::Requested)),
        }
    }

    /// The orchestrator that asked for the freeze in progress went away:
    /// abort it (only while `freezing`; a completed freeze stays until
    /// thawed or bounded).
    pub fn requester_gone(&mut self) -> Option<Transition> {
        (self.state == State::Freezing).then(|| self.abort(AbortReason::RequesterGone))
    }

    /// The generation changed, leaving `outdated_tracked` tracked watchers
    /// outdated. While `freezing` this aborts the freeze; while `frozen`
    /// (and [`Config::thaw_on_restore`]) it thaws once they have all
    /// acknowledged, which may be now.
    pub fn restored(&mut self, outdated_tracked: u32) -> Option<Transition> {
        match self.state {
            State::Running => None,
            State::Freezing => Some(self.abort(AbortReason::Restored)),
            State::Frozen if self.config.thaw_on_restore => {
                self.thaw_after_acks = true;
                self.watchers_outdated(outdated_tracked)
            }
            State::Frozen => None,
        }
    }

    /// The number of outdated tracked watchers changed (an ack, a close):
    /// after a restore while frozen, thaws when it reaches 0.
    pub fn watchers_outdated(&mut self, outdated_tracked: u32) -> Option<Transition> {
        (self.state == State::Frozen && self.thaw_after_acks && outdated_tracked == 0)
            .then(|| self.end(ThawReason::Restored))
    }

    /// Time passed: aborts a freeze past its deadline, thaws a freeze past
    /// the bound.
    pub fn tick(&mut self, now: Millis) -> Option<Transition> {
        match self.state {
            State::Freezing if now >= self.deadline => Some(self.abort(AbortReason::TimedOut)),
            State::Frozen
                if self
                    .config
                    .max_frozen_ms
                    .is_some_and(|bound| now >= self.frozen_since.saturating_add(bound)) =>
            {
                Some(self.end(ThawReason::Bound))
            }
            _ => None,
        }
    }

    /// When [`tick`](Self::tick) next has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        match self.state {
            State::Running => None,
            State::Freezing => Some(self.deadline),
            State::Frozen => self
                .config
                .max_frozen_ms
                .map(|bound| self.frozen_since.saturating_add(bound)),
        }
    }

    /// Whether `id` has confirmed the freeze in progress (`true` when none is).
    pub fn has_confirmed(&self, id: ParticipantId) -> Result<bool, LifecycleError> {
        let p = self
            .participants
            .get(id.0)
            .ok_or(LifecycleError::UnknownParticipant(id.0))?;
        Ok(self.state != State::Freezing || p.confirmed)
    }

    /// The numbers at `now`.
    pub fn counts(&self, now: Millis) -> LifecycleCounts {
        LifecycleCounts {
            state: self.state,
            freeze: self.freeze,
            participants: self.participants.len() as u32,
            tracked_participants: self
                .participants
                .iter()
                .filter(|(_, p)| p.tracking == Tracking::Tracked)
                .count() as u32,
            pending: if self.state == State::Freezing {
                self.pending
            } else {
                0
            },
            frozen_ms: (self.state == State::Frozen).then(|| now.saturating_sub(self.frozen_since)),
            thaw_after_acks: self.state == State::Frozen && self.thaw_after_acks,
        }
    }

    fn complete_if_done(&mut self, now: Millis) -> Option<Transition> {
        (self.state == State::Freezing && self.pending == 0).then(|| {
            self.state = State::Frozen;
            self.frozen_since = now;
            self.thaw_after_acks = false;
            Transition::Frozen { id: self.freeze }
        })
    }

    fn abort(&mut self, reason: AbortReason) -> Transition {
        let pending = self.pending;
        self.state = State::Running;
        self.pending = 0;
        Transition::Aborted {
            id: self.freeze,
            pending,
            reason,
        }
    }

    fn end(&mut self, reason: ThawReason) -> Transition {
        self.state = State::Running;
        self.thaw_after_acks = false;
        Transition::Thawed {
            id: self.freeze,
            reason,
        }
    }
}

#[cfg(test)]
mod tests;
