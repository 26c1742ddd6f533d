//! The daemon's own promises: start-up, refusal to go backwards, the
//! runtime directory's safety, protocol versioning, shutdown.

use std::io::Write;
use std::time::Duration;

use sysgenid_proto::{ErrorCode, Reply, Request, Role};
use sysgenid_tests::*;

#[test]
fn fresh_directory_starts_at_zero_with_the_documented_modes() {
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    let d = Daemon::start(&rt);
    assert_eq!(d.generation(), 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(rt.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(""), 0o755);
    assert_eq!(mode("generation"), 0o444);
    assert_eq!(mode("sysgenid.sock"), 0o666);
    assert!(d.log().contains("ready: runtime dir"), "{}", d.log());
}

#[test]
fn a_second_daemon_on_the_same_directory_is_refused() {
    let dir = runtime_dir();
    let _d = Daemon::start(dir.path());
    let out = daemon_command(dir.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already running"), "{}", stderr(&out));
}

#[test]
fn corrupt_state_stops_the_daemon_with_instructions() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    d.control().bump(5).unwrap();
    d.signal_and_wait(libc::SIGTERM);
    std::fs::write(dir.path().join("state"), "sysgenid-state 1\ngeneration 0\n").unwrap();
    let out = daemon_command(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("corrupt") && err.contains("--recover"),
        "{err}"
    );
    // --recover continues from the page, never from 0.
    d.extra_restart(&["--recover"]);
    assert_eq!(d.generation(), 5);
}

#[test]
fn sigterm_is_a_clean_exit_that_removes_the_socket() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let status = d.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(!dir.path().join("sysgenid.sock").exists());
    assert!(dir.path().join("generation").exists(), "the page stays");
}

#[test]
fn sigterm_answers_barrier_waiters_with_an_error() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let _w = d.watcher();
    d.control().bump(0).unwrap();
    let waiter = d.spawn_barrier_waiter();
    std::thread::sleep(Duration::from_millis(200));
    d.signal_and_wait(libc::SIGTERM);
    let e = waiter.join().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            sysgenid::Error::Refused {
                code: ErrorCode::ShuttingDown,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_newer_client_gets_a_clear_version_error() {
    let dir = runtime_dir();
    let _d = Daemon::start(dir.path());
    let sock =
        seqpacket_connect(&dir.path().join("sysgenid.sock"), Duration::from_secs(5)).unwrap();
    let mut hello = Request::Hello {
        version: 99,
        role: Role::Control,
    }
    .encode();
    hello.extend_from_slice(b"future fields");
    sock.send(&hello).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    match Reply::decode(&buf[..n]).unwrap() {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::VersionMismatch);
            assert_eq!(e.value, u32::from(sysgenid::PROTOCOL_VERSION));
            assert!(e.message.contains("protocol 99"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_frames_get_an_error_and_a_hang_up() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let sock =
        seqpacket_connect(&dir.path().join("sysgenid.sock"), Duration::from_secs(5)).unwrap();
    sock.send(&[0x42, 1, 2, 3]).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    assert!(matches!(
        Reply::decode(&buf[..n]).unwrap(),
        Reply::Error(e) if e.code == ErrorCode::ProtocolViolation
    ));
    assert_eq!(sock.recv(&mut buf).unwrap(), 0, "then closed");
    assert_eq!(d.generation(), 0, "daemon still fine");
}

#[test]
fn planted_symlink_at_the_socket_path_is_refused() {
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::File::create(&target)
        .unwrap()
        .write_all(b"precious")
        .unwrap();
    std::os::unix::fs::symlink(&target, rt.join("sysgenid.sock")).unwrap();
    let out = daemon_command(&rt).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refusing"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

#[test]
fn one_user_cannot_take_every_connection() {
    use std::os::unix::process::CommandExt;
    if skip_unless_root("to run clients as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--max-connections-per-uid", "3"]);
    let nobody = |args: &[&str]| {
        let mut c = ctl_command(dir.path());
        c.args(args).uid(65534).gid(65534);
        c
    };
    /// Kills the held clients even if an assertion fails first.
    struct Held(Vec<std::process::Child>);
    impl Drop for Held {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let held = Held(
        (0..3)
            .map(|_| {
                nobody(&["watch"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );
    d.wait_watchers_registered(3);
    let out = nobody(&["get"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("per-user limit"), "{}", stderr(&out));
    // Root (and so bumps) still get through, and the held watchers work.
    assert_eq!(d.control().bump(0).unwrap(), 1);
    drop(held);
    assert!(wait_until(Duration::from_secs(10), || d.status().watchers == 0));
    let out = nobody(&["get"]).output().unwrap();
    assert!(out.status.success(), "released on close: {}", stderr(&out));
}

#[test]
fn a_connection_that_never_says_hello_is_dropped_with_a_reason() {
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--hello-timeout-ms", "200"]);
    let sock =
        seqpacket_connect(&dir.path().join("sysgenid.sock"), Duration::from_secs(5)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    match Reply::decode(&buf[..n]).unwrap() {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::ProtocolViolation);
            assert!(
                e.message.contains("no Hello within 200 ms"),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sock.recv(&mut buf).unwrap(), 0, "then closed");
    // A client that does greet is unaffected, however long it stays.
    let mut w = d.watcher();
    std::thread::sleep(Duration::from_millis(400));
    d.control().bump(0).unwrap();
    assert_eq!(w.read().unwrap(), 1);
}

#[test]
fn a_client_hangs_up_on_a_welcome_of_another_version() {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    // A stand-in daemon that answers every Hello with a Welcome of a
    // version no client asked for.
    let dir = runtime_dir();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = dir.path().join("sysgenid.sock");
    let listener = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&listener, 8).unwrap();
    let server = std::thread::spawn(move || {
        let conn = rustix::net::accept(&listener).unwrap();
        let mut buf = [0u8; 4096];
        let _ = rustix::net::recv(&conn, &mut buf, rustix::net::RecvFlags::empty()).unwrap();
        let welcome = Reply::Welcome {
            version: 77,
            generation: 5,
        }
        .encode();
        rustix::net::send(&conn, &welcome, rustix::net::SendFlags::empty()).unwrap();
    });
    let result = sysgenid::Watcher::builder()
        .runtime_dir(dir.path())
        .reconnect(false)
        .open();
    server.join().unwrap();
    match result {
        Err(sysgenid::Error::VersionMismatch { daemon, message }) => {
            assert_eq!(daemon, 77);
            assert!(message.contains("protocol 77"), "{message}");
        }
        Err(other) => panic!("expected VersionMismatch, got {other:?}"),
        Ok(_) => panic!("a Welcome of version 77 was accepted"),
    }
}
