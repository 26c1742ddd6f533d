//! `sysgenidctl hooks`: the shipped hooks (`/usr/share/sysgenid/hooks`)
//! and the daemon's hooks directory (`/etc/sysgenid/hooks.d`), so that an
//! operator turns each shipped hook on or off with one command instead of
//! writing the symlink, and its order, by hand.
//!
//! A hook is enabled by a symlink `NN-NAME` in the hooks directory to the
//! shipped file. `NN` comes from the hook's own `# sysgenid-hook-order: NN`
//! line (50 without one): the daemon runs hooks in name order, and the
//! machine-id must be renewed before what derives from it. Only links to
//! the shipped directory are ever created or removed here; the
//! administrator's own hooks are listed and left alone.

use std::path::{Path, PathBuf};

/// The order used for a shipped hook that states none.
pub const DEFAULT_ORDER: u32 = 50;

/// Why a `hooks` command did nothing.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    /// The name cannot be a shipped hook's.
    #[error("'{0}' is not a hook name (a file name in the shipped directory, not a path)")]
    BadName(String),
    /// No such shipped hook.
    #[error("no shipped hook '{name}' in {} (shipped: {})", dir.display(), if shipped.is_empty() { "none".to_string() } else { shipped.join(", ") })]
    NotShipped {
        /// The name asked for.
        name: String,
        /// The shipped directory.
        dir: PathBuf,
        /// What is shipped.
        shipped: Vec<String>,
    },
    /// Something else already has the link's name.
    #[error("{} exists and is not a link to {}: nothing changed", path.display(), target.display())]
    Occupied {
        /// The would-be link.
        path: PathBuf,
        /// The shipped hook.
        target: PathBuf,
    },
    /// A file system call failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HooksError {
    let path = path.to_path_buf();
    move |source| HooksError::Io { what, path, source }
}

/// One shipped hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shipped {
    /// Its file name.
    pub name: String,
    /// Its order (the link's prefix).
    pub order: u32,
    /// The links in the hooks directory that enable it.
    pub enabled_as: Vec<String>,
}

/// What `hooks list` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The shipped hooks, by order then name.
    pub shipped: Vec<Shipped>,
    /// Every other entry of the hooks directory (the administrator's own
    /// hooks), in name order; empty when the directory does not exist.
    pub others: Vec<String>,
    /// Whether the hooks directory exists.
    pub hooks_dir_exists: bool,
}

/// The order a hook states in its first lines, if any.
fn order_of(path: &Path) -> u32 {
    let Ok(text) = std::fs::read(path) else {
        return DEFAULT_ORDER;
    };
    String::from_utf8_lossy(&text[..text.len().min(4096)])
        .lines()
        .take(40)
        .find_map(|l| {
            l.strip_prefix("# sysgenid-hook-order:")
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(DEFAULT_ORDER)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/') && !name.contains('\0')
}

/// The shipped directory made absolute (links must not depend on the
/// caller's working directory).
fn absolute(dir: &Path) -> Result<PathBuf, HooksError> {
    std::fs::canonicalize(dir).map_err(io("cannot read the shipped directory", dir))
}

/// Names of the executable regular files in the shipped directory.
fn shipped_names(shipped_dir: &Path) -> Result<Vec<String>, HooksError> {
    use std::os::unix::fs::PermissionsExt;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(shipped_dir).map_err(io("cannot read", shipped_dir))? {
        let entry = entry.map_err(io("cannot read", shipped_dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let executable = std::fs::metadata(entry.path())
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if valid_name(&name) && executable {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The entries of the hooks directory, each with where it links to (for
/// symlinks), in name order; none when it does not exist.
fn hooks_dir_entries(hooks_dir: &Path) -> Result<Vec<(String, Option<PathBuf>)>, HooksError> {
    let entries = match std::fs::read_dir(hooks_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("cannot read", hooks_dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("cannot read", hooks_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let target = std::fs::read_link(entry.path()).ok();
        out.push((name, target));
    }
    out.sort();
    Ok(out)
}

/// The links in the hooks directory that lead to `target` (its canonical
/// path): written as that path or through other links.
fn links_to(entries: &[(String, Option<PathBuf>)], hooks_dir: &Path, target: &Path) -> Vec<String> {
    entries
        .iter()
        .filter(|(name, link)| {
            link.as_deref() == Some(target)
                || (link.is_some()
                    && std::fs::canonicalize(hooks_dir.join(name)).is_ok_and(|t| t == target))
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// `hooks list`.
pub fn list(shipped_dir: &Path, hooks_dir: &Path) -> Result<Listing, HooksError> {
    let entries = hooks_dir_entries(hooks_dir)?;
    let mut shipped = Vec::new();
    let mut claimed = Vec::new();
    // No shipped directory (the package is not installed): none shipped.
    if shipped_dir.exists() {
        let dir = absolute(shipped_dir)?;
        for name in shipped_names(&dir)? {
            let path = dir.join(&name);
            let enabled_as = links_to(&entries, hooks_dir, &path);
            claimed.extend(enabled_as.iter().cloned());
            shipped.push(Shipped {
                order: order_of(&path),
                name,
                enabled_as,
            });
        }
    }
    shipped.sort_by(|a, b| (a.order, &a.name).cmp(&(b.order, &b.name)));
    let others = entries
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !claimed.contains(name))
        .collect();
    Ok(Listing {
        shipped,
        others,
        hooks_dir_exists: hooks_dir.is_dir(),
    })
}

/// What `enable` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enabled {
    /// The link was made.
    Linked {
        /// The link.
        link: PathBuf,
        /// Its target.
        target: PathBuf,
        /// The hooks directory had to be created.
        created_dir: bool,
    },
    /// It already was, as these links.
    Already(Vec<String>),
}

/// The shipped hook `name`, as an absolute path.
fn shipped_hook(shipped_dir: &Path, name: &str) -> Result<PathBuf, HooksError> {
    if !valid_name(name) {
        return Err(HooksError::BadName(name.to_string()));
    }
    let dir = absolute(shipped_dir)?;
    let names = shipped_names(&dir)?;
    if !names.iter().any(|n| n == name) {
        return Err(HooksError::NotShipped {
            name: name.to_string(),
            dir,
            shipped: names,
        });
    }
    Ok(dir.join(name))
}

/// `hooks enable NAME`: links `NN-NAME` in the hooks directory (created,
/// mode 0755, when missing) to the shipped hook.
pub fn enable(shipped_dir: &Path, hooks_dir: &Path, name: &str) -> Result<Enabled, HooksError> {
    use std::os::unix::fs::DirBuilderExt;
    let target = shipped_hook(shipped_dir, name)?;
    let already = links_to(&hooks_dir_entries(hooks_dir)?, hooks_dir, &target);
    if !already.is_empty() {
        return Ok(Enabled::Already(already));
    }
    let created_dir = !hooks_dir.exists();
    if created_dir {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(hooks_dir)
            .map_err(io("cannot create", hooks_dir))?;
    }
    let link = hooks_dir.join(format!("{:02}-{name}", order_of(&target)));
    match std::os::unix::fs::symlink(&target, &link) {
        Ok(()) => Ok(Enabled::Linked {
            link,
            target,
            created_dir,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(HooksError::Occupied { path: link, target })
        }
        Err(e) => Err(io("cannot create the link", &link)(e)),
    }
}

/// `hooks disable NAME`: removes every link in the hooks directory to the
/// shipped hook; the names removed (none: it was not enabled).
pub fn disable(
    shipped_dir: &Path,
    hooks_dir: &Path,
    name: &str,
) -> Result<Vec<String>, HooksError> {
    let target = shipped_hook(shipped_dir, name)?;
    let links = links_to(&hooks_dir_entries(hooks_dir)?, hooks_dir, &target);
    for link in &links {
        let path = hooks_dir.join(link);
        std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
    }
    Ok(links)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn shipped(dir: &Path, name: &str, order: Option<u32>) {
        let path = dir.join(name);
        let order = order
            .map(|n| format!("# sysgenid-hook-order: {n}\n"))
            .unwrap_or_default();
        std::fs::write(&path, format!("#!/bin/sh\n# a hook\n{order}exit 0\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn enable_links_with_the_order_list_shows_it_disable_removes_only_that_link() {
        let tmp = tempfile::tempdir().unwrap();
        let ship = tmp.path().join("shipped");
        let hooks = tmp.path().join("etc/hooks.d");
        std::fs::create_dir(&ship).unwrap();
        shipped(&ship, "machine-id", Some(10));
        shipped(&ship, "clock", Some(50));
        shipped(&ship, "plain", None);
        std::fs::write(ship.join("README"), "not a hook").unwrap();

        let listing = list(&ship, &hooks).unwrap();
        assert!(!listing.hooks_dir_exists);
        let names: Vec<_> = listing
            .shipped
            .iter()
            .map(|s| (s.name.as_str(), s.order))
            .collect();
        assert_eq!(names, [("machine-id", 10), ("clock", 50), ("plain", 50)]);

        let Enabled::Linked {
            link,
            target,
            created_dir,
        } = enable(&ship, &hooks, "machine-id").unwrap()
        else {
            panic!("not linked");
        };
        assert!(created_dir);
        assert_eq!(link, hooks.join("10-machine-id"));
        assert_eq!(std::fs::read_link(&link).unwrap(), target);
        assert_eq!(
            target,
            std::fs::canonicalize(ship.join("machine-id")).unwrap()
        );
        assert_eq!(
            enable(&ship, &hooks, "machine-id").unwrap(),
            Enabled::Already(vec!["10-machine-id".into()])
        );
        // The administrator's own hook is listed and never touched.
        std::fs::write(hooks.join("05-mine"), "#!/bin/sh\n").unwrap();
        let listing = list(&ship, &hooks).unwrap();
        assert_eq!(listing.shipped[0].enabled_as, ["10-machine-id"]);
        assert!(listing.shipped[1].enabled_as.is_empty());
        assert_eq!(listing.others, ["05-mine"]);

        assert_eq!(
            disable(&ship, &hooks, "machine-id").unwrap(),
            ["10-machine-id"]
        );
        assert!(disable(&ship, &hooks, "machine-id").unwrap().is_empty());
        assert!(hooks.join("05-mine").exists());
        assert!(!hooks.join("10-machine-id").exists());
    }

    #[test]
    fn bad_names_unknown_hooks_and_occupied_names_change_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let ship = tmp.path().join("shipped");
        let hooks = tmp.path().join("hooks.d");
        std::fs::create_dir(&ship).unwrap();
        std::fs::create_dir(&hooks).unwrap();
        shipped(&ship, "clock", Some(50));
        for bad in ["", "../clock", ".clock", "a/b"] {
            assert!(
                matches!(enable(&ship, &hooks, bad), Err(HooksError::BadName(_))),
                "{bad}"
            );
        }
        let err = enable(&ship, &hooks, "nope").unwrap_err();
        assert!(err.to_string().contains("shipped: clock"), "{err}");
        std::fs::write(hooks.join("50-clock"), "mine").unwrap();
        let err = enable(&ship, &hooks, "clock").unwrap_err();
        assert!(matches!(err, HooksError::Occupied { .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(hooks.join("50-clock")).unwrap(),
            "mine"
        );
        assert!(disable(&ship, &hooks, "clock").unwrap().is_empty());
        assert!(hooks.join("50-clock").exists());
    }
}
