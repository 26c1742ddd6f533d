//! Spoofing and privilege: forged restore signals, unprivileged and
//! capability-less clients, and files planted in the runtime directory.
//!
//! Most of these need root (the test suite runs as root in CI); each says
//! SKIPPED and returns when it cannot run. Writing to /dev/kmsg leaves one
//! clearly labelled line in the machine's kernel log.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sysgenid_tests::*;

const NOBODY: u32 = 65534;
const HELPER_ENV: &str = "SYSGENID_SPOOF_HELPER";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn source_status(d: &Daemon, name: &str) -> sysgenid::SourceStatus {
    d.status()
        .sources
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no source {name} in status"))
}

// ---------------------------------------------------------------- uevent

/// A NETLINK_KOBJECT_UEVENT socket of our own (port id assigned by the
/// kernel), optionally joined to the kernel's group 1.
fn uevent_socket(groups: u32) -> OwnedFd {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_KOBJECT_UEVENT,
        )
    };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero sockaddr_nl is valid; bind reads exactly its size.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = groups;
    // SAFETY: `addr` is a live sockaddr_nl of the stated length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    fd
}

/// Multicasts `payload` to group 1 (where the kernel sends uevents), with
/// `SCM_CREDENTIALS` naming `cred_pid` if given. Returns the send result.
fn send_uevent(fd: &OwnedFd, payload: &[u8], cred_pid: Option<i32>) -> std::io::Result<()> {
    // SAFETY: all-zero sockaddr_nl / msghdr are valid values.
    let mut dest: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    dest.nl_family = libc::AF_NETLINK as u16;
    dest.nl_pid = 0;
    dest.nl_groups = 1;
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::addr_of_mut!(dest).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_nl>() as u32;
    msg.msg_iov = std::ptr::addr_of_mut!(iov);
    msg.msg_iovlen = 1;
    if let Some(pid) = cred_pid {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure computation.
        msg.msg_controllen =
            unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) } as usize;
        // SAFETY: msg_control points to 64 aligned bytes, more than
        // CMSG_SPACE(ucred); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(std::ptr::addr_of!(msg));
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_CREDENTIALS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::ucred>() as u32) as _;
            let cred = libc::ucred {
                pid,
                uid: 0,
                gid: 0,
            };
            libc::CMSG_DATA(cmsg)
                .cast::<libc::ucred>()
                .write_unaligned(cred);
        }
    }
    // SAFETY: every pointer in msg refers to a live local of the stated size.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), std::ptr::addr_of!(msg), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn recv_timeout(fd: &OwnedFd, buf: &mut [u8], ms: i32) -> Option<usize> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    // SAFETY: buf is live and writable for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    (n >= 0).then_some(n as usize)
}

#[test]
fn userspace_new_vmgenid_uevent_does_not_bump() {
    if !is_root() {
        eprintln!("SKIPPED: multicasting to the uevent group needs CAP_NET_ADMIN");
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--source", "uevent"]);
    let src = source_status(&d, "uevent");
    assert!(src.active, "uevent source not active: {src:?}");
    // Our own listener on group 1: the control that the forgery was really
    // multicast to every uevent listener, the daemon included.
    let listener = uevent_socket(1);
    let sender = uevent_socket(0);
    let payload = b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0\
DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0\
DRIVER=vmgenid\0SYSGENID_TEST=userspace-forgery\0SEQNUM=4000000000\0";
    send_uevent(&sender, payload, None).expect("multicast a forged uevent");
    let mut buf = vec![0u8; 8192];
    let got = recv_timeout(&listener, &mut buf, 5000).expect("forgery delivered to group 1");
    assert_eq!(&buf[..got], &payload[..]);
    // Forged credentials: pid 0 (the kernel's) is refused by the kernel
    // itself (ESRCH); another live pid (1) is accepted but is not 0.
    let zero = send_uevent(&sender, payload, Some(0));
    assert!(zero.is_err(), "the kernel let userspace claim pid 0");
    send_uevent(&sender, payload, Some(1)).expect("root may claim pid 1");
    assert!(
        wait_until(Duration::from_secs(10), || d
            .log()
            .matches("ignoring uevent not sent by the kernel")
            .count()
            >= 2),
        "the daemon never saw the forgeries; log:\n{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        d.generation(),
        0,
        "a userspace uevent bumped the generation"
    );
    assert_eq!(source_status(&d, "uevent").events, 0);
}

// ---------------------------------------------------------------- kmsg

#[test]
fn userspace_kmsg_vmfork_record_does_not_bump() {
    // The source follows /dev/kmsg, which a container may have but not
    // let even root read.
    if !is_root() || std::fs::File::open("/dev/kmsg").is_err() {
        eprintln!("SKIPPED: needs root and a readable /dev/kmsg");
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--source", "vmfork"]);
    let src = source_status(&d, "vmfork");
    assert!(src.active, "vmfork source not active: {src:?}");
    // Our own reader from the end of the log, to see what the kernel made
    // of the forgery.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .unwrap();
    use std::io::{Read, Seek, SeekFrom};
    reader.seek(SeekFrom::End(0)).unwrap();
    let tag = format!("sysgenid fault_spoof test pid {}", std::process::id());
    // "<6>" asks for facility 0 (kernel), level 6: the kernel must rewrite
    // the facility to 1 (user) for anything written from userspace.
    let text = format!(
        "<6>random: crng reseeded due to virtual machine fork [{tag}: userspace forgery, ignore]\n"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let mut found = None;
    let mut buf = vec![0u8; 8192];
    for _ in 0..200 {
        match reader.read(&mut buf) {
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]).to_string();
                if rec.contains(&tag) {
                    found = Some(rec);
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
            Err(e) => panic!("reading /dev/kmsg: {e}"),
        }
    }
    let rec = found.expect("our record in the kernel log");
    let prefix: u32 = rec.split(',').next().unwrap().parse().unwrap();
    assert_eq!(
        prefix >> 3,
        1,
        "userspace record not marked LOG_USER: {rec}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        d.generation(),
        0,
        "a userspace kernel-log record bumped; log:\n{}",
        d.log()
    );
    assert_eq!(source_status(&d, "vmfork").events, 0);
    assert!(!d.log().contains("kernel VM fork record"), "{}", d.log());
}

// ------------------------------------------------------- unprivileged bumps

/// Runs inside a child process started by [`run_helper`]: tries to bump
/// through the library as a control connection and as a watcher, and
/// checks the outcome matches `SYSGENID_SPOOF_HELPER`
/// (`denied:<dir>` or `allowed:<dir>`). Does nothing in a normal run.
#[test]
fn helper_client_in_a_child_process() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let (expect, dir) = spec.split_once(':').unwrap();
    let dir = Path::new(dir);
    let mut control = sysgenid::Control::connect(Some(dir)).expect("connect as control");
    let mut watcher = sysgenid::Watcher::builder()
        .runtime_dir(dir)
        .open()
        .expect("open a watcher");
    let by_control = control.bump(0);
    let by_watcher = watcher.trigger_update(1000);
    match expect {
        "denied" => {
            for r in [by_control, by_watcher] {
                let e = r.expect_err("bump allowed");
                assert!(matches!(e, sysgenid::Error::PermissionDenied(_)), "{e:?}");
                assert_eq!(e.errno(), libc::EACCES);
                assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
            }
            // Everything else still works.
            control.status().unwrap();
        }
        "allowed" => {
            by_control.expect("bump by a capable client");
            by_watcher.expect("trigger_update by a capable client");
        }
        other => panic!("unknown expectation {other}"),
    }
}

fn helper_command(expect: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    clean_env(&mut cmd)
        .args([
            "--exact",
            "helper_client_in_a_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, format!("{expect}:{}", dir.display()));
    cmd
}

fn run_helper(mut cmd: Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success() && stdout(&out).contains("1 passed"),
        "helper failed ({:?}):\n{}\n{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
}

/// Drops every capability from the bounding set except `keep`, so that
/// the exec'd uid-0 process has only `keep` (or none) effective.
fn drop_caps_except(cmd: &mut Command, keep: Option<u32>) {
    // SAFETY: the closure only makes prctl(2) calls, which are
    // async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for cap in 0..64u32 {
                if Some(cap) != keep {
                    libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
                }
            }
            Ok(())
        });
    }
}

#[test]
fn nobody_cannot_bump_through_the_library() {
    if skip_unless_root("to run a client as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut cmd = helper_command("denied", dir.path());
    cmd.uid(NOBODY).gid(NOBODY);
    run_helper(cmd);
    assert_eq!(d.generation(), 0);
    assert!(d.log().contains("uid 65534"), "{}", d.log());
}

#[test]
fn uid_0_without_capabilities_cannot_bump_and_checkpoint_restore_can() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut cmd = helper_command("denied", dir.path());
    drop_caps_except(&mut cmd, None);
    run_helper(cmd);
    assert_eq!(d.generation(), 0, "capability-less root bumped");
    // CAP_CHECKPOINT_RESTORE (40) alone is enough, as in the seed.
    let mut cmd = helper_command("allowed", dir.path());
    drop_caps_except(&mut cmd, Some(40));
    run_helper(cmd);
    assert_eq!(d.generation(), 1000);
}

#[test]
fn root_of_a_user_namespace_cannot_bump() {
    if !is_root() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: cannot create user namespaces here");
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let inner = helper_command("denied", dir.path());
    let mut cmd = Command::new("unshare");
    cmd.args(["--user", "--map-root-user", "--"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| v.map(|v| (k, v))));
    run_helper(cmd);
    assert_eq!(d.generation(), 0, "user-namespace root bumped");
}

// ------------------------------------------------------- runtime directory

/// Runs the daemon on `rt`, expects it to refuse, returns its stderr.
fn refused(rt: &Path) -> String {
    let out = sysgenidd_command(rt, &[]).output().unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "daemon started on {rt:?}: {err}");
    err
}

fn precious(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("precious");
    std::fs::write(&target, b"precious").unwrap();
    target
}

#[test]
fn planted_symlink_at_the_page_path_is_refused_not_followed() {
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let target = precious(dir.path());
    std::os::unix::fs::symlink(&target, rt.join("generation")).unwrap();
    let err = refused(&rt);
    assert!(
        err.contains("refusing") && err.contains("generation"),
        "{err}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o644,
        "target's mode untouched"
    );
}

#[test]
fn planted_hard_link_at_the_page_path_is_refused() {
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let target = precious(dir.path());
    std::fs::hard_link(&target, rt.join("generation")).unwrap();
    let err = refused(&rt);
    assert!(err.contains("hard links"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

#[test]
fn foreign_owned_page_is_refused() {
    if skip_unless_root("to chown") {
        return;
    }
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let page = rt.join("generation");
    std::fs::write(&page, vec![0u8; 4096]).unwrap();
    std::os::unix::fs::chown(&page, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = refused(&rt);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(std::fs::read(&page).unwrap(), vec![0u8; 4096]);
    assert_eq!(std::fs::metadata(&page).unwrap().uid(), NOBODY);
}

#[test]
fn foreign_owned_socket_and_non_socket_at_the_socket_path_are_refused() {
    if skip_unless_root("to chown") {
        return;
    }
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let sock = rt.join("sysgenid.sock");
    let planted = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    std::os::unix::fs::chown(&sock, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = refused(&rt);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().uid(),
        NOBODY,
        "not replaced"
    );
    drop(planted);
    std::fs::remove_file(&sock).unwrap();
    std::fs::write(&sock, b"not a socket").unwrap();
    let err = refused(&rt);
    assert!(err.contains("expected a Socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}

#[test]
fn foreign_owned_runtime_dir_is_refused() {
    if skip_unless_root("to chown") {
        return;
    }
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    std::os::unix::fs::chown(&rt, Some(NOBODY), Some(NOBODY)).unwrap();
    let err = refused(&rt);
    assert!(err.contains("owned by uid 65534"), "{err}");
    assert_eq!(
        std::fs::read_dir(&rt).unwrap().count(),
        0,
        "nothing created"
    );
    // A symlink to a directory of ours is refused too.
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = refused(&link);
    assert!(err.contains("symlink"), "{err}");
    assert_eq!(std::fs::read_dir(&real).unwrap().count(), 0);
}

#[test]
fn planted_symlinks_at_the_state_and_lock_paths_are_not_followed() {
    for name in ["state", "lock"] {
        let dir = runtime_dir();
        let rt = dir.path().join("rt");
        std::fs::create_dir(&rt).unwrap();
        let target = precious(dir.path());
        std::os::unix::fs::symlink(&target, rt.join(name)).unwrap();
        let err = refused(&rt);
        assert!(!err.is_empty());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious", "{name}");
    }
    // A symlink at an unused name (`state.tmp`, the temporary of the
    // earlier rename-based state file) is never written through.
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let target = precious(dir.path());
    std::os::unix::fs::symlink(&target, rt.join("state.tmp")).unwrap();
    let d = Daemon::start(&rt);
    d.control().bump(0).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
}

use std::os::unix::fs::OpenOptionsExt;
