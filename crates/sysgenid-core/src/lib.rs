//! The system generation state machine: a counter, the watchers, and the
//! barrier question "is everyone caught up?". Nothing else.
//!
//! This crate is the seed driver's ~300 lines of state (`sysgenid.c`) turned
//! into a pure value: no I/O, no clocks, no threads, no `unsafe`. Every
//! frontend of the daemon (the socket, the `/dev/sysgenid` device) owns no
//! generation logic of its own; it translates requests into calls on
//! [`Core`] and turns the answers into replies and wake-ups. That is what
//! makes the semantics testable exhaustively (see the property test at the
//! bottom of this file) and identical on every interface.
//!
//! # The rules, as in the seed
//! * The generation is a `u32`. It only ever increases.
//! * A watcher is *outdated* while the generation it acknowledged differs
//!   from the current one (the seed's `!equals_gen_counter(acked)`).
//! * A bump moves to `max(min_generation, current + 1)`; every watcher
//!   registered at that moment becomes outdated. A bump past `u32::MAX` is
//!   refused and changes nothing.
//! * An ack must name the current generation, else it is refused and changes
//!   nothing.
//! * The barrier is satisfied when no *tracked* watcher is outdated; it is
//!   interrupted when the caller's own watcher is outdated.
//! * A reconnecting watcher that claims to have acknowledged a generation
//!   above the current one (which no honest client can have seen) starts
//!   outdated, so its client renews, but it counts as untracked until it
//!   acknowledges the current generation: a false claim cannot hold the
//!   barrier up without a restore.
//! * A watcher may be registered as not counting for the snapshot
//!   lifecycle ([`Core::register_for`]: the daemon decides who is trusted
//!   to hold it). It counts for the barrier exactly as before; it is only
//!   left out of [`Counts::outdated_lifecycle`], the number the automatic
//!   thaw after a restore waits on.
//! * A forced update whose minimum jumps into the counter's last
//!   [`EXHAUSTION_RESERVE`] values is refused unless explicitly allowed
//!   ([`Core::check_minimum`]): it would leave no generation for later
//!   restores. Bumps by one are never refused for this.
//!
//! The snapshot lifecycle (freeze before a snapshot, thaw after) is its own
//! state machine in [`lifecycle`], next to this one and as pure.
//!
//! Bumps are two-phase ([`Core::next_generation`], then
//! [`Core::commit_generation`]) so the daemon can make the new value durable
//! between the two steps: a generation is never shown to anyone before it
//! would survive a crash.

#![forbid(unsafe_code)]

use slab::Slab;

pub mod lifecycle;

/// The system generation counter, `u32` on every interface.
pub type Generation = u32;

/// How many of the counter's last values a forced minimum may not jump
/// into without being explicitly allowed (2^20: at one restore a second,
/// twelve days of restores). A minimum above `u32::MAX - EXHAUSTION_RESERVE`
/// (4 293 918 719) that is more than `current + 1` is refused by
/// [`Core::check_minimum`].
pub const EXHAUSTION_RESERVE: Generation = 1 << 20;

/// Names one registered watcher. Valid until [`Core::unregister`]; the
/// number may be reused afterwards, like a file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatcherId(usize);

impl WatcherId {
    /// The raw index, for logs and for frontends that key tables by it.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Whether a watcher counts for the barrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// Counted by [`Core::barrier`] (the seed's only kind, and the default).
    Tracked,
    /// Never holds a barrier up: for lazy adjusters that check the
    /// generation when they next need it.
    Untracked,
}

/// Why a request was refused. Refusals never change the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// The acknowledged value is not the current generation (seed: `EINVAL`).
    #[error("generation {acked} is not the current generation {current}")]
    WrongGeneration {
        /// The value the watcher tried to acknowledge.
        acked: Generation,
        /// The generation it should have acknowledged.
        current: Generation,
    },
    /// The bump would pass `u32::MAX` (`EOVERFLOW`).
    #[error("generation {current} cannot be bumped: it would pass u32::MAX")]
    Overflow {
        /// The generation that stays in force.
        current: Generation,
    },
    /// A forced minimum in the counter's last [`EXHAUSTION_RESERVE`] values,
    /// not explicitly allowed (`EOVERFLOW` on every interface).
    #[error("a minimum of {min} would exhaust the counter (generation {current}; values above {} are reserved): allow it explicitly if you mean it", u32::MAX - EXHAUSTION_RESERVE)]
    WouldExhaust {
        /// The minimum asked for.
        min: Generation,
        /// The generation that stays in force.
        current: Generation,
    },
    /// A commit that does not move the generation forward.
    #[error("generation {proposed} is not greater than the current generation {current}")]
    NotIncreasing {
        /// The value proposed.
        proposed: Generation,
        /// The generation that stays in force.
        current: Generation,
    },
    /// The watcher id is not registered (a frontend bug, never a user error).
    #[error("unknown watcher {0}")]
    UnknownWatcher(usize),
}

/// What the barrier (the seed's `SYSGENID_WAIT_WATCHERS`) would answer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// No tracked watcher is outdated: return success.
    Satisfied,
    /// The caller's own watcher is outdated: it must handle the new
    /// generation and retry (seed: `EINTR`).
    Interrupted {
        /// The generation the caller has to handle.
        generation: Generation,
    },
    /// Still waiting on this many tracked outdated watchers.
    Pending {
        /// Tracked watchers that have not acknowledged the current generation.
        outdated: u32,
    },
}

/// Counts at one instant. Advisory: stale as soon as it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// The current generation.
    pub generation: Generation,
    /// All registered watchers.
    pub watchers: u32,
    /// Watchers that count for the barrier.
    pub tracked: u32,
    /// Tracked watchers that have not acknowledged the current generation.
    pub outdated: u32,
    /// Untracked watchers that have not acknowledged the current generation.
    pub outdated_untracked: u32,
    /// Of `tracked`, those that count for the lifecycle.
    pub tracked_lifecycle: u32,
    /// Of `outdated`, those that count for the lifecycle (the automatic
    /// thaw after a restore waits for these).
    pub outdated_lifecycle: u32,
}

#[derive(Debug, Clone, Copy)]
struct Watcher {
    /// The generation acknowledged; `None` for a reconnecting client that
    /// claimed one from the future (outdated until it acknowledges).
    acked: Option<Generation>,
    tracking: Tracking,
    /// Counts for the lifecycle when it counts as tracked.
    lifecycle: bool,
}

impl Watcher {
    fn outdated(&self, current: Generation) -> bool {
        self.acked != Some(current)
    }

    /// How the watcher counts: as asked, except that a claim from the
    /// future counts as untracked until the watcher acknowledges.
    fn counts_as(&self) -> Tracking {
        match self.acked {
            None => Tracking::Untracked,
            Some(_) => self.tracking,
        }
    }

    /// Whether it counts for the lifecycle now.
    fn counts_for_lifecycle(&self) -> bool {
        self.lifecycle && self.counts_as() == Tracking::Tracked
    }
}

/// The generation counter and its watchers. See the crate docs for the rules.
#[derive(Debug, Default)]
pub struct Core {
    generation: Generation,
    watchers: Slab<Watcher>,
    tracked: u32,
    outdated_tracked: u32,
    outdated_untracked: u32,
    tracked_lifecycle: u32,
    outdated_lifecycle: u32,
}

impl Core {
    /// A core at `generation` (0 on a fresh system, the saved value after a
    /// restart) with no watchers.
    pub fn new(generation: Generation) -> Core {
        Core {
            generation,
            ..Core::default()
        }
    }

    /// The current generation.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Registers a watcher. It is up to date with the current generation,
    /// unless `acked` names the generation it acknowledged before (a client
    /// reconnecting after a daemon restart): if that differs from the
    /// current one, the watcher starts outdated, so a change it missed while
    /// away is still delivered.
    /// A claim above the current generation (impossible unless the client
    /// lies) makes the watcher outdated until it acknowledges, and until
    /// then it counts as untracked (it never holds the barrier up).
    pub fn register(&mut self, tracking: Tracking, acked: Option<Generation>) -> WatcherId {
        self.register_for(tracking, acked, true)
    }

    /// [`register`](Self::register), saying whether the watcher counts for
    /// the lifecycle (when tracked): `false` leaves it out of
    /// [`Counts::tracked_lifecycle`] and [`Counts::outdated_lifecycle`],
    /// and nothing else.
    pub fn register_for(
        &mut self,
        tracking: Tracking,
        acked: Option<Generation>,
        lifecycle: bool,
    ) -> WatcherId {
        let acked = match acked {
            None => Some(self.generation),
            Some(a) if a <= self.generation => Some(a),
            Some(_) => None,
        };
        let watcher = Watcher {
            acked,
            tracking,
            lifecycle,
        };
        self.count(&watcher, 1);
        WatcherId(self.watchers.insert(watcher))
    }

    /// Adds (`1`) or removes (`-1`) a watcher's share of the counters.
    fn count(&mut self, watcher: &Watcher, sign: i32) {
        let add = |n: &mut u32| *n = n.wrapping_add_signed(sign);
        if watcher.counts_as() == Tracking::Tracked {
            add(&mut self.tracked);
        }
        if watcher.counts_for_lifecycle() {
            add(&mut self.tracked_lifecycle);
        }
        if watcher.outdated(self.generation) {
            add(self.outdated_counter(watcher.counts_as()));
            if watcher.counts_for_lifecycle() {
                add(&mut self.outdated_lifecycle);
            }
        }
    }

    /// Removes a watcher. If it was outdated it no longer counts, which may
    /// satisfy the barrier. Returns the tracking it had.
    pub fn unregister(&mut self, id: WatcherId) -> Result<Tracking, CoreError> {
        let watcher = self
            .watchers
            .try_remove(id.0)
            .ok_or(CoreError::UnknownWatcher(id.0))?;
        self.count(&watcher, -1);
        Ok(watcher.tracking)
    }

    /// The seed's `read()` test: `Some(current)` while the watcher has not
    /// acknowledged the current generation (and on every call until it
    /// does), `None` when there is nothing new (block, or `EAGAIN`).
    pub fn poll_read(&self, id: WatcherId) -> Result<Option<Generation>, CoreError> {
        let watcher = self.watcher(id)?;
        Ok(watcher.outdated(self.generation).then_some(self.generation))
    }

    /// Whether the watcher is outdated (its descriptor should be readable).
    pub fn is_outdated(&self, id: WatcherId) -> Result<bool, CoreError> {
        Ok(self.poll_read(id)?.is_some())
    }

    /// The seed's `write()`: acknowledges `generation`, which must be the
    /// current one. Acknowledging again when already up to date succeeds and
    /// changes nothing. Returns whether the watcher went from outdated to up
    /// to date (the barrier may now be satisfied).
    pub fn ack(&mut self, id: WatcherId, generation: Generation) -> Result<bool, CoreError> {
        let current = self.generation;
        let watcher = self
            .watchers
            .get_mut(id.0)
            .ok_or(CoreError::UnknownWatcher(id.0))?;
        if generation != current {
            return Err(CoreError::WrongGeneration {
                acked: generation,
                current,
            });
        }
        if !watcher.outdated(current) {
            return Ok(false);
        }
        // A claim from the future ends here: from now on the watcher
        // counts as it asked.
        let before = *watcher;
        watcher.acked = Some(current);
        let after = *watcher;
        self.count(&before, -1);
        self.count(&after, 1);
        Ok(true)
    }

    /// First half of a bump: the generation a bump with `min_generation`
    /// would move to, `max(min_generation, current + 1)`, or
    /// [`CoreError::Overflow`]. Changes nothing.
    pub fn next_generation(&self, min_generation: Generation) -> Result<Generation, CoreError> {
        let next = self.generation.checked_add(1).ok_or(CoreError::Overflow {
            current: self.generation,
        })?;
        Ok(next.max(min_generation))
    }

    /// The exhaustion rule for a forced update: a `min_generation` above
    /// `u32::MAX - EXHAUSTION_RESERVE` that jumps past `current + 1` is
    /// refused with [`CoreError::WouldExhaust`] unless `allow_exhaustion`.
    /// Changes nothing; frontends call it before bumping on request.
    pub fn check_minimum(
        &self,
        min_generation: Generation,
        allow_exhaustion: bool,
    ) -> Result<(), CoreError> {
        let jumps = u64::from(min_generation) > u64::from(self.generation) + 1;
        if jumps && min_generation > u32::MAX - EXHAUSTION_RESERVE && !allow_exhaustion {
            return Err(CoreError::WouldExhaust {
                min: min_generation,
                current: self.generation,
            });
        }
        Ok(())
    }

    /// Second half of a bump: moves to `generation` (which must be greater
    /// than the current one) and marks every registered watcher outdated.
    pub fn commit_generation(&mut self, generation: Generation) -> Result<(), CoreError> {
        if generation <= self.generation {
            return Err(CoreError::NotIncreasing {
                proposed: generation,
                current: self.generation,
            });
        }
        self.generation = generation;
        // A watcher can never have acknowledged a generation that did not
        // exist yet (claims from the future are stored as `None`), so after
        // moving forward every watcher is outdated.
        self.recount();
        Ok(())
    }

    /// Bumps in one step (tests and callers that need no durability step).
    pub fn bump(&mut self, min_generation: Generation) -> Result<Generation, CoreError> {
        let next = self.next_generation(min_generation)?;
        self.commit_generation(next)?;
        Ok(next)
    }

    /// The barrier, for a caller with (`Some`) or without its own watcher:
    /// interrupted if the caller is outdated, satisfied if no tracked
    /// watcher is outdated, pending otherwise. Waiting frontends ask again
    /// after every ack, unregister and bump.
    pub fn barrier(&self, caller: Option<WatcherId>) -> Result<Barrier, CoreError> {
        if let Some(id) = caller {
            if self.is_outdated(id)? {
                return Ok(Barrier::Interrupted {
                    generation: self.generation,
                });
            }
        }
        Ok(match self.outdated_tracked {
            0 => Barrier::Satisfied,
            outdated => Barrier::Pending { outdated },
        })
    }

    /// The counts at this instant.
    pub fn counts(&self) -> Counts {
        Counts {
            generation: self.generation,
            watchers: self.watchers.len() as u32,
            tracked: self.tracked,
            outdated: self.outdated_tracked,
            outdated_untracked: self.outdated_untracked,
            tracked_lifecycle: self.tracked_lifecycle,
            outdated_lifecycle: self.outdated_lifecycle,
        }
    }

    /// The tracking a registered watcher asked for (a claim from the future
    /// counts as untracked until it acknowledges, whatever it asked).
    pub fn tracking(&self, id: WatcherId) -> Result<Tracking, CoreError> {
        Ok(self.watcher(id)?.tracking)
    }

    fn watcher(&self, id: WatcherId) -> Result<&Watcher, CoreError> {
        self.watchers
            .get(id.0)
            .ok_or(CoreError::UnknownWatcher(id.0))
    }

    fn outdated_counter(&mut self, tracking: Tracking) -> &mut u32 {
        match tracking {
            Tracking::Tracked => &mut self.outdated_tracked,
            Tracking::Untracked => &mut self.outdated_untracked,
        }
    }

    fn recount(&mut self) {
        let (tracked, untracked, lifecycle) = self
            .watchers
            .iter()
            .filter(|(_, w)| w.outdated(self.generation))
            .fold((0, 0, 0), |(t, u, l), (_, w)| {
                let l = l + u32::from(w.counts_for_lifecycle());
                match w.counts_as() {
                    Tracking::Tracked => (t + 1, u, l),
                    Tracking::Untracked => (t, u + 1, l),
                }
            });
        self.outdated_tracked = tracked;
        self.outdated_untracked = untracked;
        self.outdated_lifecycle = lifecycle;
    }
}

#[cfg(test)]
mod tests;
