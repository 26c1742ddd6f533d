"""What the Python client's checks cost, each next to its baseline in the
same run (standard library ``timeit``; best of several repeats, in
nanoseconds per call):

* ``Probe.generation`` vs reading a plain attribute;
* ``snapsafe.SnapSafe.get()`` vs a plain attribute;
* ``random.random()``, ``random.getrandbits(64)``, ``random.randint`` and
  ``uuid.uuid1()`` before and after ``snapsafe.install()``.

No daemon is needed: the page is written here with the layout of
``crates/sysgenid-page`` (magic, generation 42) and never moves, so the
fast path is what is measured.

    python3 python/benchmarks/snapsafe.py
"""

import os
import random
import struct
import sys
import tempfile
import timeit
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sysgenid  # noqa: E402
import sysgenid.snapsafe as snapsafe  # noqa: E402

NUMBER = 200_000
REPEAT = 7


def ns(stmt, number=NUMBER, **names):
    t = min(timeit.repeat(stmt, globals=names, number=number, repeat=REPEAT))
    return t / number * 1e9


def main():
    d = tempfile.mkdtemp()
    page = os.path.join(d, "generation")
    with open(page, "wb") as f:
        data = bytearray(4096)
        struct.pack_into("=II4sI", data, 0, 42, 2, b"SGID", 1)
        f.write(data)
    os.chmod(page, 0o444)

    class Plain:
        pass

    plain = Plain()
    plain.value = 42
    probe = sysgenid.Probe(d)
    rows = []
    rows.append(("Probe.generation", ns("probe.generation", probe=probe)))
    rows.append(("plain attribute (baseline)", ns("plain.value", plain=plain)))

    before = {
        "random.random()": ns("random()", random=random.random),
        "random.getrandbits(64)": ns("g(64)", g=random.getrandbits),
        "random.randint(1, 6)": ns("r(1, 6)", r=random.randint),
        "uuid.uuid1()": ns("u()", number=20_000, u=uuid.uuid1),
    }
    snapsafe.install(d)
    after = {
        "random.random()": ns("random()", random=random.random),
        "random.getrandbits(64)": ns("g(64)", g=random.getrandbits),
        "random.randint(1, 6)": ns("r(1, 6)", r=random.randint),
        "uuid.uuid1()": ns("u()", number=20_000, u=uuid.uuid1),
    }
    value = snapsafe.SnapSafe(lambda: os.urandom(32))
    rows.append(("snapsafe.SnapSafe.get()", ns("value.get()", value=value)))
    print("Python %s" % sys.version.split()[0])
    for name, t in rows:
        print("%-34s %8.1f ns" % (name, t))
    print("%-34s %8s   %8s   %s" % ("", "plain", "snapsafe", "ratio"))
    for name in before:
        print("%-34s %8.1f   %8.1f   %.2fx" % (name, before[name], after[name], after[name] / before[name]))


if __name__ == "__main__":
    main()
