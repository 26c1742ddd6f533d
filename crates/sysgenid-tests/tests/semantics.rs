//! Every semantic of the seed's interface, against the real daemon, with
//! clients in this process and in child processes.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use sysgenid::{Error, Watcher};
use sysgenid_tests::*;

fn readable(w: &Watcher, ms: i64) -> bool {
    let fd = w.as_fd();
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let ts = rustix::time::Timespec {
        tv_sec: ms / 1000,
        tv_nsec: (ms % 1000) * 1_000_000,
    };
    rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0
}

#[test]
fn blocking_read_in_another_process_is_woken_by_a_bump() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let child = ctl_command(dir.path())
        .args(["watch", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_watchers_registered(1);
    assert_eq!(d.control().bump(0).unwrap(), 1);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "1");
}

#[test]
fn nonblocking_read_says_would_block_until_a_change() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut w = Watcher::builder()
        .runtime_dir(dir.path())
        .nonblocking(true)
        .open()
        .unwrap();
    let e = w.read().unwrap_err();
    assert!(matches!(e, Error::WouldBlock), "{e:?}");
    assert_eq!(e.errno(), libc::EAGAIN);
    d.control().bump(0).unwrap();
    assert!(wait_until(Duration::from_secs(5), || w.try_read().unwrap() == Some(1)));
    assert_eq!(w.read().unwrap(), 1, "keeps returning it until acked");
    w.ack(1).unwrap();
    assert!(matches!(w.read(), Err(Error::WouldBlock)));
}

#[test]
fn descriptor_is_readable_exactly_while_outdated() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut w = d.watcher();
    assert!(!readable(&w, 50), "fresh watcher is up to date");
    d.control().bump(0).unwrap();
    assert!(readable(&w, 5000), "readable after a bump");
    assert_eq!(w.read().unwrap(), 1);
    assert!(readable(&w, 0), "still readable after read, before ack");
    w.status().unwrap();
    assert!(readable(&w, 0), "still readable after an unrelated request");
    w.ack(1).unwrap();
    assert!(!readable(&w, 100), "not readable once acknowledged");
    d.control().bump(0).unwrap();
    d.control().bump(0).unwrap();
    assert!(readable(&w, 5000));
    assert_eq!(w.read().unwrap(), 3, "two bumps: the newest generation");
}

#[test]
fn wrong_ack_is_einval_and_changes_nothing() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut w = d.watcher();
    d.control().bump(0).unwrap();
    assert_eq!(w.read().unwrap(), 1);
    for wrong in [0, 2, u32::MAX] {
        let e = w.ack(wrong).unwrap_err();
        assert!(
            matches!(e, Error::WrongGeneration { current: 1, .. }),
            "{e:?}"
        );
        assert_eq!(e.errno(), libc::EINVAL);
    }
    let s = d.status();
    assert_eq!((s.generation, s.outdated), (1, 1));
    assert!(readable(&w, 0));
    w.ack(1).unwrap();
    assert_eq!(d.status().outdated, 0);
}

#[test]
fn barrier_succeeds_times_out_and_is_interrupted() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut me = d.watcher();
    let mut other = d.watcher();
    d.control().bump(0).unwrap();

    // Caller outdated: interrupted at once.
    let e = me.wait_watchers(Some(Duration::from_secs(5))).unwrap_err();
    assert!(
        matches!(e, Error::Interrupted { generation: 1, .. }),
        "{e:?}"
    );
    assert_eq!(e.errno(), libc::EINTR);
    let g = me.read().unwrap();
    me.ack(g).unwrap();

    // Another tracked watcher is outdated: timeout carries the count.
    let e = me
        .wait_watchers(Some(Duration::from_millis(100)))
        .unwrap_err();
    assert!(matches!(e, Error::TimedOut { outdated: 1, .. }), "{e:?}");
    assert_eq!(e.errno(), libc::ETIMEDOUT);

    // It acks while we wait: success.
    let acker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let g = other.read().unwrap();
        other.ack(g).unwrap();
        other
    });
    me.wait_watchers(None).unwrap();
    let mut other = acker.join().unwrap();

    // A bump while waiting interrupts the waiter.
    d.control().bump(0).unwrap();
    let g = me.read().unwrap();
    me.ack(g).unwrap();
    let bumper = {
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            sysgenid::Control::connect(Some(&dir))
                .unwrap()
                .bump(0)
                .unwrap()
        })
    };
    let e = me.wait_watchers(Some(Duration::from_secs(10))).unwrap_err();
    assert!(
        matches!(e, Error::Interrupted { generation: 3, .. }),
        "{e:?}"
    );
    assert_eq!(bumper.join().unwrap(), 3);
    let _ = other.read();
}

#[test]
fn the_page_carries_the_barriers_count_and_the_waiters_answers_stay_the_daemons() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let page = sysgenid_page::PageReader::open(&dir.path().join("generation")).unwrap();
    let count = || page.outdated_tracked().expect("layout 2 page");
    let mut tracked = d.watcher();
    let mut lazy = Watcher::builder()
        .runtime_dir(dir.path())
        .untracked(true)
        .open()
        .unwrap();
    assert_eq!(count(), 0);
    d.control().bump(0).unwrap();
    assert_eq!(count(), 1, "published before the bump's answer");
    assert_eq!(d.status().outdated, count());

    // Nothing tracked is outdated once `tracked` acks, but `lazy` (an
    // untracked watcher) still is: its own wait is interrupted, as the
    // daemon says, though the page shows 0.
    let g = tracked.read().unwrap();
    tracked.ack(g).unwrap();
    assert_eq!(count(), 0, "published before the ack's answer");
    let e = lazy
        .wait_watchers(Some(Duration::from_secs(5)))
        .unwrap_err();
    assert!(
        matches!(e, Error::Interrupted { generation: 1, .. }),
        "{e:?}"
    );
    tracked.wait_watchers(Some(Duration::from_secs(5))).unwrap();
    d.control()
        .wait_watchers(Some(Duration::from_secs(5)))
        .unwrap();

    // Closing an outdated tracked watcher moves the count too.
    d.control().bump(0).unwrap();
    assert_eq!(count(), 1);
    drop(tracked);
    assert!(wait_until(Duration::from_secs(5), || count() == 0));
    let _ = lazy.read();
}

#[test]
fn a_barrier_waiter_on_the_page_notices_a_daemon_killed_under_it() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let _w = d.watcher();
    d.control().bump(0).unwrap();
    let waiter = d.spawn_barrier_waiter();
    std::thread::sleep(Duration::from_millis(200));
    // kill -9 wakes nobody on the page: the waiter's liveness check sees
    // the connection hang up.
    d.kill9();
    let e = waiter.join().unwrap().unwrap_err();
    assert!(matches!(e, Error::Disconnected), "{e:?}");
}

#[test]
fn untracked_watchers_do_not_hold_up_the_barrier() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut lazy = Watcher::builder()
        .runtime_dir(dir.path())
        .untracked(true)
        .open()
        .unwrap();
    d.control().bump(0).unwrap();
    d.control()
        .wait_watchers(Some(Duration::from_secs(5)))
        .unwrap();
    let s = d.status();
    assert_eq!(
        (s.watchers, s.tracked, s.outdated, s.outdated_untracked),
        (1, 0, 0, 1)
    );
    assert_eq!(lazy.read().unwrap(), 1, "it is still told about the change");
}

#[test]
fn closing_an_outdated_watcher_releases_the_barrier() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    // The outdated watcher is another process that never acks.
    // Its own process group, so the `sleep` it runs goes with it.
    let mut child = ctl_command(dir.path())
        .args(["watch", "--exec", "sleep", "1000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    d.wait_watchers_registered(1);
    d.control().bump(0).unwrap();
    let waiter = {
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            sysgenid::Control::connect(Some(&dir))
                .unwrap()
                .wait_watchers(Some(Duration::from_secs(20)))
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(!waiter.is_finished(), "barrier held by the stuck watcher");
    // SAFETY: kill(2) of our child's process group; no memory involved.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();
    waiter
        .join()
        .unwrap()
        .expect("released when the watcher closed");
    assert_eq!(d.status().watchers, 0);
}

#[test]
fn forced_update_honours_the_minimum_and_refuses_overflow() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut c = d.control();
    assert_eq!(c.bump(10).unwrap(), 10);
    assert_eq!(c.bump(3).unwrap(), 11);
    let e = c.bump(u32::MAX).unwrap_err();
    assert!(
        matches!(e, Error::Overflow { current: 11, .. }),
        "a minimum that exhausts the counter needs explicit permission: {e:?}"
    );
    assert!(e.to_string().contains("--allow-exhaustion"), "{e}");
    assert_eq!(d.generation(), 11, "the refusal changed nothing");
    assert_eq!(c.bump_allowing_exhaustion(u32::MAX).unwrap(), u32::MAX);
    let e = c.bump(0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Overflow {
                current: u32::MAX,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), libc::EOVERFLOW);
    assert_eq!(d.generation(), u32::MAX, "nothing changed");
}

#[test]
fn page_mapping_follows_bumps_and_restarts() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let probe = sysgenid::Probe::open(Some(dir.path())).unwrap();
    let page = dir.path().join("generation");
    let meta = std::fs::metadata(&page).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    assert_eq!(meta.len(), 4096);
    assert_eq!(probe.generation(), 0);
    let epoch0 = probe.record().epoch;
    d.control().bump(0).unwrap();
    assert_eq!(probe.generation(), 1, "updated before the bump reply");
    assert_ne!(probe.record().epoch, epoch0, "a new epoch per change");
    d.signal_and_wait(libc::SIGTERM);
    d.restart();
    assert_eq!(probe.generation(), 1);
    d.control().bump(0).unwrap();
    assert_eq!(probe.generation(), 2, "same mapping, new daemon");
    assert_eq!(
        std::fs::metadata(&page).unwrap().ino(),
        meta.ino(),
        "never replaced"
    );
}

#[test]
fn kill_9_and_restart_keeps_the_generation() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    d.control().bump(41).unwrap();
    d.kill9();
    d.restart();
    assert_eq!(d.generation(), 41);
    assert_eq!(d.control().bump(0).unwrap(), 42);
}

#[test]
fn reconnecting_watcher_gets_the_change_it_missed() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let mut w = d.watcher();
    // A blocked reader in another process survives the restart too.
    let child = ctl_command(dir.path())
        .args(["watch", "--count", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_watchers_registered(2);
    d.kill9();
    // Bump while both watchers are disconnected.
    d.restart();
    d.control().bump(0).unwrap();
    assert_eq!(
        w.read().unwrap(),
        1,
        "missed change delivered after reconnect"
    );
    w.ack(1).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "1");
}

#[test]
fn unprivileged_uid_cannot_bump() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    if skip_unless_root("to run a client as nobody") {
        return;
    }
    let out = ctl_command(dir.path())
        .arg("bump")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("CAP_SYS_ADMIN"), "{}", stderr(&out));
    assert_eq!(d.generation(), 0, "nothing changed");
    // The same uid may still watch and read.
    let out = ctl_command(dir.path())
        .arg("get")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "0");
}

/// An unprivileged process connects, hands the socket to a child, and
/// execs a set-user-ID-root program (which has every capability while it
/// runs); the child then asks for a bump on the inherited socket. The peer
/// the kernel recorded at connect time is now privileged, but it is not the
/// same user it was: refused.
#[test]
fn a_socket_carried_across_a_setuid_exec_cannot_bump() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if skip_unless_root("to make a set-user-ID program") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let setuid_sleep = dir.path().join("setuid-sleep");
    std::fs::copy("/bin/sleep", &setuid_sleep).unwrap();
    std::fs::set_permissions(&setuid_sleep, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let script = r#"
import os, socket, struct, sys, time
sock_path, setuid_prog = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(sock_path)
s.send(b"\x01" + struct.pack("<H", 1) + b"\x00\x00" + struct.pack("<I", 0))
assert s.recv(64)[0] == 0x81, "welcome"
s.set_inheritable(True)
if os.fork() == 0:
    time.sleep(0.5)                      # the parent is now the setuid program
    s.send(b"\x04" + struct.pack("<I", 0xFFFFFFFF))
    reply = s.recv(2048)
    code = struct.unpack("<H", reply[1:3])[0] if reply[0] == 0xFF else 0
    print("refused" if code == 4 else "granted kind=%#x code=%d" % (reply[0], code), flush=True)
    os._exit(0)
os.execv(setuid_prog, ["setuid-sleep", "2"])
"#;
    let out = clean_env(&mut std::process::Command::new("python3"))
        .arg("-c")
        .arg(script)
        .arg(dir.path().join("sysgenid.sock"))
        .arg(&setuid_sleep)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The child's output arrives when it exits, before or after the parent.
    assert!(
        wait_until(Duration::from_secs(5), || {
            !stdout(&out).is_empty() || d.generation() != 0
        }),
        "no answer"
    );
    assert_eq!(stdout(&out), "refused", "{}", stderr(&out));
    assert_eq!(d.generation(), 0, "nothing changed");
}
