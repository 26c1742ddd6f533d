//! Restore-signal sources for `sysgenidd`.
//!
//! This crate exists so the daemon does not have to know *how* a
//! "this VM/container was restored from a snapshot" signal reaches a guest.
//! Each way the kernel or hypervisor can tell us is wrapped in one
//! [`Source`]: it blocks in its own thread and calls `emit` once per restore
//! signal. The daemon merges signals from several sources with the
//! [`coalesce::Coalescer`] and bumps its generation counter once per restore.
//!
//! No source here changes any state; they only observe.
//!
//! # Which kernel / hypervisor gives which signal
//!
//! | source    | what it watches | kernel | hypervisor / device |
//! |-----------|-----------------|--------|---------------------|
//! | `vmfork`  | `/dev/kmsg` record `random: crng reseeded due to virtual machine fork` (facility 0 = kernel only) | Linux 5.18+ with `CONFIG_VMGENID` | QEMU `-device vmgenid`, Firecracker (VMGenID), Hyper-V |
//! | `uevent`  | `NETLINK_KOBJECT_UEVENT` `change` event with `NEW_VMGENID=1` from the kernel (port id 0) | Linux 6.8.0 – 6.8.7 only (added in 6.8, reverted in 6.8.8 / 6.9) | same VMGenID devices as `vmfork` |
//! | `vmclock` | `vm_generation_counter` in the `/dev/vmclock0` shared page (`VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT`); `poll()` wake-ups when `VMCLOCK_FLAG_NOTIFICATION_PRESENT` | Linux 7.0+ (`ptp_vmclock` with generation counter + notifications) | Firecracker 1.15+ (`AMZNC10C` / `VMCLOCK` ACPI device) |
//! | `manual`  | always on: `sysgenidctl bump`; accepted by [`select`] and ignored here | any | any |
//!
//! The `vmfork` record and the `uevent` come from the same VMGenID
//! notification, so on a 6.8.x guest both fire for one restore; the
//! [`coalesce`] module merges them into one bump.
//!
//! # Trust
//!
//! * `vmfork` accepts only facility-0 records: userspace writers of
//!   `/dev/kmsg` get facility 1 (`user`) and the kernel rewrites a requested
//!   facility 0 to `user`, so the record cannot be forged from userspace.
//! * `uevent` accepts only datagrams whose netlink source port id is 0 and
//!   whose `SCM_CREDENTIALS` pid is 0 (the kernel). Note that a process with
//!   `CAP_SYS_ADMIN` over the network namespace can *inject* a uevent that the
//!   kernel re-broadcasts from port 0 (uevent injection, Linux 4.18+); such a
//!   process could also just run `sysgenidctl bump`.
//! * `vmclock` reads a page written by the hypervisor only.
//!
//! # Choosing sources
//!
//! [`select`] parses the daemon's `--source LIST` value (`auto`, `none`, or a
//! comma separated list of names) and returns the opened sources plus, for
//! status output, the ones that are inactive and why.

#![warn(missing_docs)]

pub mod coalesce;
pub mod kmsg;
pub mod uevent;
pub mod vmclock;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use coalesce::{Coalescer, Offer};

/// One restore signal seen by a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEvent {
    /// [`Source::name`] of the source that saw it.
    pub source: &'static str,
    /// Human readable detail for logs and status (what exactly was seen).
    pub detail: String,
    /// The kernel's own timestamp of the signal, in microseconds since
    /// boot: a `/dev/kmsg` record's `USEC` field (the printk clock, which
    /// counts like `CLOCK_MONOTONIC`). `None` when the signal carries no
    /// timestamp (vmclock, uevent, lost records). The daemon reports the
    /// lag from it to publication.
    pub kernel_time_us: Option<u64>,
}

/// A restore-signal source. One instance runs in one thread, or, when it
/// can ([`Source::into_poll_source`]), in the daemon's event loop.
pub trait Source: Send + 'static {
    /// Short stable name: "vmfork", "vmclock", "uevent".
    fn name(&self) -> &'static str;
    /// One line saying what it watches (e.g. "/dev/kmsg (kernel records only)").
    fn describe(&self) -> String;
    /// Blocks forever in its own thread, calling `emit` once per restore signal.
    /// Returns only on an unrecoverable error.
    fn run(self: Box<Self>, emit: &mut dyn FnMut(SourceEvent)) -> Result<(), SourceError>;
    /// The same source as a [`PollSource`], served from the event loop's
    /// own poll set, or itself back if it needs a thread. A source served
    /// that way saves a thread wake-up and a hand-over on every signal: the
    /// restore window is one wake-up shorter.
    fn into_poll_source(self: Box<Self>) -> Result<Box<dyn PollSource>, Box<dyn Source>>;
}

/// What a [`PollSource`] wants after [`PollSource::on_readable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Everything was read: wait for the descriptor to be readable again.
    Drained,
    /// More may be waiting (a read budget was used up): call again soon,
    /// after serving others.
    More,
    /// The descriptor was replaced (a FIFO reopened after its writer left):
    /// register the new [`PollSource::fd`].
    Reopened,
}

/// A source whose waiting is one descriptor becoming readable, so the
/// daemon's event loop can serve it from its own poll set (edge-triggered:
/// [`PollSource::on_readable`] reads until it would block, or says so).
pub trait PollSource: Send {
    /// Short stable name, as [`Source::name`].
    fn name(&self) -> &'static str;
    /// The descriptor to wait on.
    fn fd(&self) -> std::os::fd::BorrowedFd<'_>;
    /// Reads what is there without blocking, calling `emit` once per
    /// restore signal. An error ends the source.
    fn on_readable(&mut self, emit: &mut dyn FnMut(SourceEvent)) -> Result<Readiness, SourceError>;
}

/// Errors from selecting, opening or running a source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `--source` named something that is not a source.
    #[error("unknown source {name:?}; valid sources are: {valid}")]
    UnknownSource {
        /// The name as given.
        name: String,
        /// Comma separated list of valid names.
        valid: &'static str,
    },
    /// `--source` value is malformed (empty, or `auto`/`none` mixed with names).
    #[error("invalid --source value {spec:?}: {reason}")]
    InvalidSpec {
        /// The whole value as given.
        spec: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A source cannot work on this machine (device missing, feature absent).
    #[error("source {name} is unavailable: {reason}")]
    Unavailable {
        /// Source name.
        name: &'static str,
        /// Why, in a form fit for status output.
        reason: String,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "reading /dev/kmsg".
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The vmclock page is (or became) invalid.
    #[error("vmclock: {0}")]
    Vmclock(#[from] vmclock::VmclockError),
}

impl SourceError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        SourceError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Paths and timings the sources use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceConfig {
    /// Kernel log device (default `/dev/kmsg`).
    pub kmsg_path: PathBuf,
    /// vmclock device (default `/dev/vmclock0`).
    pub vmclock_path: PathBuf,
    /// How often `vmclock` re-reads the page when the device does not
    /// advertise `VMCLOCK_FLAG_NOTIFICATION_PRESENT` (default 1 s).
    pub vmclock_interval: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kmsg_path: PathBuf::from(kmsg::DEFAULT_PATH),
            vmclock_path: PathBuf::from(vmclock::DEFAULT_PATH),
            vmclock_interval: vmclock::DEFAULT_INTERVAL,
        }
    }
}

/// Names accepted in `--source` besides `auto` / `none`.
pub const SOURCE_NAMES: [&str; 3] = [kmsg::NAME, vmclock::NAME, uevent::NAME];

const VALID_NAMES: &str = "auto, none, vmfork, vmclock, uevent, manual";

/// Result of [`select`]: the opened sources and the ones not running.
pub struct Selection {
    /// Opened sources, ready to be moved into their threads.
    pub active: Vec<Box<dyn Source>>,
    /// `(name, reason)` for each source that is not running, for status
    /// output, e.g. `("vmclock", "/dev/vmclock0 not found")`.
    pub inactive: Vec<(&'static str, String)>,
}

impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selection")
            .field(
                "active",
                &self
                    .active
                    .iter()
                    .map(|s| (s.name(), s.describe()))
                    .collect::<Vec<_>>(),
            )
            .field("inactive", &self.inactive)
            .finish()
    }
}

impl Selection {
    /// Names of the active sources, in selection order.
    pub fn active_names(&self) -> Vec<&'static str> {
        self.active.iter().map(|s| s.name()).collect()
    }
}

/// Parse a `--source LIST` value and open the chosen sources.
///
/// * `auto`: every source that can be opened here (kmsg readable, vmclock
///   device present with a generation counter, uevent socket bindable);
///   the rest are reported in [`Selection::inactive`] with the reason.
/// * `none`: no sources (manual bumps only).
/// * `vmfork,vmclock,uevent` (any subset, any order, duplicates ignored):
///   exactly those; a named source that cannot be opened is an error, since
///   the operator asked for it explicitly. `manual` is accepted and ignored
///   (manual bumps are always on).
pub fn select(spec: &str, config: &SourceConfig) -> Result<Selection, SourceError> {
    let invalid = |reason| SourceError::InvalidSpec {
        spec: spec.to_owned(),
        reason,
    };
    let items: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err(invalid("empty source list"));
    }
    let has_keyword = items.iter().any(|i| *i == "auto" || *i == "none");
    if has_keyword && items.len() > 1 {
        return Err(invalid("`auto` and `none` must be used alone"));
    }

    let mut sel = Selection {
        active: Vec::new(),
        inactive: Vec::new(),
    };
    match items[0] {
        "auto" => {
            for name in SOURCE_NAMES {
                match open_source(name, config) {
                    Ok(src) => sel.active.push(src),
                    Err(e) => sel.inactive.push((name, inactive_reason(e))),
                }
            }
        }
        "none" => {
            for name in SOURCE_NAMES {
                sel.inactive
                    .push((name, "disabled (--source none)".to_owned()));
            }
        }
        _ => {
            let mut wanted: Vec<&'static str> = Vec::new();
            for item in &items {
                if *item == "manual" {
                    continue;
                }
                let name = SOURCE_NAMES
                    .iter()
                    .copied()
                    .find(|n| n == item)
                    .ok_or_else(|| SourceError::UnknownSource {
                        name: (*item).to_owned(),
                        valid: VALID_NAMES,
                    })?;
                if !wanted.contains(&name) {
                    wanted.push(name);
                }
            }
            for name in wanted.iter().copied() {
                sel.active.push(open_source(name, config)?);
            }
            for name in SOURCE_NAMES {
                if !wanted.contains(&name) {
                    sel.inactive.push((name, "not selected".to_owned()));
                }
            }
        }
    }
    Ok(sel)
}

fn open_source(name: &'static str, config: &SourceConfig) -> Result<Box<dyn Source>, SourceError> {
    Ok(match name {
        kmsg::NAME => Box::new(kmsg::KmsgSource::open(&config.kmsg_path)?),
        vmclock::NAME => Box::new(vmclock::VmclockSource::open(
            &config.vmclock_path,
            config.vmclock_interval,
        )?),
        uevent::NAME => Box::new(uevent::UeventSource::open()?),
        _ => unreachable!("open_source called with unknown name {name}"),
    })
}

/// Short reason for status output ("/dev/vmclock0 not found").
fn inactive_reason(e: SourceError) -> String {
    match e {
        SourceError::Unavailable { reason, .. } => reason,
        SourceError::Io { context, source } if source.kind() == io::ErrorKind::NotFound => {
            format!("{context}: not found")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing_config() -> SourceConfig {
        SourceConfig {
            kmsg_path: "/nonexistent/kmsg".into(),
            vmclock_path: "/nonexistent/vmclock0".into(),
            vmclock_interval: Duration::from_millis(10),
        }
    }

    #[test]
    fn defaults() {
        let c = SourceConfig::default();
        assert_eq!(c.kmsg_path, PathBuf::from("/dev/kmsg"));
        assert_eq!(c.vmclock_path, PathBuf::from("/dev/vmclock0"));
        assert_eq!(c.vmclock_interval, Duration::from_secs(1));
    }

    #[test]
    fn unknown_name_lists_valid_names() {
        let err = select("vmfork,bogus", &missing_config()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"bogus\""), "{msg}");
        for n in ["vmfork", "vmclock", "uevent", "manual", "auto", "none"] {
            assert!(msg.contains(n), "{msg} lacks {n}");
        }
    }

    #[test]
    fn bad_specs() {
        for spec in ["", " , ", "auto,vmfork", "none,auto"] {
            assert!(
                matches!(
                    select(spec, &missing_config()),
                    Err(SourceError::InvalidSpec { .. })
                ),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn none_and_manual() {
        let sel = select("none", &missing_config()).unwrap();
        assert!(sel.active.is_empty());
        assert_eq!(sel.inactive.len(), 3);
        let sel = select("manual", &missing_config()).unwrap();
        assert!(sel.active.is_empty());
        assert!(sel.inactive.iter().all(|(_, r)| r == "not selected"));
    }

    #[test]
    fn auto_reports_missing_devices() {
        let sel = select("auto", &missing_config()).unwrap();
        let reasons: std::collections::HashMap<_, _> = sel.inactive.iter().cloned().collect();
        assert_eq!(reasons["vmclock"], "/nonexistent/vmclock0 not found");
        assert!(
            reasons["vmfork"].contains("/nonexistent/kmsg"),
            "{reasons:?}"
        );
        assert!(!sel.active_names().contains(&"vmfork"));
        assert!(!sel.active_names().contains(&"vmclock"));
    }

    #[test]
    fn explicit_missing_device_is_an_error() {
        let err = select("vmclock", &missing_config()).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/vmclock0 not found"),
            "{err}"
        );
    }

    #[test]
    fn explicit_vmfork_on_real_kmsg() {
        // Runs wherever /dev/kmsg is readable (root in the CI sandbox).
        if std::fs::File::open("/dev/kmsg").is_err() {
            eprintln!("skipping: /dev/kmsg not readable");
            return;
        }
        let sel = select("manual, vmfork,vmfork", &SourceConfig::default()).unwrap();
        assert_eq!(sel.active_names(), vec!["vmfork"]);
        assert_eq!(sel.active[0].describe(), "/dev/kmsg (kernel records only)");
        let mut inactive: Vec<_> = sel.inactive.iter().map(|(n, _)| *n).collect();
        inactive.sort_unstable();
        assert_eq!(inactive, vec!["uevent", "vmclock"]);
    }
}
