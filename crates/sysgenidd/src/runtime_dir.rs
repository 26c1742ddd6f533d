//! The runtime directory: where the socket, the page, the saved state and
//! the lock live, created so that nobody else can plant anything in it.
//!
//! Rules: the directory is created `0755`, or reused if it is a real
//! directory owned by us that nobody else can write to: one that is (or
//! was, before we came) group- or world-writable is refused, not tightened,
//! because someone else may already have planted files in it. Every file
//! inside is opened relative to the directory's descriptor with
//! `O_NOFOLLOW`; a symlink, a hard link or a file owned by someone else at
//! the socket, page, state or lock path is refused, never followed or
//! replaced. An exclusive `flock` on `lock` keeps a second daemon out; the
//! lock's owner is checked before it is locked, so a planted lock is an
//! error that says so, not a "daemon already running".

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use sysgenid_proto::{PAGE_NAME, SOCKET_NAME};

/// Errors preparing the runtime directory. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeDirError {
    /// A system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Something at a path we own is not what it should be.
    #[error("refusing to use {path}: {why}")]
    Unsafe {
        /// The path.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// Another daemon holds the lock.
    #[error("another sysgenidd is already running with runtime directory {0} (it holds {0}/lock); stop it first or pass a different --runtime-dir")]
    Busy(String),
}

pub use sysgenid_proto::default_runtime_dir;

/// A prepared, locked runtime directory.
pub struct RuntimeDir {
    path: PathBuf,
    dir: OwnedFd,
    _lock: OwnedFd,
}

fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> RuntimeDirError + 'a {
    move |e| RuntimeDirError::Io {
        what,
        path: path.display().to_string(),
        source: e.into(),
    }
}

impl RuntimeDir {
    /// Creates (if needed), checks and locks the directory.
    pub fn prepare(path: &Path) -> Result<RuntimeDir, RuntimeDirError> {
        let euid = rustix::process::geteuid();
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() && !parent.exists() {
                std::fs::create_dir_all(parent).map_err(|source| RuntimeDirError::Io {
                    what: "creating",
                    path: parent.display().to_string(),
                    source,
                })?;
            }
        }
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io("creating", path)(e)),
        }
        let dir = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => RuntimeDirError::Unsafe {
                path: path.display().to_string(),
                why: "it is a symlink or not a directory; remove it".into(),
            },
            e => io("opening", path)(e),
        })?;
        let st = rustix::fs::fstat(&dir).map_err(io("inspecting", path))?;
        if st.st_uid != euid.as_raw() {
            return Err(RuntimeDirError::Unsafe {
                path: path.display().to_string(),
                why: format!(
                    "it is owned by uid {}, not by this daemon's uid {}",
                    st.st_uid,
                    euid.as_raw()
                ),
            });
        }
        if st.st_mode & 0o022 != 0 {
            // Someone else could have planted files here already: tightening
            // now would not remove them.
            return Err(RuntimeDirError::Unsafe {
                path: path.display().to_string(),
                why: format!(
                    "it is group- or world-writable (mode {:04o}), so another user may have planted files in it; remove it and let sysgenidd create it (mode 0755), or pass a --runtime-dir that only this daemon's user can write to",
                    st.st_mode & 0o7777
                ),
            });
        }
        // Others must be able to reach the socket and the page.
        rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o755)).map_err(io("chmod", path))?;
        let lock = rustix::fs::openat(
            &dir,
            "lock",
            OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(io("opening lock in", path))?;
        let lock_st = rustix::fs::fstat(&lock).map_err(io("inspecting lock in", path))?;
        if lock_st.st_uid != euid.as_raw()
            || lock_st.st_nlink != 1
            || FileType::from_raw_mode(lock_st.st_mode) != FileType::RegularFile
        {
            return Err(RuntimeDirError::Unsafe {
                path: path.join("lock").display().to_string(),
                why: format!(
                    "it is not a plain file owned by this daemon (owner uid {}, {} links), so someone else may hold it; remove it",
                    lock_st.st_uid, lock_st.st_nlink
                ),
            });
        }
        rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                RuntimeDirError::Busy(path.display().to_string())
            } else {
                io("locking", path)(e)
            }
        })?;
        Ok(RuntimeDir {
            path: path.to_path_buf(),
            dir,
            _lock: lock,
        })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's descriptor, for `*at` calls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The socket's path.
    pub fn socket_path(&self) -> PathBuf {
        self.path.join(SOCKET_NAME)
    }

    /// The page's path.
    pub fn page_path(&self) -> PathBuf {
        self.path.join(PAGE_NAME)
    }

    /// Checks an existing entry: it must be of `kind`, owned by us, with one
    /// link. `Ok(false)` if absent.
    fn check_existing(&self, name: &str, kind: FileType) -> Result<bool, RuntimeDirError> {
        let path = self.path.join(name);
        let st = match rustix::fs::statat(&self.dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(io("inspecting", &path)(e)),
        };
        let unsafe_err = |why: String| RuntimeDirError::Unsafe {
            path: path.display().to_string(),
            why,
        };
        let found = FileType::from_raw_mode(st.st_mode);
        if found != kind {
            return Err(unsafe_err(format!(
                "expected a {kind:?}, found a {found:?}; remove it if it is not yours"
            )));
        }
        if st.st_uid != rustix::process::geteuid().as_raw() {
            return Err(unsafe_err(format!(
                "it is owned by uid {}, not by this daemon; remove it",
                st.st_uid
            )));
        }
        if kind == FileType::RegularFile && st.st_nlink != 1 {
            return Err(unsafe_err(format!(
                "it has {} hard links; remove it",
                st.st_nlink
            )));
        }
        Ok(true)
    }

    /// Opens (creating if needed) the page file for writing, mode `0444`.
    pub fn open_page(&self) -> Result<File, RuntimeDirError> {
        let path = self.page_path();
        let existed = self.check_existing(PAGE_NAME, FileType::RegularFile)?;
        if existed && !rustix::process::geteuid().is_root() {
            // Our own 0444 file: make it writable for the open, then back.
            rustix::fs::chmodat(
                &self.dir,
                PAGE_NAME,
                Mode::from_raw_mode(0o644),
                AtFlags::empty(),
            )
            .map_err(io("chmod", &path))?;
        }
        let fd = rustix::fs::openat(
            &self.dir,
            PAGE_NAME,
            OFlags::CREATE | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o444),
        )
        .map_err(io("opening", &path))?;
        let file = File::from(fd);
        file.set_permissions(std::fs::Permissions::from_mode(0o444))
            .map_err(|source| RuntimeDirError::Io {
                what: "chmod",
                path: path.display().to_string(),
                source,
            })?;
        Ok(file)
    }

    /// Binds the listening socket, replacing a stale one of ours (we hold
    /// the lock, so no live daemon owns it), connectable by everyone.
    pub fn bind_socket(&self) -> Result<OwnedFd, RuntimeDirError> {
        let path = self.socket_path();
        if self.check_existing(SOCKET_NAME, FileType::Socket)? {
            rustix::fs::unlinkat(&self.dir, SOCKET_NAME, AtFlags::empty())
                .map_err(io("removing stale socket", &path))?;
        }
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(io("creating socket", &path))?;
        let addr = SocketAddrUnix::new(&path).map_err(io("socket path", &path))?;
        rustix::net::bind(&fd, &addr).map_err(io("binding", &path))?;
        // Before listen: every connection, and every frame, then carries
        // its sender's credentials (see `peer`).
        crate::peer::pass_credentials(fd.as_fd()).map_err(|source| RuntimeDirError::Io {
            what: "enabling sender credentials on",
            path: path.display().to_string(),
            source,
        })?;
        rustix::fs::chmodat(
            &self.dir,
            SOCKET_NAME,
            Mode::from_raw_mode(0o666),
            AtFlags::empty(),
        )
        .map_err(io("chmod", &path))?;
        rustix::net::listen(&fd, 1024).map_err(io("listening on", &path))?;
        Ok(fd)
    }

    /// Removes the socket on clean exit (the page and state stay).
    pub fn remove_socket(&self) {
        let _ = rustix::fs::unlinkat(&self.dir, SOCKET_NAME, AtFlags::empty());
    }
}
