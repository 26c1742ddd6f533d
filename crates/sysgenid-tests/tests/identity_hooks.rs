//! The clone-identity hooks (`packaging/hooks/`: machine-id, ssh-host-keys,
//! hostname, network, clock; docs/lifecycle.md, "Clone identity") run as
//! the daemon runs them, as processes, against a throwaway root
//! (`SYSGENID_HOOKS_ROOT`) with stand-ins for systemctl, hostnamectl,
//! chronyc, dhclient and dhcpcd first on PATH that record their calls (the
//! real ssh-keygen when installed). For each kind of change: what changed,
//! what did not, idempotency, exit codes. Then `sysgenidctl hooks` (list,
//! enable, disable, root only), and the daemon running enabled shipped
//! hooks, where a failing one keeps the change unacknowledged and
//! `wait-watchers` times out naming it, `bump --kind clone --hostname`
//! renews the identity in order and `bump --kind restore` keeps it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use sysgenid_tests::*;

const OLD_ID: &str = "0123456789abcdef0123456789abcdef";
const HOOKS: [&str; 5] = [
    "machine-id",
    "ssh-host-keys",
    "hostname",
    "network",
    "clock",
];

fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/hooks")
}

fn write_exec(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The stand-ins. Each appends `NAME ARGS` to $STUB_LOG. `systemctl
/// is-active --quiet UNIT` succeeds for the units in $STUB_ACTIVE; any
/// call whose `NAME ARGS` is in $STUB_FAIL (`|`-separated) exits 1.
/// hostnamectl keeps the transient hostname in $STUB_STATE/hostname;
/// chronyc answers only when $STUB_CHRONY is set.
const STUB: &str = r#"#!/bin/sh
me=${0##*/}
echo "$me $*" >> "$STUB_LOG"
case "|${STUB_FAIL:-}|" in *"|$me $*|"*) exit 1 ;; esac
case "$me" in
systemctl)
	if [ "$1" = is-active ]; then
		case " ${STUB_ACTIVE:-} " in *" $3 "*) exit 0 ;; *) exit 3 ;; esac
	fi ;;
hostnamectl)
	case "$*" in
	"--transient hostname") cat "$STUB_STATE/hostname" 2>/dev/null || echo original ;;
	"--static --transient hostname "*) for a; do last=$a; done; echo "$last" > "$STUB_STATE/hostname" ;;
	esac ;;
chronyc) [ -n "${STUB_CHRONY:-}" ] || exit 1 ;;
esac
exit 0
"#;

/// A throwaway root with a machine's identity in it, and the stand-ins.
struct World {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    bin: PathBuf,
    calls: PathBuf,
    state: PathBuf,
    /// Environment for every run (STUB_*), replaced per test as needed.
    env: Vec<(String, String)>,
}

impl World {
    fn new() -> World {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let bin = tmp.path().join("bin");
        let state = tmp.path().join("state");
        for d in [
            "etc/ssh",
            "var/lib/dbus",
            "run/systemd/system",
            "var/log/journal",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(root.join("etc/machine-id"), format!("{OLD_ID}\n")).unwrap();
        std::fs::write(root.join("var/lib/dbus/machine-id"), format!("{OLD_ID}\n")).unwrap();
        let journal = root.join("var/log/journal").join(OLD_ID);
        std::fs::create_dir(&journal).unwrap();
        std::fs::write(journal.join("system.journal"), "history").unwrap();
        std::fs::write(root.join("etc/hostname"), "original\n").unwrap();
        std::fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n127.0.1.1\toriginal.example.org original\n::1\tlocalhost ip6-localhost\n",
        )
        .unwrap();
        for name in [
            "systemctl",
            "hostnamectl",
            "hostname",
            "chronyc",
            "dhclient",
            "dhcpcd",
        ] {
            write_exec(&bin.join(name), STUB);
        }
        let w = World {
            calls: tmp.path().join("calls"),
            _tmp: tmp,
            root,
            bin,
            state,
            env: Vec::new(),
        };
        for (kind, bits) in [("ed25519", None), ("rsa", Some("2048"))] {
            let key = w.root.join(format!("etc/ssh/ssh_host_{kind}_key"));
            let mut c = Command::new("ssh-keygen");
            c.args(["-q", "-t", kind, "-N", "", "-f"]).arg(&key);
            if let Some(bits) = bits {
                c.args(["-b", bits]);
            }
            let out = c.output().expect("ssh-keygen (openssh-client) is needed");
            assert!(out.status.success(), "{}", stderr(&out));
        }
        w
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.into(), value.into()));
    }

    /// Runs a shipped hook as the daemon would: `HOOK EVENT` with the
    /// kind (none: unset) and these extra variables.
    fn run(&self, hook: &str, event: &str, kind: Option<&str>, extra: &[(&str, &str)]) -> Output {
        let _ = std::fs::remove_file(&self.calls);
        let path = format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut c = Command::new(shipped_dir().join(hook));
        c.arg(event)
            .env_clear()
            .env("PATH", path)
            .env("SYSGENID_HOOKS_ROOT", &self.root)
            .env("SYSGENID_EVENT", event)
            .env("SYSGENID_GENERATION", "7")
            .env("SYSGENID_EPOCH", "00112233445566778899aabbccddeeff")
            .env("STUB_LOG", &self.calls)
            .env("STUB_STATE", &self.state)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some(kind) = kind {
            c.env("SYSGENID_KIND", kind);
        }
        c.envs(extra.iter().copied());
        c.output().unwrap()
    }

    /// What the stand-ins were asked, one call per line.
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.calls)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every file under the root with its bytes (directories as `<dir>`).
    fn snapshot(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(base).unwrap().to_path_buf();
                if p.is_dir() {
                    out.insert(rel, b"<dir>".to_vec());
                    walk(&p, base, out);
                } else {
                    out.insert(rel, std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root, &self.root, &mut out);
        out
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// Calls that change something (not `is-active`, not queries).
fn changes(calls: &[String]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| {
            !c.starts_with("systemctl is-active")
                && c.as_str() != "hostnamectl --transient hostname"
                && c.as_str() != "chronyc -n tracking"
        })
        .cloned()
        .collect()
}

#[test]
fn restores_and_changes_of_unknown_kind_keep_the_identity_and_only_the_clock_steps() {
    let mut w = World::new();
    w.set("STUB_ACTIVE", "ssh.service systemd-networkd.service");
    w.set("STUB_CHRONY", "1");
    let before = w.snapshot();
    for kind in [Some("restore"), Some("unknown"), None] {
        for hook in ["machine-id", "ssh-host-keys", "hostname", "network"] {
            let out = w.run(hook, "change", kind, &[("SYSGENID_HOSTNAME", "clone-1")]);
            assert_eq!(code(&out), Some(0), "{hook} {kind:?}: {}", stderr(&out));
            let said = stdout(&out);
            assert!(
                said.starts_with(&format!(
                    "sysgenid hook {hook}: kind {}",
                    kind.unwrap_or("unknown")
                )) && said.contains("not a clone"),
                "{hook} {kind:?} says why it did nothing: {said}"
            );
            assert!(
                changes(&w.calls()).is_empty(),
                "{hook} {kind:?}: {:?}",
                w.calls()
            );
            assert_eq!(w.snapshot(), before, "{hook} {kind:?} changed files");
        }
        let out = w.run("clock", "change", kind, &[]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("clock stepped by chronyd"),
            "{}",
            stdout(&out)
        );
        assert_eq!(
            changes(&w.calls()),
            ["chronyc -n burst 4/4", "chronyc -n makestep"]
        );
    }
    assert_eq!(w.snapshot(), before);
}

#[test]
fn a_clone_renews_machine_id_host_keys_hostname_and_lease_once_per_change() {
    let mut w = World::new();
    w.set("STUB_ACTIVE", "ssh.service systemd-networkd.service");
    w.set("STUB_CHRONY", "1");
    let keys_before: Vec<String> = ["ed25519", "rsa"]
        .iter()
        .map(|k| w.read(&format!("etc/ssh/ssh_host_{k}_key.pub")))
        .collect();
    let clone = [("SYSGENID_HOSTNAME", "clone-1")];

    // machine-id: a new v4-UUID-shaped id, D-Bus's copy, the journal.
    let out = w.run("machine-id", "change", Some("clone"), &clone);
    assert_eq!(code(&out), Some(0), "{}{}", stdout(&out), stderr(&out));
    let id = w.read("etc/machine-id").trim().to_string();
    assert_ne!(id, OLD_ID);
    assert_eq!(id.len(), 32, "{id}");
    assert!(
        id.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
        "{id}"
    );
    assert_eq!(&id[12..13], "4", "version 4: {id}");
    assert!("89ab".contains(&id[16..17]), "RFC 4122 variant: {id}");
    let mode = std::fs::metadata(w.root.join("etc/machine-id"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    assert_eq!(
        w.read("var/lib/dbus/machine-id").trim(),
        id,
        "D-Bus's copy follows"
    );
    assert_eq!(
        w.read(&format!("var/log/journal/{id}/system.journal")),
        "history",
        "the journal moved to the new id with its history"
    );
    assert!(!w.root.join("var/log/journal").join(OLD_ID).exists());
    assert_eq!(
        changes(&w.calls()),
        ["systemctl restart systemd-journald.service"]
    );
    assert!(
        stdout(&out).contains(&format!("new machine-id {id} (was {OLD_ID})")),
        "{}",
        stdout(&out)
    );

    // ssh-host-keys: every type renewed, the pairs match, sshd reloaded.
    let out = w.run("ssh-host-keys", "change", Some("clone"), &clone);
    assert_eq!(code(&out), Some(0), "{}{}", stdout(&out), stderr(&out));
    for (k, old) in ["ed25519", "rsa"].iter().zip(&keys_before) {
        let key = w.root.join(format!("etc/ssh/ssh_host_{k}_key"));
        let public = w.read(&format!("etc/ssh/ssh_host_{k}_key.pub"));
        assert_ne!(&public, old, "{k} renewed");
        let derived = Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&key)
            .output()
            .unwrap();
        assert!(derived.status.success(), "{}", stderr(&derived));
        let derived = stdout(&derived);
        assert!(public.starts_with(derived.trim()), "{k}: the pair matches");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&key.with_extension("pub")), 0o644);
    }
    let bits = Command::new("ssh-keygen")
        .arg("-l")
        .arg("-f")
        .arg(w.root.join("etc/ssh/ssh_host_rsa_key.pub"))
        .output()
        .unwrap();
    assert!(
        stdout(&bits).starts_with("2048 "),
        "the RSA size is kept: {}",
        stdout(&bits)
    );
    let leftovers: Vec<_> = std::fs::read_dir(w.root.join("etc/ssh"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("ssh_host_"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(changes(&w.calls()), ["systemctl reload ssh.service"]);

    // hostname: the file, the 127.0.1.1 line (only it), the kernel.
    let out = w.run("hostname", "change", Some("clone"), &clone);
    assert_eq!(code(&out), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(w.read("etc/hostname"), "clone-1\n");
    assert_eq!(
        w.read("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tclone-1.example.org clone-1\n::1\tlocalhost ip6-localhost\n"
    );
    assert_eq!(
        changes(&w.calls()),
        ["hostnamectl --static --transient hostname clone-1"]
    );

    // network: networkd restarted (a new DUID from the new machine-id).
    let out = w.run("network", "change", Some("clone"), &clone);
    assert_eq!(code(&out), Some(0), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(
        changes(&w.calls()),
        ["systemctl restart systemd-networkd.service"]
    );

    // Idempotent: the same change again renews nothing.
    let after = w.snapshot();
    for hook in ["machine-id", "ssh-host-keys", "hostname", "network"] {
        let out = w.run(hook, "change", Some("clone"), &clone);
        assert_eq!(code(&out), Some(0), "{hook}: {}", stderr(&out));
        assert!(
            stdout(&out).contains("nothing to do"),
            "{hook} again: {}",
            stdout(&out)
        );
        assert!(
            changes(&w.calls()).is_empty(),
            "{hook} again: {:?}",
            w.calls()
        );
    }
    assert_eq!(w.snapshot(), after, "running again changed files");

    // The next clone (a new epoch) renews again.
    let out = w.run(
        "machine-id",
        "change",
        Some("clone"),
        &[("SYSGENID_EPOCH", "ffeeddccbbaa99887766554433221100")],
    );
    assert_eq!(code(&out), Some(0));
    assert_ne!(w.read("etc/machine-id").trim(), id);
}

#[test]
fn with_nothing_to_do_every_hook_exits_zero_and_says_why() {
    let w = World::new();
    // Freeze and thaw: nothing, from every hook.
    let before = w.snapshot();
    for hook in HOOKS {
        for event in ["freeze", "thaw"] {
            let out = w.run(hook, event, Some("clone"), &[]);
            assert_eq!(code(&out), Some(0), "{hook} {event}");
            assert!(
                stdout(&out).contains(&format!("{event}: nothing to do")),
                "{}",
                stdout(&out)
            );
            assert!(changes(&w.calls()).is_empty());
        }
    }
    // A clone without a hostname keeps it.
    let out = w.run("hostname", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(0));
    assert!(
        stdout(&out).contains("no hostname came with the change"),
        "{}",
        stdout(&out)
    );
    // No DHCP client, no synchroniser, no sshd running.
    let out = w.run("network", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(0));
    assert!(
        stdout(&out).contains("no DHCP client runs"),
        "{}",
        stdout(&out)
    );
    let out = w.run("clock", "change", Some("restore"), &[]);
    assert_eq!(code(&out), Some(0));
    assert!(
        stdout(&out).contains("no clock synchroniser runs"),
        "{}",
        stdout(&out)
    );
    assert_eq!(w.snapshot(), before);
    // No host keys at all.
    for e in std::fs::read_dir(w.root.join("etc/ssh")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let out = w.run("ssh-host-keys", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(0));
    assert!(stdout(&out).contains("no host keys"), "{}", stdout(&out));
}

#[test]
fn a_hook_that_fails_exits_non_zero_and_a_rerun_tries_again() {
    let mut w = World::new();
    let before = w.snapshot();
    // Not a hostname: refused, nothing changed.
    for bad in ["-lead", "a..b", "under_score", &"x".repeat(65), "sp ace"] {
        let out = w.run(
            "hostname",
            "change",
            Some("clone"),
            &[("SYSGENID_HOSTNAME", bad)],
        );
        assert_eq!(code(&out), Some(1), "{bad}: {}", stdout(&out));
        assert!(
            stdout(&out).contains("not a valid hostname"),
            "{}",
            stdout(&out)
        );
    }
    assert_eq!(w.snapshot(), before);
    assert!(changes(&w.calls()).is_empty());

    // networkd will not restart: exit 1, not recorded as done, so the next
    // run (the daemon's next change, or by hand) tries again.
    w.set("STUB_ACTIVE", "systemd-networkd.service");
    w.set("STUB_FAIL", "systemctl restart systemd-networkd.service");
    let out = w.run("network", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("FAILED"), "{}", stdout(&out));
    let out = w.run("network", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(1));
    assert_eq!(
        changes(&w.calls()),
        ["systemctl restart systemd-networkd.service"]
    );

    // chronyd runs but will not step.
    w.set("STUB_CHRONY", "1");
    w.set("STUB_FAIL", "chronyc -n makestep");
    let out = w.run("clock", "change", Some("restore"), &[]);
    assert_eq!(code(&out), Some(1), "{}", stdout(&out));

    // ssh-keygen cannot make a key: the old keys stay, none is lost.
    let keygen = w.bin.join("ssh-keygen");
    write_exec(
        &keygen,
        "#!/bin/sh\ncase \" $* \" in *\" -t \"*) echo broken >&2; exit 1 ;; esac\nexec /usr/bin/ssh-keygen \"$@\"\n",
    );
    let keys = w.read("etc/ssh/ssh_host_ed25519_key");
    let out = w.run("ssh-host-keys", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(1), "{}", stdout(&out));
    assert_eq!(w.read("etc/ssh/ssh_host_ed25519_key"), keys);
    std::fs::remove_file(&keygen).unwrap();
}

#[test]
fn dhclient_dhcpcd_and_network_manager_get_new_leases_without_a_release() {
    let mut w = World::new();
    // A live process stands for each client (its pid in the pid file).
    let pid = std::process::id().to_string();
    std::fs::create_dir_all(w.root.join("var/lib/dhcp")).unwrap();
    std::fs::create_dir_all(w.root.join("run/dhcpcd")).unwrap();
    std::fs::create_dir_all(w.root.join("var/lib/dhcpcd")).unwrap();
    std::fs::create_dir_all(w.root.join("var/lib/NetworkManager")).unwrap();
    std::fs::write(w.root.join("run/dhclient.eth0.pid"), &pid).unwrap();
    std::fs::write(w.root.join("var/lib/dhcp/dhclient.eth0.leases"), "lease").unwrap();
    std::fs::write(
        w.root.join("var/lib/dhcp/dhclient6.eth0.leases"),
        "default-duid",
    )
    .unwrap();
    std::fs::write(w.root.join("run/dhcpcd/pid"), &pid).unwrap();
    std::fs::write(w.root.join("var/lib/dhcpcd/duid"), "duid").unwrap();
    std::fs::write(w.root.join("var/lib/dhcpcd/eth1.lease"), "lease").unwrap();
    std::fs::write(
        w.root.join("var/lib/NetworkManager/internal-x-eth2.lease"),
        "lease",
    )
    .unwrap();
    std::fs::write(
        w.root.join("var/lib/NetworkManager/NetworkManager.state"),
        "kept",
    )
    .unwrap();
    w.set("STUB_ACTIVE", "NetworkManager.service");
    let out = w.run("network", "change", Some("clone"), &[]);
    assert_eq!(code(&out), Some(0), "{}", stdout(&out));
    let r = w.root.display();
    assert_eq!(
        changes(&w.calls()),
        [
            "systemctl restart NetworkManager.service".to_string(),
            format!("dhclient -x -pf {r}/run/dhclient.eth0.pid"),
            format!(
                "dhclient -4 -pf {r}/run/dhclient.eth0.pid -lf {r}/var/lib/dhcp/dhclient.eth0.leases -I -df {r}/var/lib/dhcp/dhclient6.eth0.leases eth0"
            ),
            "dhcpcd -x".to_string(),
            "dhcpcd ".to_string(),
        ]
    );
    assert!(
        !w.calls()
            .iter()
            .any(|c| c.contains(" -r") || c.contains(" -k")),
        "no release"
    );
    for gone in [
        "var/lib/dhcp/dhclient.eth0.leases",
        "var/lib/dhcp/dhclient6.eth0.leases",
        "var/lib/dhcpcd/duid",
        "var/lib/dhcpcd/eth1.lease",
        "var/lib/NetworkManager/internal-x-eth2.lease",
    ] {
        assert!(!w.root.join(gone).exists(), "{gone} forgotten");
    }
    assert_eq!(
        w.read("var/lib/NetworkManager/NetworkManager.state"),
        "kept"
    );
}

/// `sysgenidctl hooks --shipped-dir S --hooks-dir H ARGS`.
fn hooks_ctl(shipped: &Path, hooks: &Path, args: &[&str]) -> Output {
    Command::new(bin("sysgenidctl"))
        .arg("hooks")
        .args(args)
        .arg("--shipped-dir")
        .arg(shipped)
        .arg("--hooks-dir")
        .arg(hooks)
        .output()
        .unwrap()
}

fn links(dir: &Path) -> BTreeMap<String, PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| {
                let e = e.unwrap();
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                (e.file_name().to_string_lossy().into_owned(), target)
            })
            .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sysgenidctl_hooks_lists_enables_in_order_and_disables_as_root_only() {
    if skip_unless_root("(sysgenidctl hooks enable is root-only)") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hooks = tmp.path().join("hooks.d");
    let shipped = std::fs::canonicalize(shipped_dir()).unwrap();

    let out = hooks_ctl(&shipped, &hooks, &[]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let listing = stdout(&out);
    for hook in HOOKS {
        assert!(
            listing.contains(&format!("{hook:<16} disabled")),
            "{listing}"
        );
    }
    assert!(
        listing.contains("does not exist: no hook runs"),
        "{listing}"
    );
    // Listed in the order they run.
    let at: Vec<usize> = HOOKS
        .iter()
        .map(|h| listing.find(&format!("  {h} ")).unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{listing}");

    for hook in HOOKS {
        let out = hooks_ctl(&shipped, &hooks, &["enable", hook]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }
    let expected: BTreeMap<String, PathBuf> = [
        ("10-machine-id", "machine-id"),
        ("20-ssh-host-keys", "ssh-host-keys"),
        ("30-hostname", "hostname"),
        ("40-network", "network"),
        ("50-clock", "clock"),
    ]
    .iter()
    .map(|(link, name)| (link.to_string(), shipped.join(name)))
    .collect();
    assert_eq!(links(&hooks), expected);
    let out = hooks_ctl(&shipped, &hooks, &["enable", "clock"]);
    assert_eq!(code(&out), Some(0));
    assert!(
        stdout(&out).contains("already enabled as 50-clock"),
        "{}",
        stdout(&out)
    );
    let listing = stdout(&hooks_ctl(&shipped, &hooks, &["list"]));
    assert!(listing.contains("enabled as 10-machine-id"), "{listing}");

    // Errors: a clear message, nothing changed.
    let out = hooks_ctl(&shipped, &hooks, &["enable", "no-such-hook"]);
    assert_eq!(code(&out), Some(1));
    assert!(
        stderr(&out).contains("no shipped hook 'no-such-hook'"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("machine-id"),
        "names what is shipped: {}",
        stderr(&out)
    );
    let out = hooks_ctl(&shipped, &hooks, &["enable", "../clock"]);
    assert_eq!(code(&out), Some(1));
    for verb in ["enable", "disable"] {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(bin("sysgenidctl"))
            .args(["hooks", verb, "clock", "--shipped-dir"])
            .arg(&shipped)
            .arg("--hooks-dir")
            .arg(&hooks);
        let out = c.output().unwrap();
        assert_eq!(code(&out), Some(4), "{verb} as nobody: {}", stderr(&out));
        assert!(stderr(&out).contains("only root"), "{}", stderr(&out));
    }
    assert_eq!(links(&hooks), expected, "nobody changed nothing");

    let out = hooks_ctl(&shipped, &hooks, &["disable", "clock"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("removed 50-clock"),
        "{}",
        stdout(&out)
    );
    let out = hooks_ctl(&shipped, &hooks, &["disable", "clock"]);
    assert_eq!(code(&out), Some(0));
    assert!(stdout(&out).contains("not enabled"), "{}", stdout(&out));
    let mut left = expected.clone();
    left.remove("50-clock");
    assert_eq!(links(&hooks), left);
}

#[test]
fn the_daemon_runs_enabled_shipped_hooks_for_the_kind_and_a_failing_one_holds_the_change_by_name() {
    if skip_unless_root("(the daemon's hooks run as root from a root-only directory)") {
        return;
    }
    // Shipped hooks must sit where every directory is root's alone (not
    // under /tmp): the target directory's tmp, as the package's
    // /usr/share/sysgenid/hooks.
    let place = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::set_permissions(place.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let shipped = place.path().join("shipped");
    let hooks = place.path().join("hooks.d");
    std::fs::create_dir(&shipped).unwrap();
    std::fs::create_dir(&hooks).unwrap();
    for hook in HOOKS {
        std::fs::copy(shipped_dir().join(hook), shipped.join(hook)).unwrap();
    }
    write_exec(
        &shipped.join("fails"),
        "#!/bin/sh\n# sysgenid-hook-order: 60\n[ \"$1\" = change ] || exit 0\necho 'sysgenid hook fails: FAILED: on purpose'\nexit 1\n",
    );
    let mut w = World::new();
    w.set("STUB_CHRONY", "1");
    let path = format!(
        "{}:{}",
        w.bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut env: Vec<(&str, &str)> = vec![
        ("PATH", &path),
        ("SYSGENID_HOOKS_ROOT", w.root.to_str().unwrap()),
    ];
    let calls = w.calls.to_str().unwrap().to_string();
    let state = w.state.to_str().unwrap().to_string();
    env.push(("STUB_LOG", &calls));
    env.push(("STUB_STATE", &state));
    env.push(("STUB_CHRONY", "1"));
    let dir = runtime_dir();
    let d = Daemon::start_with_env(dir.path(), &["--hooks-dir", hooks.to_str().unwrap()], &env);
    let before = w.snapshot();
    // Enabled while the daemon runs: the very next change waits for them.
    for hook in HOOKS.iter().chain(&["fails"]) {
        let out = hooks_ctl(&shipped, &hooks, &["enable", hook]);
        assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    }

    let out = d.ctl(&["bump"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "5000"]);
    assert_eq!(
        code(&out),
        Some(3),
        "the failing hook holds the change: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("60-fails (exit status: 1)"),
        "wait-watchers names the hook: {}",
        stderr(&out)
    );
    let status = d.status().hooks.expect("hooks in status");
    assert_eq!(status.hooks, 6);
    assert_eq!(status.refused, 0, "links to root-only shipped hooks run");
    assert_eq!(status.holding, ["60-fails (exit status: 1)"]);
    let log = d.log();
    for hook in ["machine-id", "ssh-host-keys", "hostname", "network"] {
        assert!(
            log.contains(&format!("sysgenid hook {hook}: kind unknown, not a clone")),
            "{hook} said why it did nothing: {log}"
        );
    }
    assert!(
        log.contains("sysgenid hook clock: kind unknown: clock stepped by chronyd"),
        "{log}"
    );
    assert_eq!(
        w.snapshot(),
        before,
        "a change of unknown kind keeps the identity"
    );

    // Disabled, it holds nothing from the next change on.
    let out = hooks_ctl(&shipped, &hooks, &["disable", "fails"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    d.ctl(&["bump"]);
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "20000"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert!(d.status().hooks.unwrap().holding.is_empty());
    assert!(wait_until(Duration::from_secs(1), || d.status().outdated == 0));

    // A clone announced as one, with a hostname: renewed through the
    // daemon, in order, and acknowledged.
    let _ = std::fs::remove_file(&w.calls);
    let keys = w.read("etc/ssh/ssh_host_ed25519_key.pub");
    let out = d.ctl(&["bump", "--kind", "clone", "--hostname", "clone-1"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "60000"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let id = w.read("etc/machine-id").trim().to_string();
    assert_ne!(id, OLD_ID, "{}", d.log());
    assert_eq!(w.read("var/lib/dbus/machine-id").trim(), id);
    assert_ne!(w.read("etc/ssh/ssh_host_ed25519_key.pub"), keys);
    assert_eq!(w.read("etc/hostname"), "clone-1\n");
    assert_eq!(
        changes(&w.calls()),
        [
            "systemctl restart systemd-journald.service",
            "hostnamectl --static --transient hostname clone-1",
            "chronyc -n burst 4/4",
            "chronyc -n makestep",
        ],
        "in run order, machine-id first"
    );
    let log = d.log();
    assert!(
        log.contains(&format!("sysgenid hook machine-id: new machine-id {id}")),
        "{log}"
    );

    // A restore in place keeps all of it; only the clock steps.
    let _ = std::fs::remove_file(&w.calls);
    let after_clone = w.snapshot();
    let out = d.ctl(&["bump", "--kind", "restore"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "60000"]);
    assert_eq!(code(&out), Some(0), "{}", stderr(&out));
    assert_eq!(
        w.snapshot(),
        after_clone,
        "a restore in place keeps the identity"
    );
    assert_eq!(
        changes(&w.calls()),
        ["chronyc -n burst 4/4", "chronyc -n makestep"]
    );
}
