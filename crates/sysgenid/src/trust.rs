//! Whom a client believes. A generation is only worth something if it comes
//! from the daemon the caller meant: a socket or page planted by another
//! user (in `/tmp`, or in any directory someone else could create first)
//! could feed the caller any generation, or none. So before a connection
//! or a mapping is used, its owner is checked: root (the system daemon) or
//! the caller's own effective uid (a per-user daemon it started). Anyone
//! else is refused with an error that names the path and the owner found.
//!
//! For the socket the owner is the daemon *process* (`SO_PEERCRED`, fixed
//! by the kernel when the daemon called `listen`), not the socket file,
//! which says nothing about who answers. For the page it is the file's
//! owner, and the file must not be writable by group or others (the
//! daemon creates it `0444`): anyone who could write it could set the
//! generation.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::Error;

/// Whether `uid` may serve this process: root, or this process's own
/// effective uid.
pub(crate) fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == caller()
}

fn caller() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Checks the process listening on the other end of a connected socket.
pub(crate) fn check_daemon(fd: impl AsFd, socket: &Path) -> Result<(), Error> {
    let cred = rustix::net::sockopt::socket_peercred(fd).map_err(|e| Error::NotRunning {
        socket: socket.to_path_buf(),
        source: e.into(),
    })?;
    let owner = cred.uid.as_raw();
    if trusted_uid(owner) {
        return Ok(());
    }
    Err(Error::Untrusted {
        path: socket.to_path_buf(),
        owner,
        caller: caller(),
        why: format!(
            "the daemon answering there (pid {}) runs as uid {owner}",
            cred.pid.as_raw_nonzero()
        ),
    })
}

/// Checks an opened page file before it is mapped.
pub(crate) fn check_page(file: &File, path: &Path) -> Result<(), Error> {
    let meta = file.metadata()?;
    let owner = meta.uid();
    if !trusted_uid(owner) {
        return Err(Error::Untrusted {
            path: path.to_path_buf(),
            owner,
            caller: caller(),
            why: format!("the page is owned by uid {owner}"),
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Error::Untrusted {
            path: path.to_path_buf(),
            owner,
            caller: caller(),
            why: format!(
                "the page is writable by others (mode {:04o}), so anyone could set the generation",
                meta.mode() & 0o7777
            ),
        });
    }
    Ok(())
}
