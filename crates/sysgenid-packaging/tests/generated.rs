//! The man pages and completions under `packaging/` are generated from the
//! clap definitions and committed; this test fails when a committed copy
//! is stale or missing, or when a file there is no longer generated.
//! `SYSGENID_BLESS=1 cargo test -p sysgenid-packaging` (or `cargo run -p
//! sysgenid-packaging`) rewrites them.

use std::collections::BTreeSet;
use std::path::PathBuf;

use sysgenid_packaging::{generate, workspace_root, write_all};

/// Files under `dir` (relative to the workspace root), recursively.
fn files_under(dir: &str) -> BTreeSet<PathBuf> {
    fn walk(root: &std::path::Path, rel: PathBuf, out: &mut BTreeSet<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(root.join(&rel)) else {
            return;
        };
        for entry in entries.flatten() {
            let rel = rel.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                walk(root, rel, out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&workspace_root(), PathBuf::from(dir), &mut out);
    out
}

#[test]
fn generated_man_pages_and_completions_are_current() {
    let root = workspace_root();
    if std::env::var_os("SYSGENID_BLESS").is_some() {
        write_all(&root).unwrap();
        return;
    }
    let generated = generate();
    let mut stale = Vec::new();
    for file in &generated {
        let committed = std::fs::read(root.join(&file.path)).unwrap_or_default();
        if committed != file.contents {
            stale.push(file.path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "stale or missing: {stale:?}; run `SYSGENID_BLESS=1 cargo test -p sysgenid-packaging` and commit the result"
    );
    // Nothing generated-looking that no longer has a source (a removed
    // subcommand's page), except the hand-written overview.
    let expected: BTreeSet<PathBuf> = generated.into_iter().map(|f| f.path).collect();
    let mut present = files_under("packaging/man");
    present.extend(files_under("packaging/completions"));
    present.extend(files_under("packaging/pkgconfig"));
    present.remove(&PathBuf::from("packaging/man/sysgenid.7"));
    let orphans: Vec<_> = present.difference(&expected).collect();
    assert!(
        orphans.is_empty(),
        "no longer generated, remove: {orphans:?}"
    );
}

#[test]
fn the_pages_document_the_real_flags() {
    let by_name = |name: &str| {
        generate()
            .into_iter()
            .find(|f| f.path.ends_with(name))
            .map(|f| String::from_utf8(f.contents).unwrap())
            .unwrap_or_else(|| panic!("{name} not generated"))
    };
    let daemon = by_name("sysgenidd.8");
    for flag in [
        "runtime\\-dir",
        "device\\-group",
        "max\\-connections\\-per\\-uid",
    ] {
        assert!(daemon.contains(flag), "sysgenidd(8) lacks --{flag}");
    }
    assert!(
        daemon.starts_with(".ie") || daemon.contains(".TH sysgenidd 8"),
        "{}",
        &daemon[..200.min(daemon.len())]
    );
    let ctl = by_name("sysgenidctl.1");
    for sub in ["get", "watch", "bump", "wait\\-watchers", "status"] {
        assert!(ctl.contains(sub), "sysgenidctl(1) lacks {sub}");
    }
    assert!(
        ctl.contains("Exit codes"),
        "the exit codes are part of the page"
    );
    let watch = by_name("sysgenidctl-watch.1");
    assert!(watch.contains("\\-\\-exec"), "{watch}");
    let pc = by_name("sysgenid.pc");
    assert!(
        pc.contains("libdir=${prefix}/lib/x86_64-linux-gnu\n"),
        "{pc}"
    );
    assert!(!pc.contains('@'), "{pc}");
    let bash = by_name("bash/sysgenidctl");
    assert!(bash.contains("wait-watchers"), "{bash}");
}

/// `sysgenid(7)` is written by hand; its EXIT STATUS section must still
/// name every exit code and every subcommand that `sysgenidctl --help`
/// ties to one, so a new subcommand with its own exit code cannot go
/// unmentioned.
#[test]
fn the_overview_page_keeps_up_with_the_exit_codes() {
    use clap::CommandFactory;
    let page = std::fs::read_to_string(workspace_root().join("packaging/man/sysgenid.7")).unwrap();
    let section = &page[page.find(".SH EXIT STATUS").expect("EXIT STATUS")..];
    let section = &section[..section[1..].find(".SH ").map_or(section.len(), |i| i + 1)];
    let cmd = sysgenidctl::cli::Args::command();
    let help = cmd.get_after_help().expect("after_help").to_string();
    let codes = &help[..help.find("Examples:").unwrap_or(help.len())];
    for code in 0..=4 {
        assert!(
            codes.contains(&format!("  {code}  ")),
            "--help lost exit code {code}"
        );
        assert!(
            section.contains(&format!("{code} ")),
            "sysgenid(7) lacks exit code {code}"
        );
    }
    for sub in cmd.get_subcommands().map(|s| s.get_name().to_string()) {
        if codes.contains(&sub) {
            assert!(
                section.contains(&sub.replace('-', "\\-")) || section.contains(&sub),
                "sysgenid(7) EXIT STATUS lacks {sub}"
            );
        }
    }
}
