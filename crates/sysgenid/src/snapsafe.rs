//! Values that must not survive a restore: [`SnapSafe<T>`] holds a value
//! built by a closure and rebuilds it, on the next access, when the system
//! generation differs from the one it was built under. This is the seed's
//! example 3 ("cached secret") as a type, with AWS-LC's cost model: every
//! access is one load of the mapped generation page and one compare; only an
//! access after a change does more.
//!
//! The page is mapped once per process and runtime directory
//! ([`Probe::shared`]) and stays mapped for the life of the process, so the
//! fast path holds a plain `&'static AtomicU32` and dereferences nothing
//! else to find it.
//!
//! # What it promises across threads
//! `SnapSafe<T>` is `Sync` when `T` is `Send + Sync`: any number of threads
//! may call [`get`](SnapSafe::get) on one shared value.
//! * **Never stale after the page moved.** A `get` that begins after the
//!   page shows generation *g* returns a value whose build *started* after
//!   the page showed *g* or later. The generation is read before the build
//!   begins, so a change that lands while a value is being built makes the
//!   next `get` build again.
//! * **Possibly built twice.** When several threads notice the same change
//!   at once, each of them may run the closure; every one of them returns a
//!   value built under the new generation, and the last one published is
//!   what later calls see. The closure must therefore be safe to run more
//!   than once, concurrently (each run must produce a value that is fine to
//!   use on its own: a fresh key, a fresh seed).
//! * **References stay valid, not current.** The `&T` that `get` returns is
//!   the value at the time of the call; it stays valid for as long as the
//!   borrow of the `SnapSafe`, even if another thread replaces it. Call
//!   `get` at each use instead of keeping the reference across work that may
//!   span a restore. Replaced values are dropped at [`get_mut`](SnapSafe::get_mut)
//!   or when the `SnapSafe` is dropped (one value per observed change, so
//!   the count is bounded by the number of restores).
//!
//! # What it does not promise
//! * It is as current as the page. Between the restore itself and the
//!   daemon's bump (the kernel's record reaching `sysgenidd`, normally well
//!   under a millisecond) the page still holds the old generation, and so
//!   does every check; this is the window the seed's review thread points
//!   out, and no userspace check can close it. Code that must not emit
//!   anything in that window needs the restore to be orchestrated (freeze
//!   before the snapshot) rather than detected.
//! * It does not acknowledge the generation to the daemon: a `SnapSafe` is
//!   not a watcher and never holds up `wait_watchers`. Use a [`Watcher`](crate::Watcher)
//!   for that.
//! * `fork(2)` is not a restore: a child shares its parent's value until the
//!   generation next moves.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::{default_runtime_dir, Error, Probe};

/// Probes mapped by [`Probe::shared`], one per runtime directory. Leaked on
/// purpose: a mapping is a few bytes of bookkeeping and one page of address
/// space, and `'static` is what lets the fast path skip any indirection.
static SHARED_PROBES: Mutex<Vec<(PathBuf, &'static Probe)>> = Mutex::new(Vec::new());

impl Probe {
    /// The process-wide probe for `runtime_dir` (`None`: the default), mapped
    /// on first use and kept for the life of the process. Later calls with
    /// the same directory return the same mapping. A failure is not
    /// remembered: the next call tries again (the daemon may have started).
    pub fn shared(runtime_dir: Option<&Path>) -> Result<&'static Probe, Error> {
        let dir = runtime_dir.map_or_else(default_runtime_dir, Path::to_path_buf);
        // A panic while holding this lock leaves the list consistent (a push
        // is the only mutation), so a poisoned lock is still usable.
        let mut probes = SHARED_PROBES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, probe)) = probes.iter().find(|(d, _)| *d == dir) {
            return Ok(probe);
        }
        let probe: &'static Probe = Box::leak(Box::new(Probe::open(Some(&dir))?));
        probes.push((dir, probe));
        Ok(probe)
    }
}

/// A value and the generation it was built under.
struct Built<T> {
    generation: u32,
    value: T,
}

/// A value rebuilt on first access after every change of the system
/// generation (see the module docs for the exact promises).
///
/// ```no_run
/// use sysgenid::SnapSafe;
///
/// // A session key that no two clones of a snapshot ever share.
/// let key = SnapSafe::new(|| {
///     let mut k = [0u8; 32];
///     std::fs::File::open("/dev/urandom")
///         .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
///         .expect("urandom");
///     k
/// })?;
/// let k: &[u8; 32] = key.get(); // one load and one compare, unless restored
/// # let _ = k;
/// # Ok::<(), sysgenid::Error>(())
/// ```
pub struct SnapSafe<T, F = Box<dyn Fn() -> T + Send + Sync>> {
    /// The page's generation word, mapped for the life of the process.
    word: &'static AtomicU32,
    /// The newest value; never null. Owned by this `SnapSafe`.
    current: AtomicPtr<Built<T>>,
    /// Values replaced by a rebuild, kept until no `&T` into them can exist
    /// (`get_mut` or drop).
    retired: Mutex<Vec<Box<Built<T>>>>,
    build: F,
}

impl<T> SnapSafe<T> {
    /// Builds the value now, under the current generation of the default
    /// runtime directory's daemon. Fails if its page cannot be mapped
    /// ([`Error::NotRunning`]): without the page no restore can be seen.
    pub fn new(build: impl Fn() -> T + Send + Sync + 'static) -> Result<SnapSafe<T>, Error> {
        Ok(SnapSafe::with_probe(Probe::shared(None)?, Box::new(build)))
    }
}

impl<T, F: Fn() -> T> SnapSafe<T, F> {
    /// Builds the value now, watching `probe`'s page (for a daemon on
    /// another runtime directory: `Probe::shared(Some(dir))?`). The closure
    /// type is kept, so no allocation or dynamic call is involved.
    pub fn with_probe(probe: &'static Probe, build: F) -> SnapSafe<T, F> {
        let word = probe.generation_word();
        let first = Self::build_now(word, &build);
        SnapSafe {
            word,
            current: AtomicPtr::new(Box::into_raw(first)),
            retired: Mutex::new(Vec::new()),
            build,
        }
    }

    /// Reads the generation *before* building, so a change during the build
    /// leaves the value marked with the older generation and it is built
    /// again on the next access.
    fn build_now(word: &AtomicU32, build: &F) -> Box<Built<T>> {
        // Acquire pairs with the daemon's Release store of the generation
        // (sysgenid-page): state the daemon published with it is visible.
        let generation = word.load(Ordering::Acquire);
        Box::new(Built {
            generation,
            value: build(),
        })
    }

    /// The value, rebuilt first if the generation moved since it was built.
    /// Fast path: one load of the page, one load of the current value's
    /// generation, one compare.
    #[inline]
    pub fn get(&self) -> &T {
        let generation = self.word.load(Ordering::Acquire);
        // Acquire pairs with the Release in `rebuild`: the value behind the
        // pointer is fully built.
        let current = self.current.load(Ordering::Acquire);
        // SAFETY: `current` is never null and points to a `Built<T>` owned
        // by `self`: either still current or moved to `retired`, which is
        // only emptied through `&mut self` (`get_mut`, drop), so it lives at
        // least as long as the `&self` borrow the result is tied to.
        let built = unsafe { &*current };
        if built.generation == generation {
            &built.value
        } else {
            self.rebuild()
        }
    }

    #[cold]
    #[inline(never)]
    fn rebuild(&self) -> &T {
        let fresh = Box::into_raw(Self::build_now(self.word, &self.build));
        let old = self.current.swap(fresh, Ordering::AcqRel);
        // SAFETY: `old` came from `Box::into_raw` (construction or an
        // earlier rebuild) and the swap removed the only owning pointer to
        // it, so re-boxing it transfers that ownership to `retired`.
        let old = unsafe { Box::from_raw(old) };
        self.retired
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(old);
        // SAFETY: `fresh` is owned by `self` from now on (current or, after
        // a later rebuild, retired) and retired values outlive `&self`.
        unsafe { &(*fresh).value }
    }

    /// Exclusive access: rebuilds if the generation moved, and drops the
    /// values earlier rebuilds replaced (no reference into them can exist
    /// while `self` is borrowed mutably).
    pub fn get_mut(&mut self) -> &mut T {
        self.retired
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        let generation = self.word.load(Ordering::Acquire);
        let current = *self.current.get_mut();
        // SAFETY: never null, owned by `self`, and `&mut self` excludes
        // every other access.
        if unsafe { (*current).generation } != generation {
            let fresh = Box::into_raw(Self::build_now(self.word, &self.build));
            *self.current.get_mut() = fresh;
            // SAFETY: `current` came from `Box::into_raw` and nothing else
            // points to it any more.
            drop(unsafe { Box::from_raw(current) });
        }
        // SAFETY: as above; the borrow is tied to `&mut self`.
        unsafe { &mut (**self.current.get_mut()).value }
    }

    /// The generation the current value was built under.
    pub fn built_generation(&self) -> u32 {
        // SAFETY: as in `get`.
        unsafe { (*self.current.load(Ordering::Acquire)).generation }
    }
}

impl<T, F> Drop for SnapSafe<T, F> {
    fn drop(&mut self) {
        // SAFETY: `current` came from `Box::into_raw` and is owned by `self`,
        // which nobody else can reach any more.
        drop(unsafe { Box::from_raw(*self.current.get_mut()) });
    }
}

// SAFETY: a `SnapSafe` owns its values (through raw pointers); moving it to
// another thread moves them, which needs `T: Send`, and the closure moves
// with it.
unsafe impl<T: Send, F: Send> Send for SnapSafe<T, F> {}
// SAFETY: shared access hands out `&T` to several threads (`T: Sync`), and
// any thread may build a value that another thread later drops (`T: Send`)
// or call the closure (`F: Sync`). The pointer itself is an atomic.
unsafe impl<T: Send + Sync, F: Sync> Sync for SnapSafe<T, F> {}

impl<T: fmt::Debug, F> fmt::Debug for SnapSafe<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: as in `get`.
        let built = unsafe { &*self.current.load(Ordering::Acquire) };
        f.debug_struct("SnapSafe")
            .field("generation", &built.generation)
            .field("value", &built.value)
            .finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use sysgenid_page::{PageRecord, PageWriter};

    /// A page written the way the daemon writes it, in a private directory,
    /// and the process-wide probe over it.
    pub(crate) fn page(generation: u32) -> (tempfile::TempDir, PageWriter, &'static Probe) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(sysgenid_proto::PAGE_NAME);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        let mut writer = PageWriter::new(file, &path).unwrap();
        writer.publish(&PageRecord {
            generation,
            ..PageRecord::default()
        });
        let probe = Probe::shared(Some(dir.path())).unwrap();
        (dir, writer, probe)
    }

    pub(crate) fn bump(writer: &mut PageWriter, generation: u32) {
        writer.publish(&PageRecord {
            generation,
            ..PageRecord::default()
        });
    }

    #[test]
    fn shared_probes_are_one_mapping_per_directory() {
        let (dir, _w, probe) = page(3);
        let again = Probe::shared(Some(dir.path())).unwrap();
        assert!(std::ptr::eq(probe, again));
        let missing = dir.path().join("nothing-here");
        assert!(matches!(
            Probe::shared(Some(&missing)),
            Err(Error::NotRunning { .. })
        ));
    }

    #[test]
    fn the_value_is_built_once_per_generation() {
        let (_dir, mut w, probe) = page(5);
        let builds = Arc::new(AtomicUsize::new(0));
        let counter = builds.clone();
        let value = SnapSafe::with_probe(probe, move || counter.fetch_add(1, Ordering::SeqCst));
        assert_eq!((*value.get(), *value.get()), (0, 0));
        assert_eq!(value.built_generation(), 5);
        bump(&mut w, 6);
        assert_eq!(
            *value.get(),
            1,
            "rebuilt on the first access after the move"
        );
        assert_eq!(*value.get(), 1);
        assert_eq!(value.built_generation(), 6);
        assert_eq!(builds.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn get_mut_rebuilds_and_frees_replaced_values() {
        let (_dir, mut w, probe) = page(1);
        let live = Arc::new(AtomicUsize::new(0));
        struct Counted(Arc<AtomicUsize>);
        impl Drop for Counted {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let l = live.clone();
        let mut value = SnapSafe::with_probe(probe, move || {
            l.fetch_add(1, Ordering::SeqCst);
            Counted(l.clone())
        });
        for g in 2..5 {
            bump(&mut w, g);
            value.get();
        }
        assert_eq!(
            live.load(Ordering::SeqCst),
            4,
            "replaced values kept for &T"
        );
        value.get_mut();
        assert_eq!(live.load(Ordering::SeqCst), 1, "get_mut frees them");
        bump(&mut w, 9);
        value.get_mut();
        assert_eq!(value.built_generation(), 9);
        assert_eq!(live.load(Ordering::SeqCst), 1);
        drop(value);
        assert_eq!(live.load(Ordering::SeqCst), 0, "drop frees the last one");
    }

    #[test]
    fn no_thread_sees_a_value_older_than_the_page_it_read_first() {
        let (_dir, mut w, probe) = page(0);
        // The value records the generation the page showed when it was built.
        let value = SnapSafe::with_probe(probe, || probe.generation());
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    while !stop.load(Ordering::Relaxed) {
                        let before = probe.generation();
                        let built = *value.get();
                        assert!(
                            built >= before,
                            "stale: built under {built}, page showed {before}"
                        );
                    }
                });
            }
            for g in 1..=20_000 {
                bump(&mut w, g);
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert_eq!(*value.get(), 20_000);
    }
}
