//! The one owner of the watchers: the [`Service`] (core, saved state,
//! page), the admission limits, the per-uid accounting and the statistics
//! of the `manual` source.
//!
//! Both frontends (the socket and `/dev/sysgenid`) register, release and
//! acknowledge watchers only through [`Watchers`], so the limits are
//! checked in one place and the per-uid counts cannot drift. A bump goes
//! through `Watchers::bump`, which makes it durable (the service's
//! save → publish → commit order) and returns a [`Bumped`] that only the
//! event loop's fan-out consumes: no frontend can change the generation
//! without every watcher being told.
//!
//! It also owns the snapshot lifecycle (`sysgenid_core::lifecycle`): its
//! participants are watchers, a restore is a bump and the thaw after a
//! restore waits for the watchers' acknowledgements, so the two state
//! machines live side by side here. Its methods return the
//! [`Transition`]s that follow; the caller queues them on the work list
//! and the event loop tells everyone. Time enters as [`Instant`]s and is
//! handed to the pure core as milliseconds since this owner was made.
//!
//! Trust is decided here, by the frontends' callers ([`crate::trust`]): a
//! tracked watcher or participant that is not trusted is registered as
//! not counting for the lifecycle, so the core's freeze never waits for it
//! and the thaw after a restore never waits for its acknowledgement. The
//! barrier counts it as before.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sysgenid_core::lifecycle::{
    self, FreezeId, Joined, Lifecycle, LifecycleCounts, LifecycleError, ParticipantId, Transition,
};
use sysgenid_core::{Barrier, CoreError, Counts, Generation, Tracking, WatcherId};
use sysgenid_page::PageRecord;
use sysgenid_proto::SourceStatus;

use crate::service::{BumpError, Service};
use crate::trust::TrustRule;
use crate::work::BumpRequest;

/// Limits on watchers and connections, to keep one user from exhausting
/// the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Watchers in total.
    pub max_watchers: u32,
    /// Watchers per uid.
    pub max_watchers_per_uid: u32,
    /// Socket connections (watchers or not) per non-root uid, so that one
    /// user cannot take every descriptor the daemon has.
    pub max_connections_per_uid: u32,
    /// How long a new connection may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// Bytes of replies waiting in the outboxes of all socket connections
    /// together (each frame counted as its length plus
    /// [`crate::socket::FRAME_OVERHEAD`]).
    pub max_queued_bytes: usize,
    /// Bytes of replies waiting in the outboxes of one non-root uid's
    /// connections.
    pub max_queued_bytes_per_uid: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_watchers: 200_000,
            max_watchers_per_uid: 50_000,
            max_connections_per_uid: 4_096,
            hello_timeout: Duration::from_secs(10),
            max_queued_bytes: 64 << 20,
            max_queued_bytes_per_uid: 8 << 20,
        }
    }
}

/// Why a new watcher was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The daemon-wide limit.
    #[error("sysgenidd already has {max} watchers, its limit (--max-watchers)")]
    Total {
        /// `--max-watchers`.
        max: u32,
    },
    /// The per-uid limit.
    #[error("uid {uid} already has {count} watchers, the per-user limit (--max-watchers-per-uid)")]
    PerUid {
        /// Whose.
        uid: u32,
        /// How many it has.
        count: u32,
    },
}

/// Why a generation changed: for status and the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BumpCause {
    /// A privileged request (socket `Bump` or the device's forced update).
    /// Counted in the `manual` source's statistics; never coalesced.
    Manual,
    /// A restore-signal source, by name.
    Source(&'static str),
}

impl BumpCause {
    /// The source name shown in status.
    pub fn name(self) -> &'static str {
        match self {
            BumpCause::Manual => "manual",
            BumpCause::Source(name) => name,
        }
    }

    /// Whether the kernel reseeded its CRNG itself before this signal:
    /// the `vmfork` record is the kernel's report of exactly that
    /// (`random: crng reseeded due to virtual machine fork`). No other
    /// source is known to (`vmclock`'s driver does not reseed).
    pub fn kernel_reseeded(self) -> bool {
        self == BumpCause::Source("vmfork")
    }
}

/// A committed, published generation change that watchers have not been
/// told about yet. The event loop's fan-out consumes it.
#[derive(Debug)]
#[must_use = "a bump must be announced to every frontend (the event loop's fan-out)"]
pub struct Bumped {
    /// The new generation.
    pub generation: Generation,
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The watchers of both frontends, their limits and their generation.
pub struct Watchers {
    service: Service,
    limits: Limits,
    /// Watchers per uid (socket and device alike).
    per_uid: HashMap<u32, u32>,
    /// The `manual` source's line in status.
    manual: SourceStatus,
    /// The snapshot lifecycle.
    lifecycle: Lifecycle,
    /// Time zero of the lifecycle's clock.
    clock: Instant,
    /// Tracked participants that are not trusted (joined the lifecycle as
    /// untracked), for status.
    untrusted_participants: HashSet<ParticipantId>,
    /// Who is trusted with the lifecycle (`--lifecycle-group`).
    trust: TrustRule,
}

/// Trusted and untrusted registrations, for status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustCounts {
    /// Tracked participants a freeze waits for (the hooks count as one).
    pub participants_trusted: u32,
    /// Tracked participants a freeze does not wait for: not trusted.
    pub participants_untrusted: u32,
    /// Tracked watchers the thaw after a restore waits for.
    pub tracked_trusted: u32,
    /// Tracked watchers it does not wait for (the barrier still does).
    pub tracked_untrusted: u32,
}

impl Watchers {
    /// Takes ownership of a started service.
    pub fn new(service: Service, limits: Limits) -> Watchers {
        Watchers {
            service,
            limits,
            per_uid: HashMap::new(),
            manual: SourceStatus {
                name: "manual".into(),
                active: true,
                detail: "privileged bump requests on the socket".into(),
                ..SourceStatus::default()
            },
            lifecycle: Lifecycle::new(lifecycle::Config::default()),
            clock: Instant::now(),
            untrusted_participants: HashSet::new(),
            trust: TrustRule::owner_only(),
        }
    }

    /// Sets the lifecycle's settings (at start-up, before any participant).
    pub fn configure_lifecycle(&mut self, config: lifecycle::Config) {
        self.lifecycle = Lifecycle::new(config);
    }

    /// Sets who is trusted with the lifecycle (at start-up).
    pub fn configure_trust(&mut self, rule: TrustRule) {
        self.trust = rule;
    }

    /// Who is trusted with the lifecycle.
    pub fn trust(&self) -> &TrustRule {
        &self.trust
    }

    fn millis(&self, at: Instant) -> lifecycle::Millis {
        at.saturating_duration_since(self.clock).as_millis() as u64
    }

    /// Registers a lifecycle participant (its watcher is admitted
    /// separately); [`Joined::freeze`] says whether to tell it to freeze.
    /// One that is tracked but not `trusted` is told everything and never
    /// waited for.
    pub fn join(&mut self, tracking: Tracking, trusted: bool) -> Joined {
        let counts = tracking == Tracking::Tracked && trusted;
        let joined = self.lifecycle.join(if counts {
            Tracking::Tracked
        } else {
            Tracking::Untracked
        });
        if tracking == Tracking::Tracked && !trusted {
            self.untrusted_participants.insert(joined.id);
        }
        joined
    }

    /// Removes a participant (closed or gone).
    pub fn leave(&mut self, id: ParticipantId) -> Option<Transition> {
        self.untrusted_participants.remove(&id);
        let now = self.millis(Instant::now());
        self.lifecycle.leave(id, now).ok().flatten()
    }

    /// Asks for a freeze that must complete within `timeout`. `Ok` with no
    /// transitions: frozen already.
    pub fn freeze(&mut self, timeout: Duration) -> Result<Vec<Transition>, LifecycleError> {
        let now = self.millis(Instant::now());
        self.lifecycle.freeze(now, timeout.as_millis() as u64)
    }

    /// A participant confirms freeze `freeze`.
    pub fn confirm(
        &mut self,
        id: ParticipantId,
        freeze: FreezeId,
    ) -> Result<Option<Transition>, LifecycleError> {
        let now = self.millis(Instant::now());
        self.lifecycle.confirm(id, freeze, now)
    }

    /// Asks for a thaw (nothing when running).
    pub fn thaw(&mut self) -> Option<Transition> {
        self.lifecycle.thaw()
    }

    /// The orchestrator of the freeze in progress went away.
    pub fn freeze_requester_gone(&mut self) -> Option<Transition> {
        self.lifecycle.requester_gone()
    }

    /// The generation changed: a restore, for the lifecycle (called by the
    /// loop's fan-out once every watcher that counts is registered).
    pub(crate) fn restored(&mut self) -> Option<Transition> {
        let outdated = self.service.counts().outdated_lifecycle;
        self.lifecycle.restored(outdated)
    }

    /// Acknowledgements or closes may have left no tracked watcher
    /// outdated: after a restore while frozen, that thaws.
    pub fn caught_up(&mut self) -> Option<Transition> {
        let outdated = self.service.counts().outdated_lifecycle;
        self.lifecycle.watchers_outdated(outdated)
    }

    /// Aborts a freeze past its deadline, thaws one past the bound.
    pub fn lifecycle_tick(&mut self, now: Instant) -> Option<Transition> {
        let now = self.millis(now);
        self.lifecycle.tick(now)
    }

    /// When [`lifecycle_tick`](Self::lifecycle_tick) next has work.
    pub fn lifecycle_deadline(&self) -> Option<Instant> {
        self.lifecycle
            .next_deadline()
            .map(|ms| self.clock + Duration::from_millis(ms))
    }

    /// The lifecycle's numbers now.
    pub fn lifecycle_counts(&self) -> LifecycleCounts {
        self.lifecycle.counts(self.millis(Instant::now()))
    }

    /// Trusted and untrusted registrations now.
    pub fn trust_counts(&self) -> TrustCounts {
        let counts = self.service.counts();
        let lifecycle = self.lifecycle_counts();
        TrustCounts {
            participants_trusted: lifecycle.tracked_participants,
            participants_untrusted: self.untrusted_participants.len() as u32,
            tracked_trusted: counts.tracked_lifecycle,
            tracked_untrusted: counts.tracked - counts.tracked_lifecycle,
        }
    }

    /// The service, read-only (generation, record, directory, uptime).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The `manual` source's status line.
    pub fn manual_status(&self) -> &SourceStatus {
        &self.manual
    }

    /// Whether a new watcher for `uid` would be admitted now.
    pub fn check_admission(&self, uid: u32) -> Result<(), Refused> {
        if self.service.counts().watchers >= self.limits.max_watchers {
            return Err(Refused::Total {
                max: self.limits.max_watchers,
            });
        }
        let count = self.per_uid.get(&uid).copied().unwrap_or(0);
        if count >= self.limits.max_watchers_per_uid {
            return Err(Refused::PerUid { uid, count });
        }
        Ok(())
    }

    /// Registers a watcher for `uid` if the limits allow it. A tracked
    /// watcher that is not `trusted` holds the barrier but never the thaw
    /// after a restore.
    pub fn admit(
        &mut self,
        uid: u32,
        tracking: Tracking,
        acked: Option<Generation>,
        trusted: bool,
    ) -> Result<WatcherId, Refused> {
        self.check_admission(uid)?;
        let id = self.service.register(tracking, acked, trusted);
        *self.per_uid.entry(uid).or_insert(0) += 1;
        Ok(id)
    }

    /// Removes a watcher admitted for `uid`. True when the barrier may have
    /// moved (the caller queues a settle).
    pub fn release(&mut self, id: WatcherId, uid: u32) -> bool {
        let released = self.service.unregister(id).is_ok();
        if released {
            if let Some(n) = self.per_uid.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    self.per_uid.remove(&uid);
                }
            }
        }
        released
    }

    /// Acknowledges `generation`; `Ok(true)` when the barrier may have moved.
    pub fn ack(&mut self, id: WatcherId, generation: Generation) -> Result<bool, CoreError> {
        self.service.ack(id, generation)
    }

    /// The generation a watcher must handle, if it is outdated.
    pub fn poll_read(&self, id: WatcherId) -> Result<Option<Generation>, CoreError> {
        self.service.poll_read(id)
    }

    /// Whether a watcher is outdated.
    pub fn is_outdated(&self, id: WatcherId) -> Result<bool, CoreError> {
        self.service.is_outdated(id)
    }

    /// What the barrier would answer now for `caller`.
    pub fn barrier(&self, caller: Option<WatcherId>) -> Result<Barrier, CoreError> {
        self.service.barrier(caller)
    }

    /// Counts at this instant.
    pub fn counts(&self) -> Counts {
        self.service.counts()
    }

    /// The current generation.
    pub fn generation(&self) -> Generation {
        self.service.generation()
    }

    /// The published record.
    pub fn record(&self) -> &PageRecord {
        self.service.record()
    }

    /// Whether a forced minimum may be used ([`sysgenid_core::Core::check_minimum`]).
    pub fn check_minimum(&self, min: Generation, allow_exhaustion: bool) -> Result<(), CoreError> {
        self.service.check_minimum(min, allow_exhaustion)
    }

    /// Makes a bump durable and visible on the page (see [`Service::bump`]).
    /// Watchers are told by the event loop, which is the only caller.
    pub(crate) fn bump(
        &mut self,
        request: &BumpRequest,
        cause: BumpCause,
    ) -> Result<Bumped, BumpError> {
        if cause == BumpCause::Manual {
            self.manual.events += 1;
            self.manual.last_event_unix_ms = Some(unix_ms_now());
        }
        let generation = self
            .service
            .bump(request, cause.name(), cause.kernel_reseeded())?;
        Ok(Bumped { generation })
    }

    /// A coalesced signal's details for the change just made (see
    /// [`Service::refine_last_change`]).
    pub(crate) fn refine_last_change(&mut self, request: &BumpRequest) -> bool {
        self.service.refine_last_change(request)
    }

    /// Clean exit: tells barrier waiters on the page (see
    /// [`Service::stopping`]).
    pub(crate) fn stopping(&mut self) {
        self.service.stopping();
    }

    /// Records that another source reported the change just made.
    pub(crate) fn note_agreeing_source(&mut self, source: &str) {
        self.service.note_agreeing_source(source);
    }
}
