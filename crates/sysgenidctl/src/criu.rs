//! What `sysgenidctl criu-hook` does for each CRIU action, and its
//! settings, as pure functions: CRIU runs its action scripts with no
//! arguments and says everything in the environment, so this is where the
//! environment is read and checked. The effects (entering the container's
//! namespaces, talking to its daemon) are in the binary's `criu_hook`
//! module. `docs/containers.md` explains the model.

use std::path::PathBuf;
use std::time::Duration;

/// The runtime directory inside the container, unless
/// `SYSGENID_CRIU_RUNTIME_DIR` says otherwise.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/sysgenid";

/// The freeze timeout unless `SYSGENID_CRIU_FREEZE_TIMEOUT_MS` says
/// otherwise.
pub const DEFAULT_FREEZE_TIMEOUT_MS: u32 = 10_000;

/// What the hook does for one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// `pre-dump`: freeze every participant before CRIU freezes the tasks;
    /// a failure fails the dump (strict mode).
    Freeze,
    /// `post-dump`, and `network-unlock` after a dump: thaw. The tasks are
    /// still frozen by CRIU at these actions, so the daemon answers once
    /// CRIU lets them run (`--leave-running`, or a failed dump); the hook
    /// does not wait for that answer.
    Thaw,
    /// `post-resume`: report the restore (a new generation, source `criu`,
    /// kind `restore`).
    Restore,
    /// Any other action: nothing.
    Nothing,
}

/// The plan for `action` (`CRTOOLS_SCRIPT_ACTION`). `dumping` says whether
/// this CRIU process ran `pre-dump` for this container (restores run
/// `network-unlock` too, and must not thaw: a clone thaws by itself once
/// its participants renewed).
pub fn plan(action: &str, dumping: bool) -> Plan {
    match action {
        "pre-dump" => Plan::Freeze,
        "post-dump" => Plan::Thaw,
        "network-unlock" if dumping => Plan::Thaw,
        "post-resume" => Plan::Restore,
        _ => Plan::Nothing,
    }
}

/// The hook's settings, from its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `CRTOOLS_SCRIPT_ACTION`.
    pub action: String,
    /// `CRTOOLS_INIT_PID`: the host pid of the container's init (absent at
    /// `pre-restore`).
    pub init_pid: Option<i32>,
    /// The runtime directory inside the container (absolute).
    pub runtime_dir: PathBuf,
    /// How long `pre-dump` waits for every participant to confirm.
    pub freeze_timeout: Duration,
    /// Whether a failure fails CRIU's operation (`SYSGENID_CRIU_STRICT`,
    /// default 1).
    pub strict: bool,
}

/// A setting that cannot be used; nothing was done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?}: {why}")]
pub struct BadSetting {
    /// The variable.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What is wrong.
    pub why: &'static str,
}

impl Settings {
    /// Reads the settings through `var` (the environment, in the binary).
    /// `Ok(None)`: not run by CRIU (`CRTOOLS_SCRIPT_ACTION` unset).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Settings>, BadSetting> {
        let Some(action) = var("CRTOOLS_SCRIPT_ACTION") else {
            return Ok(None);
        };
        let bad = |name, value: String, why| BadSetting { name, value, why };
        let init_pid = match var("CRTOOLS_INIT_PID") {
            None => None,
            Some(v) => match v.trim().parse::<i32>() {
                Ok(pid) if pid > 0 => Some(pid),
                _ => return Err(bad("CRTOOLS_INIT_PID", v, "not a process id")),
            },
        };
        let runtime_dir = match var("SYSGENID_CRIU_RUNTIME_DIR") {
            None => PathBuf::from(DEFAULT_RUNTIME_DIR),
            Some(v) if v.starts_with('/') && !v.split('/').any(|c| c == "..") => PathBuf::from(v),
            Some(v) => {
                return Err(bad(
                    "SYSGENID_CRIU_RUNTIME_DIR",
                    v,
                    "must be an absolute path inside the container, without `..`",
                ))
            }
        };
        let freeze_timeout = match var("SYSGENID_CRIU_FREEZE_TIMEOUT_MS") {
            None => DEFAULT_FREEZE_TIMEOUT_MS,
            Some(v) => match v.trim().parse::<u32>() {
                Ok(ms) if ms > 0 => ms,
                _ => {
                    return Err(bad(
                        "SYSGENID_CRIU_FREEZE_TIMEOUT_MS",
                        v,
                        "not a number of milliseconds above 0",
                    ))
                }
            },
        };
        let strict = match var("SYSGENID_CRIU_STRICT").as_deref().map(str::trim) {
            None | Some("1") | Some("yes") | Some("true") => true,
            Some("0") | Some("no") | Some("false") => false,
            Some(v) => {
                return Err(bad(
                    "SYSGENID_CRIU_STRICT",
                    v.to_string(),
                    "must be 1 (a failure fails the checkpoint) or 0 (log it and go on)",
                ))
            }
        };
        Ok(Some(Settings {
            action,
            init_pid,
            runtime_dir,
            freeze_timeout: Duration::from_millis(u64::from(freeze_timeout)),
            strict,
        }))
    }

    /// The runtime directory as the host reaches it: through the
    /// container's root, `/proc/PID/root`.
    pub fn host_runtime_dir(&self, init_pid: i32) -> PathBuf {
        let inside = self
            .runtime_dir
            .strip_prefix("/")
            .unwrap_or(&self.runtime_dir);
        PathBuf::from(format!("/proc/{init_pid}/root")).join(inside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Option<Settings>, BadSetting> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn each_action_has_its_plan() {
        assert_eq!(plan("pre-dump", false), Plan::Freeze);
        assert_eq!(plan("post-dump", true), Plan::Thaw);
        assert_eq!(plan("network-unlock", true), Plan::Thaw);
        assert_eq!(
            plan("network-unlock", false),
            Plan::Nothing,
            "a restore's network-unlock must not thaw the clone before it renewed"
        );
        assert_eq!(plan("post-resume", false), Plan::Restore);
        for other in [
            "network-lock",
            "pre-restore",
            "setup-namespaces",
            "post-setup-namespaces",
            "post-restore",
            "pre-resume",
            "orphan-pts-master",
            "",
            "something-new",
        ] {
            assert_eq!(plan(other, true), Plan::Nothing, "{other}");
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(settings(&[]).unwrap(), None, "not run by CRIU");
        let s = settings(&[
            ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
            ("CRTOOLS_INIT_PID", "42"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.action, "pre-dump");
        assert_eq!(s.init_pid, Some(42));
        assert_eq!(s.runtime_dir, PathBuf::from("/run/sysgenid"));
        assert_eq!(s.freeze_timeout, Duration::from_millis(10_000));
        assert!(s.strict);
        assert_eq!(
            s.host_runtime_dir(42),
            PathBuf::from("/proc/42/root/run/sysgenid")
        );
        let s = settings(&[("CRTOOLS_SCRIPT_ACTION", "pre-restore")])
            .unwrap()
            .unwrap();
        assert_eq!(s.init_pid, None);
    }

    #[test]
    fn overrides() {
        let s = settings(&[
            ("CRTOOLS_SCRIPT_ACTION", "pre-dump"),
            ("SYSGENID_CRIU_RUNTIME_DIR", "/var/run/sg"),
            ("SYSGENID_CRIU_FREEZE_TIMEOUT_MS", "2500"),
            ("SYSGENID_CRIU_STRICT", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(s.runtime_dir, PathBuf::from("/var/run/sg"));
        assert_eq!(s.freeze_timeout, Duration::from_millis(2500));
        assert!(!s.strict);
        assert_eq!(
            s.host_runtime_dir(7),
            PathBuf::from("/proc/7/root/var/run/sg")
        );
    }

    #[test]
    fn bad_settings_are_named() {
        for (name, value) in [
            ("CRTOOLS_INIT_PID", "abc"),
            ("CRTOOLS_INIT_PID", "0"),
            ("SYSGENID_CRIU_RUNTIME_DIR", "run/sysgenid"),
            ("SYSGENID_CRIU_RUNTIME_DIR", "/run/../../etc"),
            ("SYSGENID_CRIU_FREEZE_TIMEOUT_MS", "0"),
            ("SYSGENID_CRIU_FREEZE_TIMEOUT_MS", "ten"),
            ("SYSGENID_CRIU_STRICT", "maybe"),
        ] {
            let err =
                settings(&[("CRTOOLS_SCRIPT_ACTION", "pre-dump"), (name, value)]).unwrap_err();
            assert_eq!(err.name, name);
            assert!(err.to_string().contains(value), "{err}");
        }
    }
}
