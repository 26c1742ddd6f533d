//! What snapshot safety costs in-process, each next to its baseline in the
//! same run:
//! * `snapsafe/get`: `SnapSafe<[u8; 32]>::get()` (one page load, one
//!   compare) vs reading the same array from a plain struct field (the
//!   goal is at most 1.5x) and from behind a `Mutex` (what a hand-rolled
//!   "check and maybe rebuild under a lock" costs uncontended);
//! * `snapsafe_rng/*`: `SnapSafeRng<R>` vs the bare `R`, for a small fast
//!   generator (`SmallRng`, where the check is most visible) and a
//!   cryptographic one (`StdRng`, ChaCha12).
//!
//! No daemon is needed: the page is written with `sysgenid-page`'s writer,
//! exactly as the daemon writes it, and never moves during the run (the
//! fast path is what is measured; a rebuild is a closure call).
//!
//! `cargo bench -p sysgenid-bench --bench snapsafe` (add `-- --quick` for a
//! fast pass).

use std::hint::black_box;
use std::sync::Mutex;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use sysgenid::{Probe, SnapSafe, SnapSafeRng};
use sysgenid_bench::write_page;

struct Plain {
    key: [u8; 32],
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_page(dir.path(), 42);
    let probe = Probe::shared(Some(dir.path())).expect("probe");
    let key = [7u8; 32];

    let snapsafe = SnapSafe::with_probe(probe, move || key);
    let plain = Plain { key };
    let locked = Mutex::new(key);
    let mut g = c.benchmark_group("snapsafe/get");
    g.bench_function("SnapSafe::get", |b| {
        b.iter(|| black_box(&snapsafe).get()[black_box(3)])
    });
    g.bench_function("plain field (baseline)", |b| {
        b.iter(|| black_box(&plain).key[black_box(3)])
    });
    g.bench_function("Mutex lock (baseline)", |b| {
        b.iter(|| black_box(&locked).lock().expect("lock")[black_box(3)])
    });
    g.finish();

    let mut g = c.benchmark_group("snapsafe_rng/SmallRng next_u64");
    let mut bare = SmallRng::seed_from_u64(1);
    let mut wrapped = SnapSafeRng::with_probe(probe, SmallRng::seed_from_u64(1));
    g.bench_function("SnapSafeRng<SmallRng>", |b| b.iter(|| wrapped.next_u64()));
    g.bench_function("SmallRng (baseline)", |b| b.iter(|| bare.next_u64()));
    g.finish();

    let mut g = c.benchmark_group("snapsafe_rng/StdRng next_u64");
    let mut bare = StdRng::seed_from_u64(1);
    let mut wrapped = SnapSafeRng::with_probe(probe, StdRng::seed_from_u64(1));
    g.bench_function("SnapSafeRng<StdRng>", |b| b.iter(|| wrapped.next_u64()));
    g.bench_function("StdRng (baseline)", |b| b.iter(|| bare.next_u64()));
    g.finish();

    let mut g = c.benchmark_group("snapsafe_rng/StdRng fill 32 bytes");
    let mut bare = StdRng::seed_from_u64(1);
    let mut wrapped = SnapSafeRng::with_probe(probe, StdRng::seed_from_u64(1));
    g.bench_function("SnapSafeRng<StdRng>", |b| {
        b.iter(|| {
            let mut buf = [0u8; 32];
            wrapped.fill_bytes(&mut buf);
            buf
        })
    });
    g.bench_function("StdRng (baseline)", |b| {
        b.iter(|| {
            let mut buf = [0u8; 32];
            bare.fill_bytes(&mut buf);
            buf
        })
    });
    g.finish();
}

criterion_group!(snapsafe_benches, benches);
criterion_main!(snapsafe_benches);
