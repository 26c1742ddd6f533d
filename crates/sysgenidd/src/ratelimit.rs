//! Rate-limited log lines, for every line an unprivileged peer can cause.
//!
//! A local user can make the daemon refuse, drop or close things as fast
//! as it can send: refused connections, malformed frames, refused bumps,
//! device refusals, clients dropped for not reading. Logged one line each,
//! a flood of them fills the journal (224 358 lines in 5 s were measured)
//! and, under journald's own rate limit, pushes out the lines that matter:
//! the ready line, generation changes, hook output. So each such line has
//! a [`Kind`], and each kind may log [`PER_WINDOW`] lines per [`WINDOW`];
//! the rest are counted, and the count is logged once per window as
//! "N more lines of this kind suppressed" ([`flush`], called every loop
//! turn, or the next line of that kind).
//!
//! The check is a mutex and a comparison (the device's reader thread logs
//! too), and a suppressed line formats nothing: [`log_limited!`] evaluates
//! its message only when the line is let through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind let through per [`WINDOW`].
pub const PER_WINDOW: u32 = 5;

/// The window; also how often the "suppressed" count is logged at most.
pub const WINDOW: Duration = Duration::from_secs(1);

/// The kinds of line a peer can cause, each limited on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A connection refused at accept (limits), or accept failing.
    Connection,
    /// A connection closed for a protocol violation (malformed frame, no
    /// Hello, wrong version).
    Protocol,
    /// A privileged request (bump, freeze, thaw) refused.
    Permission,
    /// A client dropped for not reading its replies (outbox, budget).
    Budget,
    /// A device request refused (write open, forced update).
    Device,
}

const KINDS: usize = 5;

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    /// For the "suppressed" line.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Connection => "refused connection",
            Kind::Protocol => "protocol violation",
            Kind::Permission => "permission refusal",
            Kind::Budget => "dropped non-reading client",
            Kind::Device => "device refusal",
        }
    }

    const ALL: [Kind; KINDS] = [
        Kind::Connection,
        Kind::Protocol,
        Kind::Permission,
        Kind::Budget,
        Kind::Device,
    ];
}

/// One kind's budget: a fixed window of [`PER_WINDOW`] lines.
#[derive(Debug, Clone, Copy)]
pub struct Limiter {
    per_window: u32,
    window: Duration,
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Limiter {
    /// `per_window` lines per `window`.
    pub const fn new(per_window: u32, window: Duration) -> Limiter {
        Limiter {
            per_window,
            window,
            start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// Starts a new window if the current one is over; returns the lines
    /// suppressed in the window that ended (to be reported), if any.
    pub fn roll(&mut self, now: Instant) -> Option<u64> {
        match self.start {
            Some(start) if now.saturating_duration_since(start) < self.window => None,
            _ => {
                self.start = Some(now);
                self.used = 0;
                (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// Whether one more line may be logged at `now`; also returns the
    /// count to report first (see [`roll`](Self::roll)).
    pub fn allow(&mut self, now: Instant) -> (bool, Option<u64>) {
        let report = self.roll(now);
        if self.used < self.per_window {
            self.used += 1;
            (true, report)
        } else {
            self.suppressed += 1;
            (false, report)
        }
    }
}

static LIMITERS: Mutex<[Limiter; KINDS]> = Mutex::new([Limiter::new(PER_WINDOW, WINDOW); KINDS]);

fn report(kind: Kind, n: u64) {
    tracing::warn!(
        "{n} more {} line(s) suppressed in the last {} s (at most {PER_WINDOW} a second are logged)",
        kind.name(),
        WINDOW.as_secs()
    );
}

/// Whether a line of `kind` may be logged now (logging the count of those
/// suppressed before it, when a window ended).
pub fn allow(kind: Kind) -> bool {
    let now = Instant::now();
    let (ok, suppressed) = {
        let mut limiters = LIMITERS.lock().unwrap_or_else(|e| e.into_inner());
        limiters[kind.index()].allow(now)
    };
    if let Some(n) = suppressed {
        report(kind, n);
    }
    ok
}

/// Logs the counts of lines suppressed in windows that have ended: the
/// periodic "N more suppressed" line. Cheap; the event loop calls it
/// every turn.
pub fn flush() {
    let now = Instant::now();
    let mut due = [None; KINDS];
    {
        let mut limiters = LIMITERS.lock().unwrap_or_else(|e| e.into_inner());
        for (i, l) in limiters.iter_mut().enumerate() {
            if l.suppressed > 0 {
                due[i] = l.roll(now);
            }
        }
    }
    for (kind, n) in Kind::ALL.iter().zip(due) {
        if let Some(n) = n {
            report(*kind, n);
        }
    }
}

/// `log_limited!(Kind::X, warn, ...)`: a `tracing` line of that level,
/// if [`allow`] lets it through; the arguments are evaluated only then.
#[macro_export]
macro_rules! log_limited {
    ($kind:expr, $level:ident, $($arg:tt)+) => {
        if $crate::ratelimit::allow($kind) {
            tracing::$level!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_lets_a_few_through_and_reports_the_rest_once() {
        let t0 = Instant::now();
        let mut l = Limiter::new(3, Duration::from_secs(1));
        let allowed: Vec<bool> = (0..10).map(|_| l.allow(t0).0).collect();
        assert_eq!(allowed.iter().filter(|&&a| a).count(), 3);
        assert_eq!(l.roll(t0 + Duration::from_millis(500)), None, "same window");
        let (ok, report) = l.allow(t0 + Duration::from_secs(1));
        assert!(ok, "a new window lets lines through again");
        assert_eq!(report, Some(7), "the 7 suppressed lines are counted once");
        assert_eq!(
            l.roll(t0 + Duration::from_secs(3)),
            None,
            "nothing more to report"
        );
    }
}
