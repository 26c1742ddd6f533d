//! `sysgenidd --source vmfork --kmsg FIFO`: the real daemon fed kernel-log
//! records through a named pipe, as tests and benchmarks do. The FIFO's
//! open must not block start-up or SIGTERM, records count from the first
//! one written, only kernel-facility fork records bump, and writers may
//! come and go.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sysgenid_tests::*;

const FORK: &str = "random: crng reseeded due to virtual machine fork";

fn mkfifo(path: &Path) {
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        path,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
}

fn fifo_daemon(dir: &tempfile::TempDir) -> (Daemon, PathBuf) {
    let fifo = dir.path().join("kmsg.fifo");
    mkfifo(&fifo);
    let rt = dir.path().join("rt");
    let fifo_arg = fifo.to_str().unwrap().to_owned();
    // start_with returns once the daemon answers: with no writer on the
    // FIFO yet, so the open did not wait for one.
    let d = Daemon::start_with(&rt, &["--source", "vmfork", "--kmsg", &fifo_arg]);
    (d, fifo)
}

fn wait_generation(d: &Daemon, want: u32) -> bool {
    wait_until(Duration::from_secs(10), || d.generation() == want)
}

#[test]
fn a_fifo_without_a_writer_neither_blocks_start_up_nor_sigterm() {
    let dir = runtime_dir();
    let (mut d, _fifo) = fifo_daemon(&dir);
    let status = d.status();
    let vmfork = status.sources.iter().find(|s| s.name == "vmfork").unwrap();
    assert!(vmfork.active, "{status:?}");
    assert!(vmfork.detail.contains("FIFO"), "{}", vmfork.detail);
    assert!(
        d.log().contains("whoever can write it can trigger bumps"),
        "{}",
        d.log()
    );
    let t = Instant::now();
    let exit = d.signal_and_wait(libc::SIGTERM);
    assert!(exit.success(), "{exit:?}\n{}", d.log());
    // Not a timing goal: a daemon stuck in open(2) would never exit.
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn kernel_fork_records_written_into_the_fifo_bump_and_forgeries_do_not() {
    let dir = runtime_dir();
    let (d, fifo) = fifo_daemon(&dir);
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    // User facility (13 = 1 * 8 + 5) and a kernel record that only echoes
    // the text: neither is a restore.
    writeln!(w, "13,1,1000,-;{FORK}").unwrap();
    writeln!(w, "3,2,1001,-;tmpfs: Unknown parameter '{FORK}'").unwrap();
    writeln!(w, "5,3,1002,-;{FORK}").unwrap();
    assert!(
        wait_generation(&d, 1),
        "generation {}\n{}",
        d.generation(),
        d.log()
    );
    let status = d.status();
    assert_eq!(status.last_change_sources, vec!["vmfork".to_string()]);
    // The first writer leaves; a second one's record bumps again (a second
    // record of the same source is a second restore, never coalesced).
    drop(w);
    std::thread::sleep(Duration::from_millis(50));
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    writeln!(w, "5,4,5000000,-;{FORK}").unwrap();
    assert!(
        wait_generation(&d, 2),
        "generation {}\n{}",
        d.generation(),
        d.log()
    );
    drop(w);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(d.generation(), 2, "{}", d.log());
}

/// The log without terminal colour sequences (`ESC [ ... m`).
fn without_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

#[test]
fn status_and_log_report_the_lag_from_the_record_timestamp_to_the_page() {
    let dir = runtime_dir();
    let (d, fifo) = fifo_daemon(&dir);
    assert_eq!(d.status().last_kernel_lag_us, None);
    // A manual bump has no kernel timestamp.
    d.control().bump(0).unwrap();
    assert_eq!(d.status().last_kernel_lag_us, None);
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let stamp = monotonic_us();
    writeln!(w, "5,9,{stamp},-;{FORK}").unwrap();
    assert!(wait_generation(&d, 2), "{}", d.log());
    let lag = d
        .status()
        .last_kernel_lag_us
        .expect("a lag after a vmfork bump");
    // Published before this status answer, and after the record was stamped.
    assert!(lag <= monotonic_us() - stamp, "lag {lag} µs");
    let line = format!("kernel_record_to_page_us={lag}");
    assert!(
        without_ansi(&d.log()).contains(&line),
        "{line} not in:\n{}",
        d.log()
    );
    // A later manual bump keeps the last kernel figure.
    d.control().bump(0).unwrap();
    assert_eq!(d.status().last_kernel_lag_us, Some(lag));
}
