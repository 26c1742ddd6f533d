//! The decisions every request frontend shares: how a freeze starts, what
//! a thaw does, when a barrier wait is answered and with what, and the
//! replies to a bump and to a freeze's outcome. The socket and the host
//! channel are transports (framing, credentials, per-connection budgets):
//! each decodes a request, checks who sent it in its own way, calls one of
//! these, and delivers the [`Reply`] in its own encoding (the host channel
//! converts it to a JSON line). So a rule changes in one place for both,
//! and a new frontend needs no copy of it.
//!
//! The device is a transport too: it answers the kernel with errnos, so it
//! takes the same [`Reply`] (a barrier wait's, a forced update's) and
//! answers with [`errno`] of it. Privilege is judged in [`crate::peer`] for
//! all three (a socket frame's sender, a device caller, the host channel's
//! peer CID).
//!
//! Everything here goes through [`Watchers`] (which owns the service and
//! the lifecycle) and queues what follows on the [`WorkList`]; nothing
//! sends anything.

use std::time::{Duration, Instant};

use sysgenid_core::lifecycle::{AbortReason, FreezeId, LifecycleError, Transition};
use sysgenid_core::{Barrier, CoreError, Generation, WatcherId};
use sysgenid_proto::{ErrorCode, ErrorReply, Reply, StatusReport, DEFAULT_FREEZE_TIMEOUT_MS};

use crate::service::BumpError;
use crate::watchers::Watchers;
use crate::work::WorkList;

/// A refusal reply.
pub fn error(code: ErrorCode, value: u32, message: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply {
        code,
        value,
        message: message.into(),
    })
}

/// The errno a reply stands for, as the seed's device returns it: 0 for a
/// success, else the error code's errno (`EINTR`, `EOVERFLOW`, `EIO`...).
pub fn errno(reply: &Reply) -> i32 {
    match reply {
        Reply::Error(e) => e.code.errno(),
        _ => 0,
    }
}

/// The caller's own watcher is outdated (`EINTR`).
pub fn interrupted(generation: u32) -> Reply {
    error(
        ErrorCode::Interrupted,
        generation,
        format!("interrupted: this watcher is outdated; handle generation {generation}, acknowledge it and retry"),
    )
}

/// How a freeze request ended, for the frontend that asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeOutcome {
    /// Every tracked participant and the hooks confirmed.
    Frozen,
    /// Aborted; everyone was thawed.
    Aborted {
        /// Tracked participants (and hooks) that had not confirmed.
        pending: u32,
        /// Why.
        reason: AbortReason,
    },
}

/// What a request that may wait turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
// Built and consumed at once by the frontend (like `Reply` itself, whose
// status variant makes it large): boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Started {
    /// Answered at once.
    Answer(Reply),
    /// A barrier wait: answered by [`wait_answer`] once it is settled, or
    /// by [`wait_timed_out`] at the deadline.
    Waiting {
        /// `None`: no deadline.
        deadline: Option<Instant>,
    },
    /// A freeze in progress: answered by [`freeze_outcome_reply`] when the
    /// loop announces its outcome.
    Freezing(FreezeId),
}

/// A privileged freeze (the frontend checked the privilege): starts it,
/// queuing its transitions. `timeout_ms` 0 is the default.
pub fn freeze(watchers: &mut Watchers, work: &mut WorkList, timeout_ms: u32) -> Started {
    let timeout_ms = match timeout_ms {
        0 => DEFAULT_FREEZE_TIMEOUT_MS,
        ms => ms,
    };
    match watchers.freeze(Duration::from_millis(u64::from(timeout_ms))) {
        Ok(transitions) if transitions.is_empty() => Started::Answer(Reply::Done {
            generation: watchers.generation(),
        }),
        Ok(transitions) => {
            let id = transitions.iter().find_map(|t| match t {
                Transition::FreezeStarted { id } => Some(*id),
                _ => None,
            });
            work.transition(transitions);
            match id {
                Some(id) => Started::Freezing(id),
                // Frozen at once (nobody to wait for) is announced too.
                None => Started::Answer(Reply::Done {
                    generation: watchers.generation(),
                }),
            }
        }
        Err(LifecycleError::Busy { id, pending }) => Started::Answer(error(
            ErrorCode::Busy,
            pending,
            format!("freeze {id} is already in progress ({pending} participant(s) still to confirm); wait for it or thaw"),
        )),
        Err(e) => Started::Answer(error(ErrorCode::Internal, 0, e.to_string())),
    }
}

/// A privileged thaw: `Done` also when nothing was frozen.
pub fn thaw(watchers: &mut Watchers, work: &mut WorkList) -> Reply {
    work.transition(watchers.thaw());
    Reply::Done {
        generation: watchers.generation(),
    }
}

/// A barrier wait by `caller` (its own watcher, if it is one).
pub fn wait(watchers: &Watchers, caller: Option<WatcherId>, timeout_ms: u32) -> Started {
    match wait_answer(watchers, caller) {
        Some(reply) => Started::Answer(reply),
        None => Started::Waiting {
            deadline: (timeout_ms > 0)
                .then(|| Instant::now() + Duration::from_millis(u64::from(timeout_ms))),
        },
    }
}

/// The answer to a pending wait now, or `None` while it must go on.
pub fn wait_answer(watchers: &Watchers, caller: Option<WatcherId>) -> Option<Reply> {
    match watchers.barrier(caller) {
        Ok(Barrier::Pending { .. }) => None,
        Ok(Barrier::Satisfied) => Some(Reply::Done {
            generation: watchers.generation(),
        }),
        Ok(Barrier::Interrupted { generation }) => Some(interrupted(generation)),
        Err(e) => Some(error(ErrorCode::Internal, 0, e.to_string())),
    }
}

/// The answer to a wait whose deadline passed; `status` builds the status
/// report, whose hooks section names the hooks holding the change.
pub fn wait_timed_out(watchers: &Watchers, status: &dyn Fn(&Watchers) -> StatusReport) -> Reply {
    let outdated = watchers.counts().outdated;
    let mut message = format!("timed out with {outdated} tracked watcher(s) still outdated");
    // Name the hooks holding the change: the orchestrator's one clue to
    // what did not renew.
    let holding = status(watchers)
        .hooks
        .map(|h| h.holding)
        .unwrap_or_default();
    if !holding.is_empty() {
        message.push_str(&format!(
            ", among them the hooks whose change run failed: {}",
            holding.join(", ")
        ));
    }
    error(ErrorCode::TimedOut, outdated, message)
}

/// The reply to a privileged bump.
pub fn bump_reply(result: &Result<Generation, BumpError>) -> Reply {
    match result {
        Ok(generation) => Reply::Done {
            generation: *generation,
        },
        Err(BumpError::Core(CoreError::Overflow { current })) => error(
            ErrorCode::Overflow,
            *current,
            format!(
                "generation {current} cannot be bumped: the next value would pass {}",
                u32::MAX
            ),
        ),
        Err(BumpError::Core(e @ CoreError::WouldExhaust { current, .. })) => error(
            ErrorCode::Overflow,
            *current,
            format!("refused: {e} (sysgenidctl bump --allow-exhaustion; the generation stays {current})"),
        ),
        Err(e) => error(ErrorCode::Internal, 0, e.to_string()),
    }
}

/// The reply to a freeze request once its outcome is known.
pub fn freeze_outcome_reply(outcome: FreezeOutcome, generation: Generation) -> Reply {
    match outcome {
        FreezeOutcome::Frozen => Reply::Done { generation },
        FreezeOutcome::Aborted { pending, reason } => error(
            ErrorCode::FreezeAborted,
            pending,
            match reason {
                AbortReason::TimedOut => format!(
                    "the freeze timed out with {pending} participant(s) or hooks not confirmed; it was aborted and everything thawed"
                ),
                AbortReason::ThawRequested => {
                    "the freeze was aborted by a thaw request; everything thawed".to_string()
                }
                AbortReason::Restored => {
                    "the freeze was aborted: the generation changed (a restore); everything thawed"
                        .to_string()
                }
                AbortReason::RequesterGone => "the freeze was aborted".to_string(),
            },
        ),
    }
}
