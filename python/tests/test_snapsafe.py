"""sysgenid.snapsafe: random, uuid1 and registered callbacks renewed after a
bump, checked on use; across os.fork, as clones of one snapshot would be.

snapsafe installs itself process-wide, so each test runs in a fresh
interpreter."""

import os
import textwrap

from conftest import run_python


def run_snapsafe(daemon, body):
    code = "import os, random, uuid, sysgenid, sysgenid.snapsafe as snapsafe\n"
    code += "snapsafe.install(%r)\n" % daemon.dir
    code += "def bump(m=0): return sysgenid.trigger_update(m, runtime_dir=%r)\n" % daemon.dir
    code += textwrap.dedent(body)
    r = run_python(code)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_random_continues_its_stream_until_a_bump_then_is_reseeded(daemon):
    out = run_snapsafe(daemon, """
        random.seed(1234)
        reference = random.Random(1234)
        same = [random.random() for _ in range(3)] == [reference.random() for _ in range(3)]
        same_bits = random.getrandbits(64) == reference.getrandbits(64)
        bump()
        after = [random.random(), random.randint(0, 10**9), random.getrandbits(64)]
        clone = [reference.random(), reference.randint(0, 10**9), reference.getrandbits(64)]
        print(same, same_bits, after != clone, random.random == random._inst.random)
    """)
    assert out.split() == ["True", "True", "True", "True"]


def test_every_module_function_checks_first(daemon):
    out = run_snapsafe(daemon, """
        import random as r
        calls = {
            "random": lambda: r.random(), "uniform": lambda: r.uniform(0, 1),
            "randint": lambda: r.randint(0, 9), "randrange": lambda: r.randrange(10),
            "choice": lambda: r.choice("abc"), "choices": lambda: r.choices("abc", k=2),
            "shuffle": lambda: r.shuffle([1, 2, 3]), "sample": lambda: r.sample(range(9), 2),
            "getrandbits": lambda: r.getrandbits(8), "randbytes": lambda: r.randbytes(4),
            "gauss": lambda: r.gauss(0, 1), "normalvariate": lambda: r.normalvariate(0, 1),
            "expovariate": lambda: r.expovariate(1), "triangular": lambda: r.triangular(),
        }
        missed = []
        for name, call in calls.items():
            g = bump()
            call()
            if r._inst._seeded_under != g:
                missed.append(name)
        print("missed:", missed)
    """)
    assert out.strip() == "missed: []"


def test_callbacks_run_once_per_change_at_the_next_check(daemon):
    out = run_snapsafe(daemon, """
        seen = []
        snapsafe.register(seen.append)
        random.random()
        print("none", seen)
        g = bump()
        print("before use", seen)
        random.random(); random.random(); snapsafe.check()
        print("after use", seen, g)
        bump(); bump()
        print("check", snapsafe.check(), seen)
        snapsafe.unregister(seen.append)
        bump(); snapsafe.check()
        print("unregistered", seen)
    """)
    assert out.splitlines() == [
        "none []",
        "before use []",
        "after use [1] 1",
        "check 3 [1, 3]",
        "unregistered [1, 3]",
    ]


def test_a_snapsafe_value_is_rebuilt_after_a_bump(daemon):
    out = run_snapsafe(daemon, """
        builds = []
        token = snapsafe.SnapSafe(lambda: builds.append(1) or os.urandom(16))
        a, b = token.get(), token.get()
        bump()
        c = token.get()
        print(a == b, c != a, len(builds), token.built_generation)
    """)
    assert out.split() == ["True", "True", "2", "1"]


# A clone restored from a snapshot holds its parent's memory exactly; a
# forked child would not (the standard library reseeds `random` in it), so
# the child puts the pre-fork state back to be a faithful clone.
FORK_AND_BUMP = """
    r, w = os.pipe()
    go_r, go_w = os.pipe()
    state = random.getstate()
    pid = os.fork()
    if pid == 0:
        random.setstate(state)
    before = DRAW()
    if pid == 0:
        os.write(w, (repr(before) + "\\n").encode())
        os.read(go_r, 1)                   # the parent has bumped
        os.write(w, (repr(DRAW()) + "\\n").encode())
        os._exit(0)
    lines = os.fdopen(r).readline
    child_before = lines().strip()
    bump()
    os.write(go_w, b"x")
    parent_after = DRAW()
    child_after = lines().strip()
    os.waitpid(pid, 0)
    print(repr(before) == child_before, repr(parent_after) != child_after)
"""


def test_random_diverges_across_a_fork_after_a_bump(daemon):
    body = "random.seed(99)\nDRAW = lambda: [random.random() for _ in range(4)]\n"
    out = run_snapsafe(daemon, body + textwrap.dedent(FORK_AND_BUMP))
    # Same draws before the bump (clones of one state), different after.
    assert out.split() == ["True", "True"]


def test_uuid1_clock_sequences_diverge_across_a_fork_after_a_bump(daemon):
    body = (
        "random.seed(7)\n"
        "DRAW = lambda: [uuid.uuid1().clock_seq for _ in range(4)]\n"
    )
    out = run_snapsafe(daemon, body + textwrap.dedent(FORK_AND_BUMP))
    assert out.split() == ["True", "True"]


def test_without_snapsafe_the_clones_draw_the_same(daemon):
    """The control experiment: the divergence above is snapsafe's doing."""
    code = "import os, random, sysgenid\n"
    code += "def bump(m=0): return sysgenid.trigger_update(m, runtime_dir=%r)\n" % daemon.dir
    code += "random.seed(99)\nDRAW = lambda: [random.random() for _ in range(4)]\n"
    r = run_python(code + textwrap.dedent(FORK_AND_BUMP))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "False"]


def test_a_plain_fork_still_reseeds_random_in_the_child(daemon):
    """The standard library's own fork protection is kept."""
    out = run_snapsafe(daemon, """
        random.seed(5)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, repr(random.random()).encode())
            os._exit(0)
        mine = repr(random.random())
        os.waitpid(pid, 0)
        print(os.read(r, 100).decode() != mine)
    """)
    assert out.split() == ["True"]


def test_install_fails_cleanly_without_a_daemon(tmp_path):
    r = run_python(textwrap.dedent("""
        import random, sysgenid, sysgenid.snapsafe as snapsafe
        before = random.random
        try:
            snapsafe.install(%r)
        except sysgenid.NotRunning as e:
            print("not running", random.random is before, snapsafe.installed())
    """ % str(tmp_path)))
    assert r.stdout.split() == ["not", "running", "True", "False"], r.stderr
    assert os.path.exists(tmp_path)
