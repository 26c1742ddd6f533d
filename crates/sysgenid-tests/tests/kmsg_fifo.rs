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
