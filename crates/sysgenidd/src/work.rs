//! What the event loop still has to do: the work list the frontends add to,
//! and requests that wait with a deadline.
//!
//! Both frontends use this module and the loop drains it; it depends on
//! nothing else of the daemon, so neither frontend imports the other or the
//! loop.
//!
//! * [`WorkList`]: a handler that changes shared state (an ack, a close, a
//!   privileged bump) does not act on the consequences itself; it records
//!   them here and returns. The loop then processes the list iteratively,
//!   so a reply never re-enters a handler and the stack depth does not
//!   depend on how many clients wait (a recursion through every waiting
//!   connection once overflowed the stack).
//! * [`Pending`]: requests that are answered later, on a state change or
//!   at a deadline (barrier waits on the socket and on the device; a
//!   lifecycle freeze request would be one more). The loop's `epoll_wait`
//!   timeout is the earliest deadline of all of them.

use std::collections::VecDeque;
use std::time::Instant;

use sysgenid_core::lifecycle::Transition;
use sysgenid_core::Generation;
use sysgenid_proto::BumpDetails;

/// Who asked for a privileged bump, to be answered once it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// A socket connection, by its key. The connection reads nothing more
    /// until it is answered, and it is not closed before the loop answers.
    Socket(usize),
    /// A device `SYSGENID_FORCE_GEN_UPDATE`, by its FUSE `unique`.
    Device(u64),
    /// A host channel connection's `restored`, by its key: a restore
    /// signal from the host (source `host`, coalesced with a kernel
    /// signal for the same restore), not a manual bump.
    Host(usize),
}

/// A change asked for: what every frontend (the socket, the device, a
/// host channel) and every restore signal hands to the event loop, which
/// makes it in one place (`EventLoop::change`: reseed → epoch → save →
/// publish → tell everyone).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BumpRequest {
    /// The minimum generation asked for (0: just the next one).
    pub min: Generation,
    /// Whether a minimum that exhausts the counter was explicitly allowed
    /// (`sysgenid_core::Core::check_minimum`; never on the device).
    pub allow_exhaustion: bool,
    /// The kind of change, host entropy to mix in before the reseed, and
    /// the hostname for the hooks (`sysgenid_proto::BumpDetails`).
    pub details: BumpDetails,
}

/// A privileged bump request, checked by its frontend, and who to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivilegedBump {
    /// What was asked for.
    pub request: BumpRequest,
    /// Who to answer.
    pub requester: Requester,
}

/// Work queued by handlers for the loop.
#[derive(Debug, Default)]
pub struct WorkList {
    /// The barrier may have moved: re-evaluate every pending wait.
    settle: bool,
    bumps: VecDeque<PrivilegedBump>,
    /// Socket connections to read again (a wait or bump ended, or their
    /// per-turn frame budget ran out), in order.
    resume: VecDeque<usize>,
    /// The listener's backlog may hold more connections (its per-turn
    /// accept budget ran out, or descriptors were freed).
    accept: bool,
    /// Lifecycle transitions to announce (participants, hooks, the
    /// orchestrator waiting for its freeze), in order.
    transitions: VecDeque<Transition>,
}

impl WorkList {
    /// Something that the barrier depends on changed (ack, close, bump).
    pub fn settle(&mut self) {
        self.settle = true;
    }

    /// Queues a privileged bump.
    pub fn bump(&mut self, request: PrivilegedBump) {
        self.bumps.push_back(request);
    }

    /// Queues a lifecycle transition to announce (`None`: nothing).
    pub fn transition(&mut self, transition: impl IntoIterator<Item = Transition>) {
        self.transitions.extend(transition);
    }

    /// The next transition to announce.
    pub fn next_transition(&mut self) -> Option<Transition> {
        self.transitions.pop_front()
    }

    /// Queues a socket connection to be read again.
    pub fn resume(&mut self, key: usize) {
        self.resume.push_back(key);
    }

    /// Queues the listener to be accepted from again next turn.
    pub fn accept_again(&mut self) {
        self.accept = true;
    }

    /// Takes the accept-again flag.
    pub fn take_accept(&mut self) -> bool {
        std::mem::take(&mut self.accept)
    }

    /// Takes the settle flag.
    pub fn take_settle(&mut self) -> bool {
        std::mem::take(&mut self.settle)
    }

    /// The next queued bump.
    pub fn next_bump(&mut self) -> Option<PrivilegedBump> {
        self.bumps.pop_front()
    }

    /// Takes the connections to read again, oldest first.
    pub fn take_resumed(&mut self) -> VecDeque<usize> {
        std::mem::take(&mut self.resume)
    }

    /// Whether connections are waiting to be read again (the loop then
    /// polls without blocking).
    pub fn has_resumed(&self) -> bool {
        !self.resume.is_empty() || self.accept
    }

    /// Whether settle or bump work is queued.
    pub fn has_state_work(&self) -> bool {
        self.settle || !self.bumps.is_empty() || !self.transitions.is_empty()
    }
}

/// Requests waiting for a state change or their deadline, keyed by whatever
/// the frontend answers them by.
#[derive(Debug)]
pub struct Pending<K> {
    entries: Vec<(K, Option<Instant>)>,
}

impl<K> Default for Pending<K> {
    fn default() -> Pending<K> {
        Pending {
            entries: Vec::new(),
        }
    }
}

impl<K: Copy + PartialEq> Pending<K> {
    /// Adds a request; `None` waits forever.
    pub fn add(&mut self, key: K, deadline: Option<Instant>) {
        self.entries.push((key, deadline));
    }

    /// Removes every request matching `pred` (answered or gone) and returns
    /// them.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&K) -> bool) -> Vec<K> {
        let mut removed = Vec::new();
        self.entries.retain(|(k, _)| {
            let hit = pred(k);
            if hit {
                removed.push(*k);
            }
            !hit
        });
        removed
    }

    /// Ends the requests for which `decide` has an answer, returning them
    /// with it; the rest keep waiting.
    pub fn settle<R>(&mut self, mut decide: impl FnMut(&K) -> Option<R>) -> Vec<(K, R)> {
        let mut done = Vec::new();
        self.entries.retain(|(k, _)| match decide(k) {
            Some(answer) => {
                done.push((*k, answer));
                false
            }
            None => true,
        });
        done
    }

    /// Ends the requests whose deadline is at or before `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<K> {
        let mut expired = Vec::new();
        self.entries.retain(|&(k, deadline)| match deadline {
            Some(d) if d <= now => {
                expired.push(k);
                false
            }
            _ => true,
        });
        expired
    }

    /// Removes and returns every request (at shutdown).
    pub fn drain(&mut self) -> Vec<K> {
        self.entries.drain(..).map(|(k, _)| k).collect()
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|&(_, d)| d).min()
    }

    /// How many are waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pending_expires_only_what_is_due_and_reports_the_earliest_deadline() {
        let now = Instant::now();
        let mut p = Pending::default();
        p.add(1u32, Some(now + Duration::from_secs(5)));
        p.add(2, None);
        p.add(3, Some(now + Duration::from_secs(1)));
        assert_eq!(p.next_deadline(), Some(now + Duration::from_secs(1)));
        assert_eq!(p.expire(now + Duration::from_secs(2)), vec![3]);
        assert_eq!(p.next_deadline(), Some(now + Duration::from_secs(5)));
        assert_eq!(p.settle(|&k| (k == 2).then_some("done")), vec![(2, "done")]);
        assert_eq!(p.remove_where(|&k| k == 1), vec![1]);
        assert!(p.is_empty());
    }

    #[test]
    fn work_list_settles_once_and_keeps_bumps_in_order() {
        let mut w = WorkList::default();
        w.settle();
        w.settle();
        let a = PrivilegedBump {
            request: BumpRequest::default(),
            requester: Requester::Device(7),
        };
        let b = PrivilegedBump {
            request: BumpRequest {
                min: 9,
                ..BumpRequest::default()
            },
            requester: Requester::Socket(1),
        };
        w.bump(a.clone());
        w.bump(b.clone());
        assert!(w.take_settle());
        assert!(!w.take_settle());
        assert_eq!(w.next_bump(), Some(a));
        assert_eq!(w.next_bump(), Some(b));
        assert_eq!(w.next_bump(), None);
        assert!(!w.has_state_work());
    }
}
