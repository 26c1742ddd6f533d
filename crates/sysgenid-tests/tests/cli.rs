//! `sysgenidctl`'s contract: output formats and exit codes.

use sysgenid_tests::*;

#[test]
fn get_bump_and_status() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let o = d.ctl(&["get"]);
    assert!(o.status.success());
    assert_eq!(stdout(&o), "0");
    let o = d.ctl(&["bump", "--min", "7"]);
    assert_eq!((o.status.code(), stdout(&o)), (Some(0), "7".to_string()));
    let o = d.ctl(&["status", "--json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["generation"], 7);
    assert_eq!(v["epoch"].as_str().unwrap().len(), 32);
    assert_eq!(v["last_change_sources"][0], "manual");
    for key in [
        "watchers",
        "tracked",
        "outdated",
        "uptime_ms",
        "last_change_unix_ms",
    ] {
        assert!(!v[key].is_null(), "status has {key}");
    }
    let o = d.ctl(&["status"]);
    assert!(stdout(&o).contains("generation:   7"), "{}", stdout(&o));
}

#[test]
fn watch_runs_the_command_with_the_generation_then_acks() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let marker = dir.path().join("seen");
    let script = format!("echo $SYSGENID_GENERATION >> {}", marker.display());
    let child = ctl_command(dir.path())
        .args(["watch", "--count", "2", "--exec", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_watchers_registered(1);
    d.ctl(&["bump"]);
    assert!(wait_until(std::time::Duration::from_secs(10), || d
        .status()
        .outdated
        == 0));
    d.ctl(&["bump"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(stdout(&out), "1\n2");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "1\n2\n");
    assert_eq!(d.status().outdated, 0, "acknowledged after the command");
}

#[test]
fn wait_watchers_times_out_with_exit_3() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let _stuck = d.watcher();
    d.ctl(&["bump"]);
    let o = d.ctl(&["wait-watchers", "--timeout-ms", "100"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("1 tracked watcher"), "{}", stderr(&o));
}

#[test]
fn daemon_not_running_is_exit_1_naming_the_socket() {
    let dir = runtime_dir();
    let o = ctl(dir.path(), &["get"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("sysgenid.sock") && err.contains("sysgenidd"),
        "{err}"
    );
}

#[test]
fn usage_errors_are_exit_2_and_help_teaches() {
    let dir = runtime_dir();
    assert_eq!(ctl(dir.path(), &["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        ctl(dir.path(), &["bump", "--min", "-1"]).status.code(),
        Some(2)
    );
    let help = ctl(dir.path(), &["--help"]);
    let text = stdout(&help);
    assert!(
        text.contains("Exit codes") && text.contains("permission denied"),
        "{text}"
    );
}

#[test]
fn a_reader_that_went_away_ends_the_output_quietly() {
    // `sysgenidctl status | head -1`: the pipe's reader is gone before the
    // output is written. Ends with status 0 and no panic message.
    let dir = runtime_dir();
    let _d = Daemon::start(dir.path());
    let (reader, writer) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let out = ctl_command(dir.path())
        .arg("status")
        .stdout(std::process::Stdio::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}
