//! Talking to the service manager (systemd, `Type=notify`): `READY=1` with
//! a `STATUS=` line once the socket listens and the generation is loaded,
//! `STOPPING=1` on a clean exit, and the watchdog.
//!
//! The watchdog is pinged by the event loop itself, as one of its timers
//! ([`Watchdog::deadline`] bounds the loop's wait, [`Watchdog::tick`] pings
//! when due): a loop that wedges stops pinging, and systemd restarts the
//! daemon (`WatchdogSec=` in `sysgenidd.service`). Pings go out at half the
//! interval systemd asked for. Outside systemd (`NOTIFY_SOCKET` unset)
//! every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Tells the service manager the daemon is ready, with a status line.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]) {
        tracing::warn!("cannot notify the service manager of readiness: {e}");
    }
}

/// Updates the status line (`systemctl status sysgenidd`).
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Tells the service manager a clean stop has begun.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The watchdog timer of the event loop.
#[derive(Debug)]
pub struct Watchdog {
    /// Ping period (half of `WATCHDOG_USEC`); `None` when systemd asked for
    /// no watchdog.
    period: Option<Duration>,
    next: Instant,
}

impl Watchdog {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub fn from_env() -> Watchdog {
        Watchdog::with_interval(sd_notify::watchdog_enabled())
    }

    /// A watchdog that must be pinged at least every `interval` (`None`:
    /// never).
    pub fn with_interval(interval: Option<Duration>) -> Watchdog {
        let period = interval.map(|i| (i / 2).max(Duration::from_millis(1)));
        Watchdog {
            period,
            next: Instant::now(),
        }
    }

    /// The watchdog interval systemd asked for, if any.
    pub fn interval(&self) -> Option<Duration> {
        self.period.map(|p| p * 2)
    }

    /// When the loop must wake up next to ping.
    pub fn deadline(&self) -> Option<Instant> {
        self.period.map(|_| self.next)
    }

    /// Pings if due; returns whether it did.
    pub fn tick(&mut self, now: Instant) -> bool {
        let Some(period) = self.period else {
            return false;
        };
        if now < self.next {
            return false;
        }
        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        self.next = now + period;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_watchdog_never_wakes_the_loop() {
        let mut w = Watchdog::with_interval(None);
        assert_eq!(w.deadline(), None);
        assert!(!w.tick(Instant::now()));
    }

    #[test]
    fn pings_at_half_the_interval() {
        let mut w = Watchdog::with_interval(Some(Duration::from_secs(10)));
        let start = Instant::now();
        assert!(w.tick(start), "the first turn pings");
        assert_eq!(w.deadline(), Some(start + Duration::from_secs(5)));
        assert!(!w.tick(start + Duration::from_secs(4)));
        assert!(w.tick(start + Duration::from_secs(5)));
        assert_eq!(w.interval(), Some(Duration::from_secs(10)));
    }
}
