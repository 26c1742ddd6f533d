//! Merging restore signals from several sources into one bump.
//!
//! Why this exists: one restore can be reported by more than one source (on
//! Linux 6.8.0–6.8.7 the VMGenID notification produces both the `vmfork`
//! kernel log record and the `NEW_VMGENID` uevent; a Firecracker guest with
//! both VMGenID and vmclock reports through `vmfork` and `vmclock`). The
//! daemon should bump the generation once per restore, not once per source.
//!
//! Rule, applied by [`Coalescer::offer`]:
//!
//! * the first signal bumps ([`Offer::Bump`]) and opens a window
//!   (default [`DEFAULT_WINDOW`], 2 seconds) measured from that signal;
//! * a signal from a *different* source inside the window is the same restore
//!   seen another way: [`Offer::Merged`], and the source is recorded in
//!   [`Coalescer::agreed`];
//! * a second signal from the *same* source inside the window is a new
//!   restore and bumps again: a source reports each restore once (two kernel
//!   reseed records are two VM forks, two counter changes are two restores),
//!   so merging it would lose a restore. A spurious bump is safe, a missed
//!   one is not;
//! * any signal after the window bumps and opens a new window.
//!
//! Two seconds covers the delay between sources reporting the same restore
//! (they all react to one hypervisor notification within milliseconds, the
//! vmclock interval fallback adds up to one `vmclock_interval`, 1 s by
//! default) while being far shorter than any realistic snapshot/restore
//! cycle. With a `vmclock_interval` above ~2 s, raise the window too.

use std::time::{Duration, Instant};

/// Default merge window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(2);

/// What to do with a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// A new restore: bump the generation.
    Bump,
    /// Same restore already bumped for, reported by another source.
    Merged,
}

/// Pure merge state; feed it every [`SourceEvent`](crate::SourceEvent).
#[derive(Debug, Clone)]
pub struct Coalescer {
    /// Merge window, measured from the signal that caused the last bump.
    pub window: Duration,
    last_bump: Option<Instant>,
    agreed: Vec<&'static str>,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer::new(DEFAULT_WINDOW)
    }
}

impl Coalescer {
    /// A coalescer with the given window.
    pub fn new(window: Duration) -> Self {
        Coalescer {
            window,
            last_bump: None,
            agreed: Vec::new(),
        }
    }

    /// Classify a signal from `source` seen at `now`.
    pub fn offer(&mut self, source: &'static str, now: Instant) -> Offer {
        if let Some(t) = self.last_bump {
            // A clock going backwards counts as "within the window".
            let in_window = now.saturating_duration_since(t) < self.window;
            if in_window && !self.agreed.contains(&source) {
                self.agreed.push(source);
                return Offer::Merged;
            }
        }
        self.last_bump = Some(now);
        self.agreed.clear();
        self.agreed.push(source);
        Offer::Bump
    }

    /// Sources that reported the most recent restore, the bump-causing one
    /// first. Empty before the first signal.
    pub fn agreed(&self) -> &[&'static str] {
        &self.agreed
    }

    /// When the last bump-causing signal was seen.
    pub fn last_bump(&self) -> Option<Instant> {
        self.last_bump
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_signal_bumps() {
        let mut c = Coalescer::default();
        assert_eq!(c.window, ms(2000));
        assert!(c.agreed().is_empty());
        assert_eq!(c.offer("vmfork", Instant::now()), Offer::Bump);
        assert_eq!(c.agreed(), ["vmfork"]);
    }

    #[test]
    fn other_sources_within_window_merge() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.offer("vmfork", t0), Offer::Bump);
        assert_eq!(c.offer("uevent", t0 + ms(5)), Offer::Merged);
        assert_eq!(c.offer("vmclock", t0 + ms(1999)), Offer::Merged);
        assert_eq!(c.agreed(), ["vmfork", "uevent", "vmclock"]);
        assert_eq!(c.last_bump(), Some(t0));
    }

    #[test]
    fn same_source_within_window_is_a_new_restore() {
        let t0 = Instant::now();
        let mut c = Coalescer::default();
        assert_eq!(c.offer("vmfork", t0), Offer::Bump);
        assert_eq!(c.offer("uevent", t0 + ms(1)), Offer::Merged);
        // Second uevent: a second restore.
        assert_eq!(c.offer("uevent", t0 + ms(2)), Offer::Bump);
        assert_eq!(c.agreed(), ["uevent"]);
        // ...whose window starts now; vmfork agreeing merges into it.
        assert_eq!(c.offer("vmfork", t0 + ms(3)), Offer::Merged);
        assert_eq!(c.offer("vmfork", t0 + ms(4)), Offer::Bump);
    }

    #[test]
    fn window_is_measured_from_the_bump_not_extended_by_merges() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(ms(100));
        assert_eq!(c.offer("vmfork", t0), Offer::Bump);
        assert_eq!(c.offer("uevent", t0 + ms(90)), Offer::Merged);
        // 100 ms after the bump: outside, even though uevent was 10 ms ago.
        assert_eq!(c.offer("vmclock", t0 + ms(100)), Offer::Bump);
        assert_eq!(c.agreed(), ["vmclock"]);
        assert_eq!(c.offer("uevent", t0 + ms(250)), Offer::Bump);
    }

    #[test]
    fn clock_going_backwards_counts_as_within_window() {
        let t0 = Instant::now() + ms(1000);
        let mut c = Coalescer::default();
        assert_eq!(c.offer("vmfork", t0), Offer::Bump);
        assert_eq!(c.offer("vmclock", t0 - ms(500)), Offer::Merged);
    }

    #[test]
    fn zero_window_never_merges() {
        let t0 = Instant::now();
        let mut c = Coalescer::new(Duration::ZERO);
        assert_eq!(c.offer("vmfork", t0), Offer::Bump);
        assert_eq!(c.offer("uevent", t0), Offer::Bump);
    }
}
