//! The man pages and shell completions of `sysgenidd` and `sysgenidctl`,
//! generated from the very clap definitions the binaries parse
//! (`sysgenidd::cli`, `sysgenidctl::cli`), so documentation and the real
//! command line cannot drift. The output is committed under `packaging/`
//! (the Debian package ships it from there); `cargo run -p
//! sysgenid-packaging` rewrites it and a test fails while it is stale.
//! The overview page `sysgenid(7)` is written by hand
//! (`packaging/man/sysgenid.7`). Also generated: the Debian package's
//! `sysgenid.pc`, from the same template as `install.sh` uses.

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

/// One generated file: its path under the workspace root, and contents.
pub struct Generated {
    /// Relative to the workspace root.
    pub path: PathBuf,
    /// The file's bytes.
    pub contents: Vec<u8>,
}

/// A command, its man section, and its binary name.
fn commands() -> [(clap::Command, &'static str, &'static str); 2] {
    [
        (sysgenidd::cli::Args::command(), "8", "sysgenidd"),
        (sysgenidctl::cli::Args::command(), "1", "sysgenidctl"),
    ]
}

/// The man page of `cmd` and of each of its subcommands
/// (`sysgenidctl-watch.1`, ...), as `clap_mangen::generate_to` names them.
fn man_pages(cmd: clap::Command, section: &str, out: &mut Vec<Generated>) {
    fn walk(cmd: clap::Command, section: &str, out: &mut Vec<Generated>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            walk(sub, section, out);
        }
        let man = clap_mangen::Man::new(cmd)
            .section(section)
            .manual("sysgenid")
            .source(format!("sysgenid {}", env!("CARGO_PKG_VERSION")));
        let mut contents = Vec::new();
        man.render(&mut contents).expect("rendering to memory");
        out.push(Generated {
            path: PathBuf::from("packaging/man").join(man.get_filename()),
            contents,
        });
    }
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    walk(cmd, section, out);
}

/// Where each shell looks for a completion file, relative to `packaging/
/// completions` (the package installs them in the matching system paths).
fn completion_name(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Bash => format!("bash/{bin}"),
        Shell::Zsh => format!("zsh/_{bin}"),
        Shell::Fish => format!("fish/{bin}.fish"),
        other => format!("{other}/{bin}"),
    }
}

/// `sysgenid.pc` for the Debian package: the template `install.sh` uses,
/// with the multiarch library directory.
fn debian_pkg_config() -> Generated {
    let template = include_str!("../../libsysgenid/sysgenid.pc.in");
    let contents = template
        .replace("@PREFIX@", "/usr")
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"))
        .replace(
            "libdir=${prefix}/lib\n",
            "libdir=${prefix}/lib/x86_64-linux-gnu\n",
        );
    Generated {
        path: PathBuf::from("packaging/pkgconfig/sysgenid.pc"),
        contents: contents.into_bytes(),
    }
}

/// Every generated file.
pub fn generate() -> Vec<Generated> {
    let mut out = vec![debian_pkg_config()];
    for (cmd, section, bin) in commands() {
        man_pages(cmd.clone(), section, &mut out);
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut contents = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), bin, &mut contents);
            out.push(Generated {
                path: PathBuf::from("packaging/completions").join(completion_name(shell, bin)),
                contents,
            });
        }
    }
    out
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Writes every generated file under `root`; returns the paths written.
pub fn write_all(root: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for file in generate() {
        let path = root.join(&file.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &file.contents)?;
        written.push(file.path);
    }
    Ok(written)
}
