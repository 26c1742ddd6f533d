//! A random number generator that is safe to snapshot (feature
//! `rand_core`): [`SnapSafeRng`] wraps any [`SeedableRng`] and, when the
//! system generation moves, throws its state away and reseeds it from the
//! operating system before the next draw. Otherwise each call costs one
//! load of the mapped generation page and one compare on top of the wrapped
//! generator.
//!
//! Why: a userspace generator's state is memory, and a snapshot copies
//! memory. Every clone restored from one snapshot would otherwise continue
//! the same stream, handing out the same nonces, session ids and keys.
//!
//! # Promises
//! * **The first draw after a restore is from fresh OS entropy.** The check
//!   runs at the start of every `try_next_u32`, `try_next_u64` and
//!   `try_fill_bytes`; when the page shows a generation other than the one
//!   the state was seeded under, a new seed is read with `getrandom(2)`
//!   (which the kernel itself reseeds on a VM fork) and the wrapped
//!   generator is rebuilt with [`SeedableRng::from_seed`] before anything
//!   is drawn. Two clones therefore diverge from their first draw after the
//!   bump.
//! * Until the generation moves, the wrapped generator runs untouched: a
//!   `SnapSafeRng` made from a seeded generator gives that generator's exact
//!   stream (reproducible tests keep working).
//! * If the OS cannot deliver entropy (`getrandom(2)` fails only for
//!   invalid arguments on Linux), the call panics rather than continue a
//!   stream that a clone shares.
//!
//! # Limits
//! It is as current as the page: in the short window between the restore
//! and the daemon's bump a draw still continues the old stream (see
//! [`SnapSafe`](crate::SnapSafe)'s module docs). `fork(2)` is not a
//! restore: a forked child continues its parent's stream until the
//! generation moves. A `SnapSafeRng` is used through `&mut self`, one
//! thread at a time, like the generator it wraps.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use rand_core::{SeedableRng, TryCryptoRng, TryRng};

use crate::{Error, Probe};

/// A generator reseeded from the OS whenever the system generation moves
/// (see the module docs).
///
/// ```no_run
/// use rand::{rngs::StdRng, RngExt};
/// use sysgenid::SnapSafeRng;
///
/// // One line: a ChaCha generator seeded from the OS, reseeded after restores.
/// let mut rng = SnapSafeRng::<StdRng>::from_os()?;
/// let nonce: u64 = rng.random();
///
/// // Or wrap a generator you already have; its stream is unchanged until
/// // the generation moves.
/// let mut seeded = SnapSafeRng::new(<StdRng as rand::SeedableRng>::seed_from_u64(7))?;
/// let roll = seeded.random_range(1..=6u8);
/// # let _ = (nonce, roll);
/// # Ok::<(), sysgenid::Error>(())
/// ```
pub struct SnapSafeRng<R> {
    rng: R,
    /// The generation `rng` was seeded under.
    seeded_under: u32,
    /// The page's generation word, mapped for the life of the process.
    word: &'static AtomicU32,
}

impl<R: SeedableRng> SnapSafeRng<R> {
    /// Wraps `rng`, watching the default runtime directory's page. `rng`
    /// keeps its state until the generation moves.
    pub fn new(rng: R) -> Result<SnapSafeRng<R>, Error> {
        Ok(SnapSafeRng::with_probe(Probe::shared(None)?, rng))
    }

    /// Wraps `rng`, watching the page in `runtime_dir`.
    pub fn in_runtime_dir(runtime_dir: &Path, rng: R) -> Result<SnapSafeRng<R>, Error> {
        Ok(SnapSafeRng::with_probe(
            Probe::shared(Some(runtime_dir))?,
            rng,
        ))
    }

    /// A generator seeded from the OS now, watching the default page.
    pub fn from_os() -> Result<SnapSafeRng<R>, Error> {
        SnapSafeRng::new(os_seeded())
    }

    /// Wraps `rng`, watching `probe`'s page.
    pub fn with_probe(probe: &'static Probe, rng: R) -> SnapSafeRng<R> {
        let word = probe.generation_word();
        SnapSafeRng {
            rng,
            // Acquire pairs with the daemon's Release store of the page.
            seeded_under: word.load(Ordering::Acquire),
            word,
        }
    }

    /// The generation the current state was seeded under (or wrapped at).
    pub fn seeded_under(&self) -> u32 {
        self.seeded_under
    }

    /// The wrapped generator, reseeded first if the generation moved.
    pub fn inner(&mut self) -> &mut R {
        self.check();
        &mut self.rng
    }

    /// The one load and compare every draw pays.
    #[inline]
    fn check(&mut self) {
        let generation = self.word.load(Ordering::Acquire);
        if generation != self.seeded_under {
            self.reseed(generation);
        }
    }

    #[cold]
    #[inline(never)]
    fn reseed(&mut self, generation: u32) {
        self.rng = os_seeded();
        self.seeded_under = generation;
    }
}

/// A generator seeded with `getrandom(2)`.
fn os_seeded<R: SeedableRng>() -> R {
    let mut seed = R::Seed::default();
    if let Err(e) = getrandom::fill(seed.as_mut()) {
        // Continuing would hand a clone the same stream as its siblings.
        panic!("sysgenid: cannot reseed after a generation change: getrandom failed: {e}");
    }
    R::from_seed(seed)
}

impl<R: SeedableRng + TryRng> TryRng for SnapSafeRng<R> {
    type Error = R::Error;

    #[inline]
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        self.check();
        self.rng.try_next_u32()
    }

    #[inline]
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        self.check();
        self.rng.try_next_u64()
    }

    #[inline]
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.check();
        self.rng.try_fill_bytes(dst)
    }
}

/// Reseeding keeps a cryptographic generator cryptographic: the new seed is
/// the OS's.
impl<R: SeedableRng + TryCryptoRng> TryCryptoRng for SnapSafeRng<R> {}

impl<R> std::fmt::Debug for SnapSafeRng<R> {
    /// Never prints the generator's state.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapSafeRng")
            .field("seeded_under", &self.seeded_under)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapsafe::tests::{bump, page};
    use rand::rngs::SmallRng;
    use rand_core::Rng;

    #[test]
    fn the_wrapped_stream_is_untouched_until_the_generation_moves() {
        let (_dir, mut w, probe) = page(2);
        let mut bare = SmallRng::seed_from_u64(7);
        let mut wrapped = SnapSafeRng::with_probe(probe, SmallRng::seed_from_u64(7));
        for _ in 0..100 {
            assert_eq!(wrapped.next_u64(), bare.next_u64());
        }
        bump(&mut w, 3);
        // A clone would have drawn `bare`'s next value: the reseeded stream
        // must not (a 2^-64 chance per draw of a false failure).
        let after: Vec<u64> = (0..4).map(|_| wrapped.next_u64()).collect();
        let clone: Vec<u64> = (0..4).map(|_| bare.next_u64()).collect();
        assert_ne!(after[0], clone[0]);
        assert_ne!(after, clone);
        assert_eq!(wrapped.seeded_under(), 3);
    }

    #[test]
    fn every_entry_point_checks_the_generation() {
        let (_dir, mut w, probe) = page(10);
        let mut wrapped = SnapSafeRng::with_probe(probe, SmallRng::seed_from_u64(1));
        let mut g = 10;
        let mut step = |wrapped: &mut SnapSafeRng<SmallRng>,
                        draw: &dyn Fn(&mut SnapSafeRng<SmallRng>)| {
            g += 1;
            bump(&mut w, g);
            draw(wrapped);
            assert_eq!(wrapped.seeded_under(), g);
        };
        step(&mut wrapped, &|r| {
            r.next_u32();
        });
        step(&mut wrapped, &|r| {
            r.next_u64();
        });
        step(&mut wrapped, &|r| r.fill_bytes(&mut [0u8; 3]));
        step(&mut wrapped, &|r| {
            r.inner();
        });
    }
}
