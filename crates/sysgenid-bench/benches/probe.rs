//! In-process costs, each next to its baseline in the same run:
//! * `probe/generation`: `sysgenid::Probe::generation()` vs a raw volatile
//!   load and a raw `Acquire` atomic load from our own `MAP_SHARED` mapping
//!   of the same page file (what AWS-LC does with it);
//! * `probe/record`: `Probe::record()` (the seqlock read of the 40-byte
//!   record) vs the same seqlock written by hand, and vs `pread` of 4 bytes;
//! * `kmsg/follow_reader`: parsing one kernel-log record from a byte slice.
//!
//! No daemon is needed: the page is written with `sysgenid-page`'s writer,
//! exactly as the daemon writes it.
//!
//! `cargo bench -p sysgenid-bench` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use criterion::{criterion_group, criterion_main, Criterion};
use sysgenid_bench::{raw_seqlock, write_page, RawMap};

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let page = write_page(dir.path(), 42);
    let probe = sysgenid::Probe::open(Some(dir.path())).expect("probe");
    let raw = RawMap::open(&page).expect("map");
    let file = std::fs::File::open(&page).expect("open page");

    let mut g = c.benchmark_group("probe/generation");
    g.bench_function("sysgenid Probe::generation", |b| {
        b.iter(|| black_box(&probe).generation())
    });
    g.bench_function("raw volatile load (baseline)", |b| {
        b.iter(|| black_box(&raw).volatile_load())
    });
    g.bench_function("raw atomic Acquire load (baseline)", |b| {
        b.iter(|| black_box(&raw).atomic().load(Ordering::Acquire))
    });
    g.finish();

    let mut g = c.benchmark_group("probe/record");
    g.bench_function("sysgenid Probe::record", |b| {
        b.iter(|| black_box(&probe).record())
    });
    g.bench_function("hand-written seqlock (baseline)", |b| {
        b.iter(|| raw_seqlock(black_box(&raw)))
    });
    g.bench_function("pread 4 bytes (reference)", |b| {
        b.iter(|| {
            let mut buf = [0u8; 4];
            // SAFETY: pread(2) into a valid 4-byte buffer.
            unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), 4, 0) };
            u32::from_ne_bytes(buf)
        })
    });
    g.finish();

    let line = format!(
        "5,340,1322628,-;random: {}\n",
        sysgenid_sources::kmsg::VMFORK_TEXT
    );
    c.bench_function("kmsg/follow_reader one VM-fork record", |b| {
        b.iter(|| {
            let mut hits = 0u32;
            let _ = sysgenid_sources::kmsg::follow_reader(black_box(line.as_bytes()), &mut |_| {
                hits += 1
            });
            hits
        })
    });
}

criterion_group!(probe_benches, benches);
criterion_main!(probe_benches);
