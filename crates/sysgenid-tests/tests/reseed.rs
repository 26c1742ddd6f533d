//! A change renews the kernel RNG before anyone hears of it, and says what
//! it is: `sysgenidctl bump --entropy-file/--kind/--hostname`, the reseed
//! outcome in status (also when the kernel refuses), the kind and hostname
//! in the hooks' and `watch --exec`'s environment, and the Bump frame of
//! every protocol version.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sysgenid_proto::{BumpDetails, ChangeKind, Entropy, Hostname, Reply, Request, Role};
use sysgenid_tests::*;

const LONG: Duration = Duration::from_secs(20);

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// `sysgenidctl bump ARGS` with `input` on its stdin.
fn bump_with_stdin(d: &Daemon, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut child = ctl_command(&d.dir)
        .arg("bump")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A refused input may be closed before it is all written.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

#[test]
fn entropy_files_of_32_to_512_bytes_are_mixed_in_and_others_change_nothing() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let files = tempfile::tempdir().unwrap();

    let ok = write_file(files.path(), "ok", &[0x5a; 64]);
    let o = d.ctl(&["bump", "--entropy-file", &ok]);
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(0), "1".into()),
        "{}",
        stderr(&o)
    );
    let rng = d
        .status()
        .last_change_rng
        .expect("rng status after a change");
    assert_eq!(rng.entropy_mixed, 64, "{rng:?}");
    assert!(
        rng.reseeded && rng.by.as_deref() == Some("sysgenidd"),
        "{rng:?}"
    );

    // Stdin, the shortest allowed.
    let o = bump_with_stdin(&d, &["--entropy-file", "-"], &[7; 32]);
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(0), "2".into()),
        "{}",
        stderr(&o)
    );
    assert_eq!(d.status().last_change_rng.unwrap().entropy_mixed, 32);

    // Too short, too long (a file and stdin), missing: exit 2, a clear
    // message, and the generation stays.
    let short = write_file(files.path(), "short", &[1; 31]);
    let long = write_file(files.path(), "long", &[1; 513]);
    let missing = files.path().join("missing").display().to_string();
    for (o, says) in [
        (
            d.ctl(&["bump", "--entropy-file", &short]),
            "this is 31 bytes",
        ),
        (
            d.ctl(&["bump", "--entropy-file", &long]),
            "more than 512 bytes",
        ),
        (
            bump_with_stdin(&d, &["--entropy-file", "-"], &[1; 4096]),
            "more than 512 bytes",
        ),
        (
            bump_with_stdin(&d, &["--entropy-file", "-"], b""),
            "this is 0 bytes",
        ),
        (d.ctl(&["bump", "--entropy-file", &missing]), "No such file"),
    ] {
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains(says), "{}", stderr(&o));
        assert!(stderr(&o).contains("32 to 512 bytes") || says == "No such file");
    }
    assert_eq!(d.generation(), 2, "refused input changed nothing");
    // Bad kinds and hostnames are usage errors too.
    for args in [
        &["bump", "--kind", "fork"][..],
        &["bump", "--hostname", "a_b"],
        &["bump", "--hostname", &"a".repeat(65)],
        &["bump", "--hostname", "-web"],
    ] {
        let o = d.ctl(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    assert_eq!(d.generation(), 2);
}

fn write_hook(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn kind_and_hostname_reach_hooks_watch_exec_and_status() {
    let dir = runtime_dir();
    let hooks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(hooks.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("hooks.log");
    write_hook(
        hooks.path(),
        "10-env",
        &format!(
            "echo \"$1 $SYSGENID_GENERATION ${{SYSGENID_KIND-unset}} ${{SYSGENID_HOSTNAME-unset}}\" >> {}",
            log.display()
        ),
    );
    let d = Daemon::start_with(dir.path(), &["--hooks-dir", hooks.path().to_str().unwrap()]);
    let seen = dir.path().join("watch.log");
    let watch = ctl_command(dir.path())
        .args(["watch", "--count", "3", "--exec", "sh", "-c"])
        .arg(format!(
            "echo \"$SYSGENID_GENERATION $SYSGENID_KIND\" >> {}",
            seen.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    d.wait_watchers_registered(1);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();

    let o = d.ctl(&["bump", "--kind", "clone", "--hostname", "web-3.example"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(wait_until(LONG, || read(&seen).lines().count() == 1));
    assert_eq!(d.status().last_change_kind, ChangeKind::Clone);
    let o = d.ctl(&["wait-watchers", "--timeout-ms", "20000"]);
    assert_eq!(o.status.code(), Some(0));
    let o = d.ctl(&["bump", "--kind", "restore"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(wait_until(LONG, || read(&seen).lines().count() == 2));
    d.ctl(&["wait-watchers", "--timeout-ms", "20000"]);
    let o = d.ctl(&["bump"]);
    assert_eq!(o.status.code(), Some(0));
    let out = watch.wait_with_output().unwrap();
    assert!(out.status.success());
    d.ctl(&["wait-watchers", "--timeout-ms", "20000"]);

    assert_eq!(read(&seen), "1 clone\n2 restore\n3 unknown\n");
    // The hostname is that change's only.
    assert_eq!(
        read(&log),
        "change 1 clone web-3.example\nchange 2 restore unset\nchange 3 unknown unset\n"
    );
    let o = d.ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["last_change_kind"], "unknown");
    let o = d.ctl(&["status"]);
    assert!(
        stdout(&o).contains("change kind:  unknown"),
        "{}",
        stdout(&o)
    );
}

/// The daemon's status after one bump, when the daemon runs as root but
/// without CAP_SYS_ADMIN (as in a container).
#[test]
fn without_cap_sys_admin_the_bump_still_happens_and_status_says_why_not() {
    if skip_unless_root("(to drop capabilities with setpriv)") {
        return;
    }
    let dir = runtime_dir();
    let log = dir.path().with_extension("log");
    let mut child = Command::new("setpriv")
        .args(["--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "--"])
        .arg(bin("sysgenidd"))
        .arg("--runtime-dir")
        .arg(dir.path())
        .args(["--source", "none", "--device", "off", "--hooks-dir", "off"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("setpriv (util-linux)");
    let up = wait_until(LONG, || {
        sysgenid::Control::connect(Some(dir.path())).is_ok()
    });
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(up, "daemon did not come up: {}", text());
    let files = tempfile::tempdir().unwrap();
    let entropy = write_file(files.path(), "e", &[3; 48]);
    let o = ctl(dir.path(), &["bump", "--entropy-file", &entropy]);
    assert_eq!(
        (o.status.code(), stdout(&o)),
        (Some(0), "1".into()),
        "{}",
        stderr(&o)
    );
    let status = sysgenid::Control::connect(Some(dir.path()))
        .unwrap()
        .status()
        .unwrap();
    let rng = status.last_change_rng.unwrap();
    assert!(!rng.reseeded, "{rng:?}");
    assert_eq!(rng.by, None);
    assert!(
        rng.not_reseeded_because
            .as_deref()
            .unwrap()
            .starts_with("EPERM: the daemon lacks CAP_SYS_ADMIN"),
        "{rng:?}"
    );
    assert_eq!(rng.entropy_mixed, 0);
    assert!(rng.entropy_error.as_deref().unwrap().starts_with("EPERM"));
    let o = ctl(dir.path(), &["status"]);
    assert!(
        stdout(&o).contains("kernel RNG:   NOT reseeded: EPERM"),
        "{}",
        stdout(&o)
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    assert!(
        text().contains("the kernel RNG was not reseeded by sysgenidd before this change: EPERM"),
        "{}",
        text()
    );
}

#[test]
fn reseed_never_is_reported_and_a_privileged_daemon_reseeds_by_default() {
    if skip_unless_root("(RNDRESEEDCRNG needs CAP_SYS_ADMIN)") {
        return;
    }
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    assert_eq!(d.status().last_change_rng, None, "no change yet");
    d.ctl(&["bump"]);
    let rng = d.status().last_change_rng.unwrap();
    assert!(
        rng.reseeded && rng.by.as_deref() == Some("sysgenidd"),
        "{rng:?}"
    );
    assert_eq!((rng.entropy_mixed, rng.entropy_error), (0, None));
    d.signal_and_wait(libc::SIGTERM);
    d.extra_restart(&["--reseed", "never"]);
    d.ctl(&["bump"]);
    let rng = d.status().last_change_rng.unwrap();
    assert!(!rng.reseeded);
    assert!(rng.not_reseeded_because.unwrap().contains("--reseed never"));
}

/// Sends `frames` on a fresh connection that said `Hello` with `version`;
/// the replies.
fn exchange(d: &Daemon, version: u16, frames: &[Vec<u8>]) -> Vec<Reply> {
    let sock = seqpacket_connect(&d.dir.join("sysgenid.sock"), LONG).unwrap();
    sock.send(
        &Request::Hello {
            version,
            role: Role::Control,
        }
        .encode(),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap();
    assert!(matches!(
        Reply::decode(&buf[..n]).unwrap(),
        Reply::Welcome { .. }
    ));
    frames
        .iter()
        .map(|f| {
            sock.send(f).unwrap();
            let n = sock.recv(&mut buf).unwrap();
            Reply::decode(&buf[..n]).unwrap()
        })
        .collect()
}

#[test]
fn the_bump_frames_of_versions_1_and_2_work_unchanged_and_details_are_checked() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    // Version 1's five bytes and version 2's flag byte, byte for byte.
    let v1 = exchange(&d, 1, &[vec![0x04, 0, 0, 0, 0]]);
    assert_eq!(v1, [Reply::Done { generation: 1 }]);
    let v2 = exchange(&d, 2, &[vec![0x04, 5, 0, 0, 0], vec![0x04, 0, 0, 0, 0, 1]]);
    assert_eq!(
        v2,
        [Reply::Done { generation: 5 }, Reply::Done { generation: 6 }]
    );
    assert_eq!(d.status().last_change_kind, ChangeKind::Unknown);
    // The details, from this crate's encoder.
    let detailed = Request::Bump {
        min_generation: 0,
        allow_exhaustion: false,
        details: BumpDetails {
            kind: ChangeKind::Restore,
            entropy: Some(Entropy::new(vec![9; 40]).unwrap()),
            hostname: Some(Hostname::new("db1").unwrap()),
        },
    };
    assert_eq!(
        exchange(&d, 2, &[detailed.encode()]),
        [Reply::Done { generation: 7 }]
    );
    let s = d.status();
    assert_eq!(s.last_change_kind, ChangeKind::Restore);
    assert_eq!(s.last_change_rng.unwrap().entropy_mixed, 40);
    // Malformed details: a protocol violation, and nothing changes.
    let mut short_entropy = vec![0x04, 0, 0, 0, 0, 2, 1, 8, 0];
    short_entropy.extend([1; 8]);
    short_entropy.push(0);
    for bad in [
        short_entropy,
        vec![0x04, 0, 0, 0, 0, 2, 7, 0, 0, 0],
        vec![0x04, 0, 0, 0, 0, 2],
    ] {
        match &exchange(&d, 2, std::slice::from_ref(&bad))[0] {
            Reply::Error(e) => {
                assert_eq!(
                    e.code,
                    sysgenid_proto::ErrorCode::ProtocolViolation,
                    "{bad:?}"
                )
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    assert_eq!(d.generation(), 7);
}
