//! The core's promises, one test each, then a property test against a
//! deliberately naive reference model.

use super::*;
use proptest::prelude::*;

#[test]
fn fresh_core_starts_at_given_generation_with_nobody() {
    let core = Core::new(0);
    assert_eq!(core.generation(), 0);
    assert_eq!(core.counts(), Counts::default());
}

#[test]
fn new_watcher_is_up_to_date() {
    let mut core = Core::new(7);
    let w = core.register(Tracking::Tracked, None);
    assert_eq!(core.poll_read(w), Ok(None));
    assert_eq!(core.counts().outdated, 0);
}

#[test]
fn read_returns_new_generation_until_acked() {
    let mut core = Core::new(0);
    let w = core.register(Tracking::Tracked, None);
    assert_eq!(core.bump(0), Ok(1));
    assert_eq!(core.poll_read(w), Ok(Some(1)));
    assert_eq!(core.poll_read(w), Ok(Some(1)), "repeats until acked");
    assert_eq!(core.ack(w, 1), Ok(true));
    assert_eq!(core.poll_read(w), Ok(None));
    assert_eq!(core.ack(w, 1), Ok(false), "second ack is a no-op");
}

#[test]
fn wrong_ack_is_refused_and_changes_nothing() {
    let mut core = Core::new(0);
    let w = core.register(Tracking::Tracked, None);
    core.bump(0).unwrap();
    let before = core.counts();
    assert_eq!(
        core.ack(w, 0),
        Err(CoreError::WrongGeneration {
            acked: 0,
            current: 1
        })
    );
    assert_eq!(
        core.ack(w, 2).unwrap_err(),
        CoreError::WrongGeneration {
            acked: 2,
            current: 1
        }
    );
    assert_eq!(core.counts(), before);
    assert_eq!(core.poll_read(w), Ok(Some(1)));
}

#[test]
fn bump_honours_minimum_and_outdates_everyone() {
    let mut core = Core::new(5);
    let a = core.register(Tracking::Tracked, None);
    let b = core.register(Tracking::Untracked, None);
    assert_eq!(core.bump(8), Ok(8), "seed example: 5 with min 8 -> 8");
    assert_eq!(core.bump(3), Ok(9), "a minimum below current+1 is ignored");
    assert_eq!(core.poll_read(a), Ok(Some(9)));
    assert_eq!(core.poll_read(b), Ok(Some(9)));
    let c = core.counts();
    assert_eq!((c.outdated, c.outdated_untracked), (1, 1));
}

#[test]
fn bump_past_u32_max_is_refused_and_changes_nothing() {
    let mut core = Core::new(u32::MAX - 1);
    let w = core.register(Tracking::Tracked, None);
    assert_eq!(core.bump(0), Ok(u32::MAX));
    core.ack(w, u32::MAX).unwrap();
    assert_eq!(core.bump(0), Err(CoreError::Overflow { current: u32::MAX }));
    assert_eq!(core.generation(), u32::MAX);
    assert_eq!(core.poll_read(w), Ok(None));
    let mut core = Core::new(3);
    assert_eq!(
        core.bump(u32::MAX),
        Ok(u32::MAX),
        "min may reach MAX exactly"
    );
}

#[test]
fn commit_must_increase() {
    let mut core = Core::new(4);
    assert_eq!(
        core.commit_generation(4),
        Err(CoreError::NotIncreasing {
            proposed: 4,
            current: 4
        })
    );
    assert_eq!(core.generation(), 4);
}

#[test]
fn barrier_waits_for_tracked_only() {
    let mut core = Core::new(0);
    let t = core.register(Tracking::Tracked, None);
    let u = core.register(Tracking::Untracked, None);
    let me = core.register(Tracking::Tracked, None);
    assert_eq!(core.barrier(Some(me)), Ok(Barrier::Satisfied));
    core.bump(0).unwrap();
    assert_eq!(
        core.barrier(Some(me)),
        Ok(Barrier::Interrupted { generation: 1 }),
        "caller outdated: handle it first"
    );
    core.ack(me, 1).unwrap();
    assert_eq!(core.barrier(Some(me)), Ok(Barrier::Pending { outdated: 1 }));
    core.ack(t, 1).unwrap();
    assert_eq!(
        core.barrier(Some(me)),
        Ok(Barrier::Satisfied),
        "the untracked watcher {u:?} does not hold it up"
    );
    assert_eq!(core.barrier(None), Ok(Barrier::Satisfied));
}

#[test]
fn closing_an_outdated_watcher_releases_the_barrier() {
    let mut core = Core::new(0);
    let w = core.register(Tracking::Tracked, None);
    core.bump(0).unwrap();
    assert_eq!(core.barrier(None), Ok(Barrier::Pending { outdated: 1 }));
    assert_eq!(core.unregister(w), Ok(Tracking::Tracked));
    assert_eq!(core.barrier(None), Ok(Barrier::Satisfied));
    assert_eq!(core.counts().watchers, 0);
    assert_eq!(
        core.unregister(w),
        Err(CoreError::UnknownWatcher(w.index()))
    );
}

#[test]
fn reconnecting_watcher_with_old_ack_starts_outdated() {
    let mut core = Core::new(3);
    let stale = core.register(Tracking::Tracked, Some(2));
    let fresh = core.register(Tracking::Tracked, Some(3));
    assert_eq!(core.poll_read(stale), Ok(Some(3)));
    assert_eq!(core.poll_read(fresh), Ok(None));
    assert_eq!(core.counts().outdated, 1);
}

#[test]
fn a_claim_from_the_future_stays_outdated_until_acknowledged() {
    let mut core = Core::new(3);
    let liar = core.register(Tracking::Tracked, Some(5));
    assert_eq!(core.poll_read(liar), Ok(Some(3)));
    core.bump(5).unwrap();
    assert_eq!(
        core.poll_read(liar),
        Ok(Some(5)),
        "reaching the claim is not an ack"
    );
    core.ack(liar, 5).unwrap();
    assert_eq!(core.poll_read(liar), Ok(None));
}

#[test]
fn a_claim_from_the_future_does_not_hold_the_barrier_until_acknowledged() {
    let mut core = Core::new(3);
    let liar = core.register(Tracking::Tracked, Some(9));
    assert_eq!(core.poll_read(liar), Ok(Some(3)), "its client must renew");
    assert_eq!(core.barrier(None), Ok(Barrier::Satisfied));
    assert_eq!(
        core.barrier(Some(liar)),
        Ok(Barrier::Interrupted { generation: 3 }),
        "it is still outdated itself"
    );
    let c = core.counts();
    assert_eq!((c.tracked, c.outdated, c.outdated_untracked), (0, 0, 1));
    core.bump(0).unwrap();
    assert_eq!(
        core.barrier(None),
        Ok(Barrier::Satisfied),
        "nor after a bump"
    );
    assert_eq!(core.ack(liar, 4), Ok(true));
    let c = core.counts();
    assert_eq!((c.tracked, c.outdated, c.outdated_untracked), (1, 0, 0));
    core.bump(0).unwrap();
    assert_eq!(
        core.barrier(None),
        Ok(Barrier::Pending { outdated: 1 }),
        "once it acknowledged, it counts as the tracked watcher it asked to be"
    );
    assert_eq!(core.unregister(liar), Ok(Tracking::Tracked));
    assert_eq!(
        core.counts(),
        Counts {
            generation: 5,
            ..Counts::default()
        }
    );
}

#[test]
fn a_minimum_that_exhausts_the_counter_needs_explicit_permission() {
    let core = Core::new(7);
    let edge = u32::MAX - EXHAUSTION_RESERVE;
    assert_eq!(core.check_minimum(edge, false), Ok(()));
    assert_eq!(
        core.check_minimum(edge + 1, false),
        Err(CoreError::WouldExhaust {
            min: edge + 1,
            current: 7
        })
    );
    assert_eq!(
        core.check_minimum(u32::MAX, false),
        Err(CoreError::WouldExhaust {
            min: u32::MAX,
            current: 7
        })
    );
    assert_eq!(core.check_minimum(u32::MAX, true), Ok(()));
    // Deep in the reserve already: the next value is never refused.
    let core = Core::new(u32::MAX - 1);
    assert_eq!(core.check_minimum(0, false), Ok(()));
    assert_eq!(core.check_minimum(u32::MAX, false), Ok(()), "= current + 1");
    let core = Core::new(u32::MAX - 5);
    assert!(core.check_minimum(u32::MAX, false).is_err(), "a jump of 5");
}

#[test]
fn a_watcher_left_out_of_the_lifecycle_still_holds_the_barrier() {
    let mut core = Core::new(0);
    let trusted = core.register_for(Tracking::Tracked, None, true);
    let other = core.register_for(Tracking::Tracked, None, false);
    core.bump(0).unwrap();
    let c = core.counts();
    assert_eq!((c.tracked, c.tracked_lifecycle), (2, 1));
    assert_eq!((c.outdated, c.outdated_lifecycle), (2, 1));
    core.ack(trusted, 1).unwrap();
    assert_eq!(
        core.counts().outdated_lifecycle,
        0,
        "the lifecycle waits no more"
    );
    assert_eq!(
        core.barrier(None),
        Ok(Barrier::Pending { outdated: 1 }),
        "the barrier still waits for every tracked watcher"
    );
    core.unregister(other).unwrap();
    assert_eq!(core.barrier(None), Ok(Barrier::Satisfied));
}

#[test]
fn unknown_watcher_is_an_error_not_a_panic() {
    let core = Core::new(0);
    let mut other = Core::new(0);
    let w = other.register(Tracking::Tracked, None);
    assert_eq!(core.poll_read(w), Err(CoreError::UnknownWatcher(w.index())));
    assert!(core.barrier(Some(w)).is_err());
}

// ---------------------------------------------------------------------
// Property test: random operation sequences against a reference model.

#[derive(Debug, Clone)]
enum Op {
    Register {
        tracked: bool,
        acked: Option<u32>,
        lifecycle: bool,
    },
    Read(usize),
    Ack(usize, Option<u32>),
    Close(usize),
    Bump(u32),
    Barrier(Option<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            any::<bool>(),
            proptest::option::weighted(0.2, 0u32..12),
            any::<bool>()
        )
            .prop_map(|(tracked, acked, lifecycle)| Op::Register {
                tracked,
                acked,
                lifecycle
            }),
        (0usize..8).prop_map(Op::Read),
        (0usize..8, proptest::option::weighted(0.3, 0u32..12)).prop_map(|(i, g)| Op::Ack(i, g)),
        (0usize..8).prop_map(Op::Close),
        prop_oneof![
            Just(0u32),
            0u32..15,
            Just(u32::MAX - (1 << 20)),
            Just(u32::MAX - 1),
            Just(u32::MAX)
        ]
        .prop_map(Op::Bump),
        proptest::option::of(0usize..8).prop_map(Op::Barrier),
    ]
}

/// The reference: a list of (acked, tracked) with everything recomputed by
/// brute force on each question. A watcher that claimed the future counts
/// as untracked until it acknowledges.
#[derive(Default)]
struct Model {
    generation: u64,
    /// (acknowledged generation, or u64::MAX for "claimed the future";
    /// tracked; counts for the lifecycle)
    watchers: Vec<(u64, bool, bool)>,
}

fn counts_as_tracked(&(acked, tracked, _): &(u64, bool, bool)) -> bool {
    tracked && acked != u64::MAX
}

impl Model {
    fn outdated(&self, tracked: bool) -> u32 {
        self.watchers
            .iter()
            .filter(|w| counts_as_tracked(w) == tracked && w.0 != self.generation)
            .count() as u32
    }

    fn outdated_lifecycle(&self) -> u32 {
        self.watchers
            .iter()
            .filter(|w| counts_as_tracked(w) && w.2 && w.0 != self.generation)
            .count() as u32
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn core_matches_reference_model(start in prop_oneof![Just(0u32), 0u32..5, Just(u32::MAX - 3)],
                                    ops in proptest::collection::vec(op(), 1..80)) {
        let mut core = Core::new(start);
        let mut model = Model { generation: u64::from(start), ..Model::default() };
        let mut ids: Vec<WatcherId> = Vec::new();
        for op in ops {
            match op {
                Op::Register { tracked, acked, lifecycle } => {
                    let tracking = if tracked { Tracking::Tracked } else { Tracking::Untracked };
                    ids.push(core.register_for(tracking, acked, lifecycle));
                    let acked = match acked.map(u64::from) {
                        None => model.generation,
                        Some(a) if a <= model.generation => a,
                        Some(_) => u64::MAX,
                    };
                    model.watchers.push((acked, tracked, lifecycle));
                }
                Op::Read(i) if i < ids.len() => {
                    let expect = (model.watchers[i].0 != model.generation)
                        .then_some(model.generation as u32);
                    prop_assert_eq!(core.poll_read(ids[i]), Ok(expect));
                }
                Op::Ack(i, value) if i < ids.len() => {
                    let value = value.unwrap_or(model.generation as u32);
                    let result = core.ack(ids[i], value);
                    if u64::from(value) == model.generation {
                        let was_outdated = model.watchers[i].0 != model.generation;
                        prop_assert_eq!(result, Ok(was_outdated));
                        model.watchers[i].0 = u64::from(value);
                    } else {
                        prop_assert_eq!(result, Err(CoreError::WrongGeneration {
                            acked: value, current: model.generation as u32 }));
                    }
                }
                Op::Close(i) if i < ids.len() => {
                    let id = ids.remove(i);
                    let (_, tracked, _) = model.watchers.remove(i);
                    let expect = if tracked { Tracking::Tracked } else { Tracking::Untracked };
                    prop_assert_eq!(core.unregister(id), Ok(expect));
                }
                Op::Bump(min) => {
                    let exhausts = u64::from(min) > model.generation + 1
                        && u64::from(min) > u64::from(u32::MAX - EXHAUSTION_RESERVE);
                    let expect = if exhausts {
                        Err(CoreError::WouldExhaust { min, current: model.generation as u32 })
                    } else {
                        Ok(())
                    };
                    prop_assert_eq!(core.check_minimum(min, false), expect);
                    prop_assert_eq!(core.check_minimum(min, true), Ok(()));
                    let next = (model.generation + 1).max(u64::from(min));
                    let result = core.bump(min);
                    if next > u64::from(u32::MAX) {
                        prop_assert_eq!(result, Err(CoreError::Overflow { current: model.generation as u32 }));
                    } else {
                        prop_assert_eq!(result, Ok(next as u32));
                        model.generation = next;
                    }
                }
                Op::Barrier(caller) => {
                    let caller = caller.filter(|i| *i < ids.len());
                    let expect = match caller {
                        Some(i) if model.watchers[i].0 != model.generation =>
                            Barrier::Interrupted { generation: model.generation as u32 },
                        _ => match model.outdated(true) {
                            0 => Barrier::Satisfied,
                            outdated => Barrier::Pending { outdated },
                        },
                    };
                    prop_assert_eq!(core.barrier(caller.map(|i| ids[i])), Ok(expect));
                }
                _ => {}
            }
            let counts = core.counts();
            prop_assert_eq!(u64::from(counts.generation), model.generation);
            prop_assert_eq!(counts.watchers as usize, model.watchers.len());
            prop_assert_eq!(counts.tracked as usize, model.watchers.iter().filter(|w| counts_as_tracked(w)).count());
            prop_assert_eq!(counts.outdated, model.outdated(true));
            prop_assert_eq!(counts.outdated_untracked, model.outdated(false));
            prop_assert_eq!(counts.tracked_lifecycle as usize,
                model.watchers.iter().filter(|w| counts_as_tracked(w) && w.2).count());
            prop_assert_eq!(counts.outdated_lifecycle, model.outdated_lifecycle());
        }
    }
}
