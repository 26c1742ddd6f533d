//! The generation service: the pure [`Core`] plus the two things that make a
//! generation real, the saved state and the published page, kept in the one
//! order that makes crashes harmless.
//!
//! A bump is: compute the next generation (nothing changes if it would
//! overflow) → renew the kernel RNG (mix in the request's entropy, force a
//! reseed: [`crate::reseed`]) → draw a fresh epoch id from it → save the state
//! durably (if that fails, nothing changes) → publish the page → commit to
//! the core. Only then does the server notify watchers. So a value is never
//! visible (page, socket, device) before it would survive `kill -9`, and the
//! page is always current before any watcher wakes up.
//!
//! The core is private: the only way to change the generation is
//! `Service::bump`, and only [`crate::watchers::Watchers`] (which owns
//! the service and the admission limits) registers, releases and
//! acknowledges watchers.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use rustix::fs::AtFlags;

use sysgenid_core::{Core, CoreError, Generation};
use sysgenid_page::{PageRecord, PageWriter};

use sysgenid_core::{Barrier, Counts, Tracking, WatcherId};
use sysgenid_page::PageError;

use crate::reseed::{KernelRng, Policy};
use crate::runtime_dir::{RuntimeDir, RuntimeDirError};
use crate::state::{SavedState, StateError, StateFile};
use crate::work::BumpRequest;
use sysgenid_proto::{ChangeKind, Hostname, RngStatus};

/// Why the daemon cannot start from what is on disk. Each message says what
/// to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state file could not be read or is corrupt.
    #[error("{source}. The generation must never go backwards, so sysgenidd will not start from 0. If the page {page} is intact, run `sysgenidd --recover` to continue from the generation it shows; otherwise restore the state file from a backup")]
    State {
        /// What is wrong.
        source: StateError,
        /// The page path.
        page: String,
    },
    /// No state file, but the page shows a generation above 0.
    #[error("the state file {state} is missing but the page {page} shows generation {generation}. Run `sysgenidd --recover` to continue from {generation}, or remove the page to start again from 0 (clients will see the generation go backwards)")]
    MissingState {
        /// The state path.
        state: String,
        /// The page path.
        page: String,
        /// What the page shows.
        generation: u32,
    },
    /// The page is ahead of the state, which the write order never produces.
    #[error("the page {page} shows generation {page_generation}, ahead of the saved generation {saved}: the files were edited or mixed up. Run `sysgenidd --recover` to continue from the page's generation")]
    PageAhead {
        /// The page path.
        page: String,
        /// What the page shows.
        page_generation: u32,
        /// What the state holds.
        saved: u32,
    },
    /// `--recover` was given but the page has no valid record.
    #[error("--recover needs a valid page at {0}, and there is none")]
    NothingToRecover(String),
    /// The page file could not be opened in the runtime directory.
    #[error(transparent)]
    Dir(#[from] RuntimeDirError),
    /// The page file could not be sized or mapped.
    #[error(transparent)]
    Page(#[from] PageError),
    /// The state file could not be opened again or saved.
    #[error(transparent)]
    Save(StateError),
    /// `--recover` could not remove the corrupt state file.
    #[error("removing the corrupt state file {path}: {source}")]
    RemoveCorrupt {
        /// The state path.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The kernel RNG failed while drawing the first epoch id.
    #[error("could not draw an epoch id: {0}")]
    Random(getrandom::Error),
}

/// Why a bump was refused. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum BumpError {
    /// Refused by the core (overflow).
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The new state could not be saved.
    #[error("could not save the new generation: {0}")]
    Save(#[from] StateError),
    /// The kernel RNG failed.
    #[error("could not draw an epoch id: {0}")]
    Random(getrandom::Error),
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn random_epoch() -> Result<[u8; 16], getrandom::Error> {
    let mut epoch = [0u8; 16];
    getrandom::fill(&mut epoch)?;
    Ok(epoch)
}

/// The live generation state of the daemon.
pub struct Service {
    core: Core,
    dir: RuntimeDir,
    state_file: StateFile,
    page: PageWriter,
    record: PageRecord,
    started: Instant,
    last_change_sources: Vec<String>,
    rng: KernelRng,
    last_change: Option<LastChange>,
}

/// What status and the hooks know of the last change this daemon made
/// (not saved: like its sources, it starts empty after a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastChange {
    /// What the requester said it was.
    pub kind: ChangeKind,
    /// The hostname that came with it.
    pub hostname: Option<Hostname>,
    /// How the kernel RNG was renewed before it was published.
    pub rng: RngStatus,
}

impl Service {
    /// Loads the saved state (or starts fresh at 0), checks it against the
    /// page and publishes it. With `recover`, continues from the page.
    pub fn start(dir: RuntimeDir, recover: bool) -> Result<Service, StartError> {
        let page_path = dir.page_path().display().to_string();
        let dir_path = dir.path().display().to_string();
        let page_file = dir.open_page()?;
        let page = PageWriter::new(page_file, &dir.page_path())?;
        let on_page = page.existing();
        let from_page = || -> Result<SavedState, StartError> {
            let rec = on_page.ok_or_else(|| StartError::NothingToRecover(page_path.clone()))?;
            tracing::warn!(
                generation = rec.generation,
                "recovering from the page as asked (--recover)"
            );
            Ok(SavedState {
                generation: rec.generation,
                epoch: rec.epoch,
                changed_unix_ns: rec.changed_unix_ns,
            })
        };
        let (mut state_file, saved) = match StateFile::open(dir.fd(), &dir_path) {
            Ok((file, saved)) if recover => {
                // Never below what was saved: the page can lag the state
                // by one bump (crash between save and publish).
                let page = from_page()?;
                let best = match saved {
                    Some(s) if s.generation >= page.generation => s,
                    _ => page,
                };
                (file, Some(best))
            }
            Ok((file, saved)) => (file, saved),
            Err(StateError::Corrupt { .. }) if recover => {
                // Replace the corrupt file: --recover was asked for.
                rustix::fs::unlinkat(dir.fd(), crate::state::STATE_NAME, AtFlags::empty())
                    .map_err(|e| StartError::RemoveCorrupt {
                        path: format!("{dir_path}/{}", crate::state::STATE_NAME),
                        source: e.into(),
                    })?;
                let (file, _) = StateFile::open(dir.fd(), &dir_path).map_err(StartError::Save)?;
                (file, Some(from_page()?))
            }
            Err(source) => {
                return Err(StartError::State {
                    source,
                    page: page_path.clone(),
                })
            }
        };
        let state = match (saved, on_page) {
            (Some(s), Some(p)) if p.generation > s.generation => {
                return Err(StartError::PageAhead {
                    page: page_path,
                    page_generation: p.generation,
                    saved: s.generation,
                })
            }
            (Some(s), _) => s,
            (None, Some(p)) if p.generation > 0 => {
                return Err(StartError::MissingState {
                    state: format!("{dir_path}/{}", crate::state::STATE_NAME),
                    page: page_path,
                    generation: p.generation,
                })
            }
            (None, _) => SavedState {
                generation: 0,
                epoch: random_epoch().map_err(StartError::Random)?,
                changed_unix_ns: 0,
            },
        };
        state_file.save(&state).map_err(StartError::Save)?;
        let record = PageRecord {
            generation: state.generation,
            epoch: state.epoch,
            changed_unix_ns: state.changed_unix_ns,
        };
        let mut service = Service {
            core: Core::new(state.generation),
            dir,
            state_file,
            page,
            record,
            started: Instant::now(),
            last_change_sources: Vec::new(),
            rng: KernelRng::open(Policy::Auto),
            last_change: None,
        };
        service.page.publish(&record);
        // No watcher yet; a count left by a killed predecessor is replaced
        // (and its waiters woken).
        service.publish_outdated();
        Ok(service)
    }

    /// The runtime directory.
    pub fn dir(&self) -> &RuntimeDir {
        &self.dir
    }

    /// The current generation.
    pub fn generation(&self) -> Generation {
        self.core.generation()
    }

    /// The published record (generation, epoch, time).
    pub fn record(&self) -> &PageRecord {
        &self.record
    }

    /// Sets when the kernel RNG is reseeded (`--reseed`; default `auto`).
    pub fn set_reseed(&mut self, policy: Policy) {
        self.rng = KernelRng::open(policy);
    }

    /// Bumps (see the module docs for the order). `source` names what
    /// caused it, for status; `kernel_reseeded` says the kernel's own
    /// VM-fork reseed already covered this change (the `vmfork` signal).
    pub(crate) fn bump(
        &mut self,
        request: &BumpRequest,
        source: &str,
        kernel_reseeded: bool,
    ) -> Result<Generation, BumpError> {
        let next = self.core.next_generation(request.min)?;
        // Before the epoch is drawn, so the epoch (and every later draw in
        // this clone) comes from a renewed CRNG.
        let rng = self
            .rng
            .renew(request.details.entropy.as_ref(), kernel_reseeded);
        let state = SavedState {
            generation: next,
            epoch: random_epoch().map_err(BumpError::Random)?,
            changed_unix_ns: now_unix_ns(),
        };
        self.state_file.save(&state)?;
        self.record = PageRecord {
            generation: state.generation,
            epoch: state.epoch,
            changed_unix_ns: state.changed_unix_ns,
        };
        self.page.publish(&self.record);
        self.core.commit_generation(next)?;
        // Every watcher is outdated now: the barrier's count, then the
        // waiters on it (their own watchers may be outdated too).
        if !self.publish_outdated() {
            self.page.wake_outdated_waiters();
        }
        self.last_change_sources = vec![source.to_string()];
        self.last_change = Some(LastChange {
            kind: request.details.kind,
            hostname: request.details.hostname.clone(),
            rng,
        });
        Ok(next)
    }

    /// Another signal for the change just made (coalesced) brought
    /// details: its entropy is mixed in and the RNG reseeded again, and a
    /// kind or hostname the change did not have yet is taken. True when
    /// the kind became known (the hooks then run again with it).
    pub(crate) fn refine_last_change(&mut self, request: &BumpRequest) -> bool {
        let Some(last) = &mut self.last_change else {
            return false;
        };
        if let Some(entropy) = &request.details.entropy {
            let rng = self.rng.renew(Some(entropy), last.rng.reseeded);
            last.rng.entropy_mixed += rng.entropy_mixed;
            if rng.entropy_error.is_some() {
                last.rng.entropy_error = rng.entropy_error;
            }
            if rng.by.as_deref() == Some("sysgenidd") {
                last.rng.reseeded = true;
                last.rng.by = rng.by;
                last.rng.not_reseeded_because = None;
            }
        }
        if last.hostname.is_none() {
            last.hostname = request.details.hostname.clone();
        }
        if last.kind == ChangeKind::Unknown && request.details.kind != ChangeKind::Unknown {
            last.kind = request.details.kind;
            return true;
        }
        false
    }

    /// The last change this daemon made, if any.
    pub fn last_change(&self) -> Option<&LastChange> {
        self.last_change.as_ref()
    }

    /// Counts at this instant (advisory).
    pub fn counts(&self) -> Counts {
        self.core.counts()
    }

    /// The core's exhaustion rule for a forced minimum.
    pub(crate) fn check_minimum(
        &self,
        min: Generation,
        allow_exhaustion: bool,
    ) -> Result<(), CoreError> {
        self.core.check_minimum(min, allow_exhaustion)
    }

    /// What the barrier would answer now for `caller`.
    pub fn barrier(&self, caller: Option<WatcherId>) -> Result<Barrier, CoreError> {
        self.core.barrier(caller)
    }

    /// The generation a watcher must handle, if it is outdated.
    pub fn poll_read(&self, id: WatcherId) -> Result<Option<Generation>, CoreError> {
        self.core.poll_read(id)
    }

    /// Whether a watcher is outdated.
    pub fn is_outdated(&self, id: WatcherId) -> Result<bool, CoreError> {
        self.core.is_outdated(id)
    }

    /// Registers a watcher. Only [`crate::watchers::Watchers`] calls this,
    /// after its admission checks.
    pub(crate) fn register(
        &mut self,
        tracking: Tracking,
        acked: Option<Generation>,
        lifecycle: bool,
    ) -> WatcherId {
        let id = self.core.register_for(tracking, acked, lifecycle);
        self.publish_outdated();
        id
    }

    /// Removes a watcher.
    pub(crate) fn unregister(&mut self, id: WatcherId) -> Result<Tracking, CoreError> {
        let released = self.core.unregister(id);
        self.publish_outdated();
        released
    }

    /// Acknowledges `generation` for a watcher; true if the barrier may
    /// have moved.
    pub(crate) fn ack(&mut self, id: WatcherId, generation: Generation) -> Result<bool, CoreError> {
        let moved = self.core.ack(id, generation);
        self.publish_outdated();
        moved
    }

    /// Clean exit: barrier waiters on the page are told the daemon stopped
    /// (as parked socket waiters are answered `ShuttingDown`).
    pub(crate) fn stopping(&mut self) {
        self.page
            .set_outdated_tracked(sysgenid_page::OUTDATED_STOPPED);
        self.page.wake_outdated_waiters();
    }

    /// Publishes the count of outdated tracked watchers on the page (the
    /// barrier's futex word, see `sysgenid_page`), waking its waiters when
    /// it reached 0. Called after every change of the core's watchers,
    /// before the daemon answers anyone. True if it woke them.
    fn publish_outdated(&mut self) -> bool {
        self.page.set_outdated_tracked(self.core.counts().outdated)
    }

    /// Records that another source reported the same change (coalesced).
    pub(crate) fn note_agreeing_source(&mut self, source: &str) {
        if !self.last_change_sources.iter().any(|s| s == source) {
            self.last_change_sources.push(source.to_string());
        }
    }

    /// The sources behind the last change.
    pub fn last_change_sources(&self) -> &[String] {
        &self.last_change_sources
    }

    /// Time since start.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sysgenid_proto::{BumpDetails, Entropy};

    fn service() -> (tempfile::TempDir, Service) {
        let parent = tempfile::tempdir().unwrap();
        let dir = RuntimeDir::prepare(&parent.path().join("run")).unwrap();
        let mut service = Service::start(dir, false).unwrap();
        service.set_reseed(Policy::Never);
        (parent, service)
    }

    #[test]
    fn a_bump_records_its_kind_and_a_coalesced_signal_refines_an_unknown_one() {
        let (_dir, mut s) = service();
        assert!(s.last_change().is_none());
        let clone = BumpRequest {
            details: BumpDetails {
                kind: ChangeKind::Clone,
                hostname: Some(Hostname::new("web-3").unwrap()),
                ..BumpDetails::default()
            },
            ..BumpRequest::default()
        };
        // A vmgenid signal: unknown kind, the kernel reseeded itself.
        s.bump(&BumpRequest::default(), "vmfork", true).unwrap();
        let last = s.last_change().unwrap();
        assert_eq!(last.kind, ChangeKind::Unknown);
        assert_eq!(last.rng.by.as_deref(), Some("kernel"));
        // The host says, within the window, that it was a clone.
        assert!(s.refine_last_change(&clone), "the kind became known");
        let last = s.last_change().unwrap();
        assert_eq!(last.kind, ChangeKind::Clone);
        assert_eq!(last.hostname.as_ref().unwrap().as_str(), "web-3");
        // A known kind is kept.
        let restore = BumpRequest {
            details: BumpDetails {
                kind: ChangeKind::Restore,
                ..BumpDetails::default()
            },
            ..BumpRequest::default()
        };
        assert!(!s.refine_last_change(&restore));
        assert_eq!(s.last_change().unwrap().kind, ChangeKind::Clone);
        // A manual bump that says nothing is unknown and not reseeded
        // (--reseed never here), with the reason.
        s.bump(&BumpRequest::default(), "manual", false).unwrap();
        let last = s.last_change().unwrap();
        assert_eq!(last.kind, ChangeKind::Unknown);
        assert!(!last.rng.reseeded);
        assert!(last.hostname.is_none(), "a hostname is that change's only");
        // Entropy that comes with a refinement is counted (or its refusal
        // kept) either way.
        let with_entropy = BumpRequest {
            details: BumpDetails {
                entropy: Some(Entropy::new(vec![1; 32]).unwrap()),
                ..BumpDetails::default()
            },
            ..BumpRequest::default()
        };
        s.refine_last_change(&with_entropy);
        let rng = &s.last_change().unwrap().rng;
        assert!(
            rng.entropy_mixed == 32 || rng.entropy_error.is_some(),
            "{rng:?}"
        );
    }
}
