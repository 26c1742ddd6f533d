//! The host channel's line protocol, against the real daemon and
//! `sysgenidctl --host-channel`. vsock peers other than the host cannot be
//! made on an ordinary test machine, so the daemon serves the same
//! protocol on its test-only Unix listener (`--host-channel
//! test-unix:PATH`); the CID check and a real virtio-vsock device are
//! covered by the VM lane (`tests/vm/host-channel.sh`).
//!
//! Every hostile input must get a clear error line, change nothing, and
//! leave the daemon serving.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sysgenid_tests::{bin, runtime_dir, stderr, stdout, wait_until, Daemon};

struct HostDaemon {
    daemon: Daemon,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(extra: &[&str]) -> HostDaemon {
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    let sock = dir.path().join("host.sock");
    let listen = format!("test-unix:{}", sock.display());
    let mut args = vec!["--host-channel", listen.as_str()];
    args.extend_from_slice(extra);
    let daemon = Daemon::start_with(&rt, &args);
    HostDaemon {
        daemon,
        sock,
        _dir: dir,
    }
}

/// A line-protocol client on the test-only listener.
struct Line {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Line {
    fn connect(sock: &Path) -> Line {
        let writer = UnixStream::connect(sock).expect("connect to the host channel");
        writer
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Line {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        }
    }

    fn send(&mut self, line: &[u8]) {
        self.writer.write_all(line).unwrap();
        self.writer.write_all(b"\n").unwrap();
    }

    fn read(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "reply line cut off: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
    }

    fn call(&mut self, line: &str) -> serde_json::Value {
        self.send(line.as_bytes());
        self.read()
    }

    /// Reads until the daemon closes; returns the lines seen.
    fn until_closed(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return lines,
                Ok(_) => lines.push(line),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return lines,
                Err(e) => panic!("reading until closed: {e}"),
            }
        }
    }
}

fn error_name(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["ok"], false, "{reply}");
    reply["error"].as_str().unwrap_or_else(|| panic!("{reply}"))
}

/// A stand-in for a hypervisor's hybrid vsock socket (Firecracker, Cloud
/// Hypervisor, vhost-device-vsock): accepts on `path`, expects
/// `CONNECT <port>\n`, answers `OK <port>\n` and relays to `target`. A
/// wrong port gets the connection closed, as the hypervisors do.
fn hybrid_proxy(path: PathBuf, port: u32, target: PathBuf) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let target = target.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut hello = String::new();
                reader.read_line(&mut hello).unwrap();
                if hello != format!("CONNECT {port}\n") {
                    return;
                }
                let mut client = client;
                client
                    .write_all(format!("OK {}\n", 40000 + port).as_bytes())
                    .unwrap();
                let guest = UnixStream::connect(&target).unwrap();
                let mut guest_w = guest.try_clone().unwrap();
                let mut client_w = client.try_clone().unwrap();
                let mut guest_r = guest;
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut reader, &mut guest_w);
                    let _ = guest_w.shutdown(std::net::Shutdown::Write);
                });
                let _ = std::io::copy(&mut guest_r, &mut client_w);
                let _ = client_w.shutdown(std::net::Shutdown::Both);
                let _ = up.join();
            });
        }
    })
}

fn host_ctl(target: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("sysgenidctl"))
        .arg("--host-channel")
        .arg(target)
        .args(args)
        .output()
        .expect("run sysgenidctl")
}

#[test]
fn every_host_command_works_through_the_hybrid_vsock_handshake() {
    let h = start(&[]);
    let proxy = h.sock.with_file_name("hybrid.sock");
    let _relay = hybrid_proxy(proxy.clone(), 1024, h.sock.clone());
    let target = format!("uds:{}:1024", proxy.display());

    let before = h.daemon.status();
    let out = host_ctl(&target, &["get"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), before.generation.to_string());

    let out = host_ctl(&target, &["restored", "--clone"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), (before.generation + 1).to_string());
    let after = h.daemon.status();
    assert_eq!(after.generation, before.generation + 1);
    assert_ne!(after.epoch, before.epoch, "a restore draws a new epoch");
    assert_eq!(after.last_change_sources, vec!["host".to_string()]);
    let host = after.sources.iter().find(|s| s.name == "host").unwrap();
    assert_eq!(host.events, 1);

    let out = host_ctl(&target, &["status", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["generation"], after.generation);

    for args in [
        &["freeze", "--timeout-ms", "2000"][..],
        &["thaw"],
        &["wait-watchers", "--timeout-ms", "2000"],
    ] {
        let out = host_ctl(&target, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }

    // A wrong port: the hybrid socket hangs up, the client says so.
    let out = host_ctl(&format!("uds:{}:9", proxy.display()), &["get"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("host channel"), "{}", stderr(&out));
    assert_eq!(h.daemon.generation(), after.generation);
}

#[test]
fn entropy_is_checked_on_the_host_before_anything_is_sent() {
    let h = start(&[]);
    let target = format!("test-unix:{}", h.sock.display());
    let dir = tempfile::tempdir().unwrap();
    let before = h.daemon.generation();
    for (name, len) in [("short", 31usize), ("long", 513)] {
        let file = dir.path().join(name);
        std::fs::write(&file, vec![7u8; len]).unwrap();
        let out = host_ctl(
            &target,
            &["restored", "--entropy-file", file.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains("32 to 512"), "{}", stderr(&out));
    }
    assert_eq!(h.daemon.generation(), before);
    // 64 bytes from stdin are taken.
    let mut child = std::process::Command::new(bin("sysgenidctl"))
        .args(["--host-channel", &target, "restored", "--entropy-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seed = [0u8; 64];
    rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty()).unwrap();
    child.stdin.take().unwrap().write_all(&seed).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(h.daemon.generation(), before + 1);
    // Local-only commands are usage errors over the channel.
    let out = host_ctl(&target, &["bump"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = sysgenid_tests::ctl(&h.daemon.dir, &["restored"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(h.daemon.generation(), before + 1);
}

#[test]
fn bad_lines_get_clear_errors_change_nothing_and_the_connection_goes_on() {
    let h = start(&[]);
    let before = h.daemon.status();
    let mut c = Line::connect(&h.sock);
    let cases: [(&str, &str, &str); 8] = [
        ("{not json", "ProtocolViolation", "malformed"),
        ("[1,2]", "ProtocolViolation", "not a JSON object"),
        (r#"{"kind":"clone"}"#, "ProtocolViolation", "op"),
        (r#"{"op":"bump"}"#, "ProtocolViolation", "unknown operation"),
        (
            r#"{"op":"freeze","timeout_ms":"soon"}"#,
            "ProtocolViolation",
            "freeze",
        ),
        (
            r#"{"op":"thaw","force":true}"#,
            "ProtocolViolation",
            "force",
        ),
        (
            r#"{"op":"restored","entropy_hex":"00"}"#,
            "ProtocolViolation",
            "32 to 512",
        ),
        (
            r#"{"op":"restored","hostname":"a/b"}"#,
            "ProtocolViolation",
            "hostname",
        ),
    ];
    for (line, code, says) in cases {
        let reply = c.call(line);
        assert_eq!(error_name(&reply), code, "{line}: {reply}");
        let message = reply["message"].as_str().unwrap();
        assert!(message.contains(says), "{line}: {message}");
    }
    // Invalid UTF-8 and blank lines too.
    c.send(b"\xff\xfe{}");
    assert_eq!(error_name(&c.read()), "ProtocolViolation");
    c.send(b"   ");
    // Still usable, and nothing changed.
    let reply = c.call(r#"{"op":"get"}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["generation"], before.generation);
    let after = h.daemon.status();
    assert_eq!(after.generation, before.generation);
    assert_eq!(after.epoch, before.epoch);
}

#[test]
fn an_over_long_line_is_refused_and_closes_only_its_connection() {
    let h = start(&[]);
    let before = h.daemon.generation();
    let mut other = Line::connect(&h.sock);
    let mut c = Line::connect(&h.sock);
    // A restored with 100 KiB of "entropy": must never be applied.
    let mut long = br#"{"op":"restored","entropy_hex":""#.to_vec();
    long.extend(std::iter::repeat_n(b'a', 100 * 1024));
    long.extend_from_slice(br#""}"#);
    // The daemon may close before everything is written.
    let _ = c.writer.write_all(&long);
    let _ = c.writer.write_all(b"\n");
    let lines = c.until_closed();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let reply: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(error_name(&reply), "ProtocolViolation");
    assert!(reply["message"].as_str().unwrap().contains("longer than"));
    let reply = other.call(r#"{"op":"get"}"#);
    assert_eq!(reply["generation"], before);
    assert_eq!(h.daemon.generation(), before);
}

#[test]
fn connections_past_the_limit_are_refused_and_a_freed_slot_is_served() {
    let h = start(&[]);
    let mut open: Vec<Line> = (0..8).map(|_| Line::connect(&h.sock)).collect();
    for c in &mut open {
        assert_eq!(c.call(r#"{"op":"get"}"#)["ok"], true);
    }
    // A refused client that sends its request reads the refusal, then the
    // close (the request is read and dropped first, so no reset).
    let mut ninth = Line::connect(&h.sock);
    ninth.send(br#"{"op":"restored"}"#);
    let lines = ninth.until_closed();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let reply: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(error_name(&reply), "TooManyWatchers");
    assert_eq!(reply["value"], 8);
    assert_eq!(h.daemon.generation(), 0, "the refused restored did nothing");
    drop(open.pop());
    let ok = wait_until(Duration::from_secs(10), || {
        let mut c = Line::connect(&h.sock);
        c.call(r#"{"op":"get"}"#)["ok"] == true
    });
    assert!(ok, "a freed slot is served again");
    assert!(h.daemon.log().contains("refused a connection"));
}

#[test]
fn a_client_that_does_not_read_is_held_then_closed_and_others_are_served() {
    let h = start(&["--host-channel-idle-ms", "300"]);
    let mut slow = Line::connect(&h.sock);
    // Far more replies than the socket buffer and the outbox hold.
    let burst = r#"{"op":"status"}"#.to_string() + "\n";
    let writer = slow.writer.try_clone().unwrap();
    let pusher = std::thread::spawn(move || {
        let mut w = writer;
        for _ in 0..20_000 {
            if w.write_all(burst.as_bytes()).is_err() {
                return;
            }
        }
    });
    // Meanwhile another connection is served.
    let mut other = Line::connect(&h.sock);
    let g = h.daemon.generation();
    assert_eq!(other.call(r#"{"op":"get"}"#)["generation"], g);
    // Not read from, it is held (no more requests served) and closed at
    // its idle timeout, having got fewer replies than it asked for.
    assert!(
        wait_until(Duration::from_secs(30), || h
            .daemon
            .log()
            .contains("does not read its replies")),
        "{}",
        h.daemon.log()
    );
    let lines = slow.until_closed();
    let _ = pusher.join();
    assert!(lines.len() < 20_000, "got {}", lines.len());
    assert_eq!(h.daemon.generation(), g);
    let mut again = Line::connect(&h.sock);
    assert_eq!(again.call(r#"{"op":"get"}"#)["ok"], true);
}

#[test]
fn an_idle_connection_is_told_and_closed() {
    let h = start(&["--host-channel-idle-ms", "200"]);
    let mut c = Line::connect(&h.sock);
    let lines = c.until_closed();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let reply: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(error_name(&reply), "TimedOut");
    assert!(reply["message"]
        .as_str()
        .unwrap()
        .contains("--host-channel-idle-ms"));
}

#[test]
fn wait_watchers_and_freeze_answer_with_the_local_exit_codes() {
    let h = start(&[]);
    let target = format!("test-unix:{}", h.sock.display());
    let mut watcher = h.daemon.watcher();
    h.daemon.wait_watchers_registered(1);
    let out = host_ctl(&target, &["restored"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let g: u32 = stdout(&out).parse().unwrap();
    // The watcher has not acknowledged: the wait times out (exit 3).
    let out = host_ctl(&target, &["wait-watchers", "--timeout-ms", "200"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    // A waiting host is answered when the watcher acknowledges.
    let mut c = Line::connect(&h.sock);
    c.send(br#"{"op":"wait-watchers","timeout_ms":0}"#);
    assert_eq!(watcher.read().unwrap(), g);
    watcher.ack(g).unwrap();
    let reply = c.read();
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["generation"], g);

    // A participant that never confirms: the freeze is aborted (exit 3).
    let _participant = sysgenid::Watcher::builder()
        .runtime_dir(&h.daemon.dir)
        .lifecycle(true)
        .open()
        .unwrap();
    let out = host_ctl(&target, &["freeze", "--timeout-ms", "200"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(h.daemon.status().state, sysgenid::LifecycleState::Running);

    // The host hanging up during its freeze aborts the freeze.
    let mut f = Line::connect(&h.sock);
    f.send(br#"{"op":"freeze","timeout_ms":60000}"#);
    assert!(wait_until(Duration::from_secs(10), || h
        .daemon
        .status()
        .state
        == sysgenid::LifecycleState::Freezing));
    drop(f);
    assert!(
        wait_until(Duration::from_secs(10), || h.daemon.status().state
            == sysgenid::LifecycleState::Running),
        "{}",
        h.daemon.log()
    );
}

#[test]
fn a_restore_the_kernel_already_signalled_is_one_bump() {
    // The vmfork source reads a FIFO standing in for /dev/kmsg: its
    // record and the host's restored within the window are one restore.
    let dir = runtime_dir();
    let kmsg = dir.path().join("kmsg");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &kmsg,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .unwrap();
    let sock = dir.path().join("host.sock");
    let listen = format!("test-unix:{}", sock.display());
    let daemon = Daemon::start_with(
        &dir.path().join("rt"),
        &[
            "--source",
            "vmfork",
            "--kmsg",
            kmsg.to_str().unwrap(),
            "--coalesce-ms",
            "60000",
            "--host-channel",
            &listen,
        ],
    );
    let before = daemon.generation();
    let mut fifo = std::fs::OpenOptions::new().write(true).open(&kmsg).unwrap();
    fifo.write_all(b"5,1,1000,-;random: crng reseeded due to virtual machine fork\n")
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || daemon.generation()
        == before + 1));
    let mut c = Line::connect(&sock);
    let reply = c.call(r#"{"op":"restored","kind":"clone"}"#);
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["generation"], before + 1, "{reply}");
    assert_eq!(reply["restored"]["coalesced"], true, "{reply}");
    assert_eq!(reply["restored"]["kind"], "clone", "{reply}");
    let status = daemon.status();
    assert_eq!(status.generation, before + 1);
    // The kernel's change was of unknown kind; the host says clone.
    assert_eq!(status.last_change_kind, sysgenid::ChangeKind::Clone);
    assert!(
        status.last_change_sources.contains(&"host".to_string()),
        "{:?}",
        status.last_change_sources
    );
    drop(fifo);
}
