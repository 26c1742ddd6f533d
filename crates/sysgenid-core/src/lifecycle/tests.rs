//! The lifecycle's promises, one test each, then a property test against a
//! deliberately naive reference model.

use super::*;
use proptest::prelude::*;

fn lc() -> Lifecycle {
    Lifecycle::new(Config::default())
}

#[test]
fn freeze_waits_for_every_tracked_participant() {
    let mut l = lc();
    let a = l.join(Tracking::Tracked).id;
    let b = l.join(Tracking::Tracked).id;
    let _lazy = l.join(Tracking::Untracked).id;
    assert_eq!(
        l.freeze(0, 100),
        Ok(vec![Transition::FreezeStarted { id: 1 }])
    );
    assert_eq!(l.state(), State::Freezing);
    assert_eq!(l.counts(0).pending, 2);
    assert_eq!(l.confirm(a, 1, 10), Ok(None));
    assert_eq!(l.counts(10).pending, 1);
    assert_eq!(l.confirm(a, 1, 11), Ok(None), "a second confirm is a no-op");
    assert_eq!(l.counts(11).pending, 1);
    assert_eq!(l.confirm(b, 1, 20), Ok(Some(Transition::Frozen { id: 1 })));
    assert_eq!(l.state(), State::Frozen);
    assert_eq!(l.counts(50).frozen_ms, Some(30));
}

#[test]
fn freeze_with_nobody_to_wait_for_is_frozen_at_once() {
    let mut l = lc();
    l.join(Tracking::Untracked);
    assert_eq!(
        l.freeze(5, 100),
        Ok(vec![
            Transition::FreezeStarted { id: 1 },
            Transition::Frozen { id: 1 }
        ])
    );
    assert_eq!(l.freeze(6, 100), Ok(vec![]), "frozen already: success");
}

#[test]
fn timeout_aborts_and_names_the_unconfirmed() {
    let mut l = lc();
    let a = l.join(Tracking::Tracked).id;
    l.join(Tracking::Tracked);
    l.join(Tracking::Tracked);
    l.freeze(0, 100).unwrap();
    l.confirm(a, 1, 1).unwrap();
    assert_eq!(l.next_deadline(), Some(100));
    assert_eq!(l.tick(99), None);
    assert_eq!(
        l.tick(100),
        Some(Transition::Aborted {
            id: 1,
            pending: 2,
            reason: AbortReason::TimedOut
        })
    );
    assert_eq!(l.state(), State::Running);
    assert_eq!(l.next_deadline(), None);
    assert_eq!(l.confirm(a, 1, 101), Ok(None), "late confirm: no effect");
}

#[test]
fn a_late_confirm_does_not_count_for_the_next_freeze() {
    let mut l = lc();
    let a = l.join(Tracking::Tracked).id;
    l.freeze(0, 10).unwrap();
    l.tick(10).unwrap();
    l.freeze(20, 10).unwrap();
    assert_eq!(l.confirm(a, 1, 21), Ok(None));
    assert_eq!(l.counts(21).pending, 1);
    assert_eq!(
        l.confirm(a, 3, 21),
        Err(LifecycleError::WrongFreeze {
            confirmed: 3,
            latest: 2
        })
    );
    assert_eq!(l.confirm(a, 2, 22), Ok(Some(Transition::Frozen { id: 2 })));
}

#[test]
fn a_second_freeze_while_freezing_is_refused() {
    let mut l = lc();
    l.join(Tracking::Tracked);
    l.freeze(0, 10).unwrap();
    assert_eq!(
        l.freeze(1, 10),
        Err(LifecycleError::Busy { id: 1, pending: 1 })
    );
    assert_eq!(l.state(), State::Freezing);
}

#[test]
fn leaving_while_freezing_releases_the_freeze() {
    let mut l = lc();
    let a = l.join(Tracking::Tracked).id;
    let b = l.join(Tracking::Tracked).id;
    l.freeze(0, 100).unwrap();
    l.confirm(a, 1, 1).unwrap();
    assert_eq!(l.leave(b, 7), Ok(Some(Transition::Frozen { id: 1 })));
    assert_eq!(
        l.leave(b, 8),
        Err(LifecycleError::UnknownParticipant(b.index()))
    );
    assert_eq!(l.counts(8).frozen_ms, Some(1), "frozen since it left");
}

#[test]
fn joining_while_frozen_is_frozen_at_once() {
    let mut l = lc();
    l.freeze(0, 100).unwrap();
    assert_eq!(l.state(), State::Frozen);
    let j = l.join(Tracking::Tracked);
    assert_eq!(j.freeze, Some(1));
    assert_eq!(l.state(), State::Frozen);
    assert_eq!(l.has_confirmed(j.id), Ok(true));
    assert_eq!(l.leave(j.id, 1), Ok(None));
}

#[test]
fn joining_while_freezing_is_asked_and_waited_for() {
    let mut l = lc();
    let a = l.join(Tracking::Tracked).id;
    l.freeze(0, 100).unwrap();
    let j = l.join(Tracking::Tracked);
    assert_eq!(j.freeze, Some(1));
    l.confirm(a, 1, 1).unwrap();
    assert_eq!(l.state(), State::Freezing);
    assert_eq!(
        l.confirm(j.id, 1, 2),
        Ok(Some(Transition::Frozen { id: 1 }))
    );
    assert_eq!(
        lc().join(Tracking::Tracked).freeze,
        None,
        "running: no freeze"
    );
}

#[test]
fn thaw_is_idempotent_and_aborts_a_freeze_in_progress() {
    let mut l = lc();
    assert_eq!(l.thaw(), None, "running: nothing to do");
    l.join(Tracking::Tracked);
    l.freeze(0, 100).unwrap();
    assert_eq!(
        l.thaw(),
        Some(Transition::Aborted {
            id: 1,
            pending: 1,
            reason: AbortReason::ThawRequested
        })
    );
    let mut l = lc();
    l.freeze(0, 100).unwrap();
    assert_eq!(
        l.thaw(),
        Some(Transition::Thawed {
            id: 1,
            reason: ThawReason::Requested
        })
    );
    assert_eq!(l.thaw(), None);
    assert_eq!(l.state(), State::Running);
}

#[test]
fn restore_while_frozen_thaws_once_watchers_caught_up() {
    let mut l = lc();
    l.freeze(0, 100).unwrap();
    assert_eq!(l.restored(3), None);
    assert!(l.counts(1).thaw_after_acks);
    assert_eq!(l.watchers_outdated(1), None);
    assert_eq!(
        l.watchers_outdated(0),
        Some(Transition::Thawed {
            id: 1,
            reason: ThawReason::Restored
        })
    );
    assert_eq!(l.watchers_outdated(0), None, "once");
    // Nobody to wait for: at once.
    l.freeze(10, 100).unwrap();
    assert_eq!(
        l.restored(0),
        Some(Transition::Thawed {
            id: 2,
            reason: ThawReason::Restored
        })
    );
    // Acks before a restore do nothing.
    l.freeze(20, 100).unwrap();
    assert_eq!(l.watchers_outdated(0), None);
    assert_eq!(l.state(), State::Frozen);
}

#[test]
fn restore_while_frozen_can_leave_thawing_to_the_orchestrator() {
    let mut l = Lifecycle::new(Config {
        thaw_on_restore: false,
        ..Config::default()
    });
    l.freeze(0, 100).unwrap();
    assert_eq!(l.restored(0), None);
    assert_eq!(l.watchers_outdated(0), None);
    assert_eq!(l.state(), State::Frozen);
}

#[test]
fn restore_while_freezing_aborts() {
    let mut l = lc();
    l.join(Tracking::Tracked);
    l.freeze(0, 100).unwrap();
    assert_eq!(
        l.restored(1),
        Some(Transition::Aborted {
            id: 1,
            pending: 1,
            reason: AbortReason::Restored
        })
    );
    assert_eq!(lc().restored(0), None, "running: nothing");
}

#[test]
fn the_freeze_bound_thaws_by_itself() {
    let mut l = Lifecycle::new(Config {
        max_frozen_ms: Some(1000),
        ..Config::default()
    });
    let a = l.join(Tracking::Tracked).id;
    l.freeze(0, 500).unwrap();
    l.confirm(a, 1, 200).unwrap();
    assert_eq!(l.next_deadline(), Some(1200), "counted from frozen");
    assert_eq!(l.tick(1199), None);
    assert_eq!(
        l.tick(1200),
        Some(Transition::Thawed {
            id: 1,
            reason: ThawReason::Bound
        })
    );
    let mut l = Lifecycle::new(Config {
        max_frozen_ms: None,
        ..Config::default()
    });
    l.freeze(0, 1).unwrap();
    assert_eq!(l.next_deadline(), None);
    assert_eq!(l.tick(u64::MAX), None);
}

#[test]
fn requester_gone_aborts_only_a_freeze_in_progress() {
    let mut l = lc();
    assert_eq!(l.requester_gone(), None);
    l.join(Tracking::Tracked);
    l.freeze(0, 100).unwrap();
    assert!(matches!(
        l.requester_gone(),
        Some(Transition::Aborted {
            reason: AbortReason::RequesterGone,
            ..
        })
    ));
    let mut l = lc();
    l.freeze(0, 100).unwrap();
    assert_eq!(l.requester_gone(), None, "frozen stays frozen");
}

// ---------------------------------------------------------------------
// Property test: random operation sequences against a reference model.

#[derive(Debug, Clone)]
enum Op {
    Join(bool),
    Leave(usize),
    Freeze(u64),
    Confirm(usize, i8),
    Thaw,
    RequesterGone,
    Restored(u32),
    Outdated(u32),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<bool>().prop_map(Op::Join),
        1 => (0usize..8).prop_map(Op::Leave),
        2 => (0u64..50).prop_map(Op::Freeze),
        4 => (0usize..8, -1i8..2).prop_map(|(i, d)| Op::Confirm(i, d)),
        1 => Just(Op::Thaw),
        1 => Just(Op::RequesterGone),
        1 => (0u32..3).prop_map(Op::Restored),
        1 => (0u32..3).prop_map(Op::Outdated),
        2 => (0u64..40).prop_map(Op::Advance),
    ]
}

/// The reference: everything recomputed from a list on every question.
#[derive(Debug)]
struct Model {
    state: State,
    freeze: u32,
    /// (tracked, confirmed the current freeze)
    participants: Vec<(bool, bool)>,
    deadline: u64,
    frozen_since: u64,
    restored: bool,
    bound: u64,
    thaw_on_restore: bool,
}

impl Model {
    fn pending(&self) -> u32 {
        if self.state != State::Freezing {
            return 0;
        }
        self.participants.iter().filter(|(t, c)| *t && !*c).count() as u32
    }

    fn settle(&mut self, now: u64) -> Option<Transition> {
        if self.state == State::Freezing && self.pending() == 0 {
            self.state = State::Frozen;
            self.frozen_since = now;
            self.restored = false;
            return Some(Transition::Frozen { id: self.freeze });
        }
        None
    }

    fn abort(&mut self, reason: AbortReason) -> Transition {
        let pending = self.pending();
        self.state = State::Running;
        Transition::Aborted {
            id: self.freeze,
            pending,
            reason,
        }
    }

    fn thaw(&mut self, reason: ThawReason) -> Transition {
        self.state = State::Running;
        self.restored = false;
        Transition::Thawed {
            id: self.freeze,
            reason,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn lifecycle_matches_reference_model(bound in prop_oneof![Just(None), (1u64..60).prop_map(Some)],
                                         thaw_on_restore in any::<bool>(),
                                         ops in proptest::collection::vec(op(), 1..100)) {
        let mut l = Lifecycle::new(Config { thaw_on_restore, max_frozen_ms: bound });
        let mut m = Model {
            state: State::Running, freeze: 0, participants: Vec::new(), deadline: 0,
            frozen_since: 0, restored: false, bound: bound.unwrap_or(u64::MAX), thaw_on_restore,
        };
        let mut ids: Vec<ParticipantId> = Vec::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Join(tracked) => {
                    let joined = l.join(if tracked { Tracking::Tracked } else { Tracking::Untracked });
                    let expect = (m.state != State::Running).then_some(m.freeze);
                    prop_assert_eq!(joined.freeze, expect);
                    // Waited for only if tracked and a freeze is still collecting.
                    m.participants.push((tracked, !(tracked && m.state == State::Freezing)));
                    ids.push(joined.id);
                }
                Op::Leave(i) if i < ids.len() => {
                    let id = ids.remove(i);
                    m.participants.remove(i);
                    let expect = m.settle(now);
                    prop_assert_eq!(l.leave(id, now), Ok(expect));
                }
                Op::Freeze(timeout) => {
                    let got = l.freeze(now, timeout);
                    match m.state {
                        State::Frozen => prop_assert_eq!(got, Ok(vec![])),
                        State::Freezing => prop_assert_eq!(got, Err(LifecycleError::Busy {
                            id: m.freeze, pending: m.pending() })),
                        State::Running => {
                            m.freeze += 1;
                            m.state = State::Freezing;
                            m.deadline = now + timeout;
                            for p in &mut m.participants {
                                p.1 = !p.0;
                            }
                            let mut expect = vec![Transition::FreezeStarted { id: m.freeze }];
                            expect.extend(m.settle(now));
                            prop_assert_eq!(got, Ok(expect));
                        }
                    }
                }
                Op::Confirm(i, delta) if i < ids.len() => {
                    let id = (i64::from(m.freeze) + i64::from(delta)).max(0) as u32;
                    let got = l.confirm(ids[i], id, now);
                    if id > m.freeze {
                        prop_assert_eq!(got, Err(LifecycleError::WrongFreeze { confirmed: id, latest: m.freeze }));
                    } else {
                        let mut expect = None;
                        if m.state == State::Freezing && id == m.freeze && !m.participants[i].1 {
                            m.participants[i].1 = true;
                            expect = m.settle(now);
                        }
                        prop_assert_eq!(got, Ok(expect));
                    }
                }
                Op::Thaw => {
                    let expect = match m.state {
                        State::Running => None,
                        State::Freezing => Some(m.abort(AbortReason::ThawRequested)),
                        State::Frozen => Some(m.thaw(ThawReason::Requested)),
                    };
                    prop_assert_eq!(l.thaw(), expect);
                }
                Op::RequesterGone => {
                    let expect = (m.state == State::Freezing).then(|| m.abort(AbortReason::RequesterGone));
                    prop_assert_eq!(l.requester_gone(), expect);
                }
                Op::Restored(outdated) => {
                    let expect = match m.state {
                        State::Freezing => Some(m.abort(AbortReason::Restored)),
                        State::Frozen if m.thaw_on_restore => {
                            m.restored = true;
                            (outdated == 0).then(|| m.thaw(ThawReason::Restored))
                        }
                        _ => None,
                    };
                    prop_assert_eq!(l.restored(outdated), expect);
                }
                Op::Outdated(outdated) => {
                    let expect = (m.state == State::Frozen && m.restored && outdated == 0)
                        .then(|| m.thaw(ThawReason::Restored));
                    prop_assert_eq!(l.watchers_outdated(outdated), expect);
                }
                Op::Advance(ms) => {
                    now += ms;
                    let expect = match m.state {
                        State::Freezing if now >= m.deadline => Some(m.abort(AbortReason::TimedOut)),
                        State::Frozen if now >= m.frozen_since.saturating_add(m.bound) =>
                            Some(m.thaw(ThawReason::Bound)),
                        _ => None,
                    };
                    prop_assert_eq!(l.tick(now), expect);
                }
                _ => {}
            }
            let c = l.counts(now);
            prop_assert_eq!(c.state, m.state);
            prop_assert_eq!(c.freeze, m.freeze);
            prop_assert_eq!(c.participants as usize, m.participants.len());
            prop_assert_eq!(c.pending, m.pending());
            prop_assert_eq!(c.frozen_ms, (m.state == State::Frozen).then(|| now - m.frozen_since));
            prop_assert_eq!(c.thaw_after_acks, m.state == State::Frozen && m.restored);
            for (i, id) in ids.iter().enumerate() {
                let confirmed = m.state != State::Freezing || m.participants[i].1;
                prop_assert_eq!(l.has_confirmed(*id), Ok(confirmed));
            }
            let deadline = match m.state {
                State::Running => None,
                State::Freezing => Some(m.deadline),
                State::Frozen => bound.map(|b| m.frozen_since + b),
            };
            prop_assert_eq!(l.next_deadline(), deadline);
        }
    }
}
