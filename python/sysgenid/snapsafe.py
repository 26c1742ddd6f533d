"""Snapshot safety for Python's own state: reseed :mod:`random` (and
anything registered) when the system generation moves, checked on use.

Why: :mod:`random` is seeded once, at import. A VM or container restored
from one snapshot, once or as many clones, resumes with the same Mersenne
Twister state in every copy, so every copy draws the same "random" numbers,
shuffles, tokens made with ``random``, and ``uuid.uuid1()`` clock
sequences.

Usage, once, early in the program (before other modules copy functions out
of :mod:`random` with ``from random import ...``)::

    import sysgenid.snapsafe
    sysgenid.snapsafe.install()          # maps the page; raises if no daemon

    sysgenid.snapsafe.register(lambda generation: my_pool.clear())

The cost model is AWS-LC's: every draw from the module-level :mod:`random`
functions first reads the mapped generation page (one memory read) and
compares it with the generation the state was seeded under. Only when it
moved is anything else done: :mod:`random` is reseeded with 32 bytes from
``os.urandom`` (the kernel reseeds itself on a VM fork) and each registered
callback is called with the new generation, before the draw that noticed
it. :func:`check` runs the same check by hand, for code that wants its
callbacks run without drawing a number.

What it covers:

* the module-level functions of :mod:`random` (``random.random``,
  ``randint``, ``choice``, ``shuffle``, ``sample``, ``getrandbits``,
  ``randbytes``, ``gauss``, ...): they are rebound to a
  :class:`SnapSafeRandom` that continues the existing stream (the same
  seed gives the same numbers) until the generation moves;
* ``uuid.uuid1()`` clock sequences: :func:`install` makes :mod:`uuid` use
  its pure-Python ``uuid1``, which draws a fresh clock sequence from
  :mod:`random` for each UUID, instead of libuuid's, whose process-wide
  state a clone would share;
* whatever you :func:`register` (a numpy ``Generator``, a connection pool,
  a cached token), and values built with :class:`SnapSafe`.

What it need not cover: :mod:`secrets`, ``random.SystemRandom`` and
``os.urandom`` read the kernel's generator on every call, and the kernel
reseeds it on a VM fork, so they are already safe. What it cannot cover:
separate ``random.Random()`` instances you made yourself (register a
callback that reseeds them, or make them :class:`SnapSafeRandom`), and
functions copied out of :mod:`random` before :func:`install` ran.

Limits: it is as current as the page: between the restore and the daemon's
bump (normally well under a millisecond) a draw still continues the old
stream. ``os.fork`` is not a restore, but the standard library already
reseeds :mod:`random` in a forked child, and :func:`install` keeps that
for its own generator. Under threads two callers may
both notice one change; the reseed then happens twice, which is harmless,
and each callback may run more than once per change.
"""

import os
import random as _random
import threading

from ._page import Probe

__all__ = [
    "SnapSafe",
    "SnapSafeRandom",
    "check",
    "generation",
    "install",
    "installed",
    "register",
    "unregister",
]

_lock = threading.Lock()
_probe = None
_words = None
_seen = None
_callbacks = []
_random_instance = None


_base_random = _random.Random.random
_base_getrandbits = _random.Random.getrandbits
_base_randbytes = _random.Random.randbytes
_base_seed = _random.Random.seed


class SnapSafeRandom(_random.Random):
    """A :class:`random.Random` that reseeds itself from ``os.urandom``
    when the system generation moves, checked on every draw. Needs
    :func:`install` (which maps the page) first; until the generation moves
    its stream is that of an ordinary ``Random`` with the same seed."""

    def __init__(self, x=None):
        # Random.__init__ calls seed(), which records the generation.
        super().__init__(x)

    # The draws: one read of the page and one compare, then the C method
    # itself (called through the base class's descriptor: no super()).

    def random(self):
        if _words is None or _words[0] != self._seeded_under:
            self._renew()
        return _base_random(self)

    def getrandbits(self, k):
        if _words is None or _words[0] != self._seeded_under:
            self._renew()
        return _base_getrandbits(self, k)

    def randbytes(self, n):
        if _words is None or _words[0] != self._seeded_under:
            self._renew()
        return _base_randbytes(self, n)

    def _renew(self):
        if _words is None:
            raise RuntimeError("sysgenid.snapsafe.install() has not been called")
        g = _words[0]
        if self is _random_instance:
            # The module's generator: run the registered callbacks too.
            _changed(g)
        else:
            self._reseed(g)

    def _reseed(self, g):
        _base_seed(self, int.from_bytes(os.urandom(32), "little"))
        self._seeded_under = g

    def seed(self, a=None, version=2):
        """Seeds as :meth:`random.Random.seed` does; the state then counts
        as seeded under the current generation."""
        super().seed(a, version)
        self._seeded_under = _words[0] if _words is not None else None

    def setstate(self, state):
        super().setstate(state)
        self._seeded_under = _words[0] if _words is not None else None


def _changed(g):
    """The generation moved to ``g``: reseed :mod:`random`, run the
    callbacks (each once per change it is called for)."""
    global _seen
    with _lock:
        if _random_instance is not None and _random_instance._seeded_under != g:
            _random_instance._reseed(g)
        first = _seen != g
        _seen = g
        callbacks = list(_callbacks) if first else []
    for callback in callbacks:
        callback(g)


def check():
    """Runs the check by hand: if the generation moved since the last
    check, reseed :mod:`random` and run the registered callbacks. Returns
    the current generation. One memory read when nothing moved."""
    if _words is None:
        raise RuntimeError("sysgenid.snapsafe.install() has not been called")
    g = _words[0]
    if g != _seen:
        _changed(g)
    return g


def generation():
    """The current generation (one read of the page)."""
    if _words is None:
        raise RuntimeError("sysgenid.snapsafe.install() has not been called")
    return _words[0]


def register(callback):
    """Calls ``callback(generation)`` at the first check after each change
    (a draw from :mod:`random`, :func:`check`, or a :class:`SnapSafe`
    access). Returns ``callback``, so it works as a decorator."""
    with _lock:
        _callbacks.append(callback)
    return callback


def unregister(callback):
    """Removes a callback registered with :func:`register`."""
    with _lock:
        _callbacks.remove(callback)


# Names in the random module that are bound methods of its hidden instance.
_RANDOM_FUNCTIONS = (
    "betavariate", "binomialvariate", "choice", "choices", "expovariate",
    "gammavariate", "gauss", "getrandbits", "getstate", "lognormvariate",
    "normalvariate", "paretovariate", "randbytes", "randint", "random",
    "randrange", "sample", "seed", "setstate", "shuffle", "triangular",
    "uniform", "vonmisesvariate", "weibullvariate",
)  # fmt: skip


def install(runtime_dir=None):
    """Maps the daemon's page (``runtime_dir`` defaults to
    :func:`sysgenid.default_runtime_dir`) and makes :mod:`random` and
    ``uuid.uuid1`` snapshot-safe (see the module docs). Idempotent; raises
    :class:`sysgenid.NotRunning` or :class:`sysgenid.Untrusted` if the page
    cannot be used, and then changes nothing."""
    global _probe, _words, _seen, _random_instance
    with _lock:
        if _probe is not None:
            return
        probe = Probe(runtime_dir)
        _probe, _words = probe, probe._u32
        _seen = _words[0]
        inst = SnapSafeRandom()
        # Continue the module's current stream until the generation moves.
        inst.setstate(_random._inst.getstate())
        for name in _RANDOM_FUNCTIONS:
            if hasattr(_random, name) and hasattr(inst, name):
                setattr(_random, name, getattr(inst, name))
        _random._inst = inst
        _random_instance = inst
        # The standard library reseeds its generator in a forked child
        # (`random` registers this at import); keep that for ours.
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=inst.seed)
    import uuid

    # libuuid keeps its own clock sequence, which clones would share; the
    # pure-Python uuid1 draws one from `random` for every UUID.
    if getattr(uuid, "_generate_time_safe", None) is not None:
        uuid._generate_time_safe = None


def installed():
    """Whether :func:`install` has run in this process."""
    return _probe is not None


class SnapSafe:
    """A value built by ``build()`` and rebuilt on the first :meth:`get`
    after the generation moved (the Rust ``SnapSafe<T>``): one read of the
    page per :meth:`get`. The generation is read before ``build`` runs, so
    a change during the build leads to another build at the next access.
    Under threads the value may be built twice for one change; every
    :meth:`get` after a change returns a value built after it. A
    :meth:`get` also runs the module's check (reseed, callbacks) when it
    notices a change. Needs :func:`install`."""

    def __init__(self, build):
        if _words is None:
            raise RuntimeError("sysgenid.snapsafe.install() has not been called")
        self._build = build
        self._state = self._make()

    def _make(self):
        g = _words[0]
        return (g, self._build())

    def get(self):
        state = self._state
        if _words[0] == state[0]:
            return state[1]
        check()
        self._state = state = self._make()
        return state[1]

    @property
    def built_generation(self):
        return self._state[0]
