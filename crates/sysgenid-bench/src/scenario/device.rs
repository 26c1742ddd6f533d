//! (5) The FUSE `/dev/sysgenid`: a non-blocking read and a poll, each one
//! FUSE round trip, against a socket round trip.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use sysgenid_bench::{now_ns, stats};

use crate::baseline::Echo;
use crate::daemon::Daemon;
use crate::rawfd::raw_read;
use crate::table::Unit;
use crate::Ctx;

/// (5) the `/dev/sysgenid` device, when the daemon serves one.
pub(crate) fn run(
    ctx: &mut Ctx,
    daemon: &Daemon,
    control: &mut sysgenid::Control,
) -> Result<(), String> {
    let status = control.status().map_err(|e| e.to_string())?;
    let path = daemon.dir().with_extension("dev").display().to_string();
    let served = ctx.device && status.device.is_some() && Path::new(&path).exists();
    if !served {
        ctx.table.value(
            "5",
            "/dev/sysgenid device round trips",
            "not measured (no device: run as root with /dev/fuse, or --device)".into(),
            "—",
            None,
        );
        ctx.table.notes.push(
            "(5) Run as root with /dev/fuse (or with `--device`) to serve the FUSE device on a private path and time it: a \
             non-blocking read (EAGAIN) and a poll on an up-to-date handle, each a FUSE round trip, against \
             a socket round trip."
                .into(),
        );
        return Ok(());
    }
    let rounds = if ctx.quick() { 100 } else { 2000 };
    let c = std::ffi::CString::new(path.clone()).map_err(|e| e.to_string())?;
    // SAFETY: open(2) of a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(format!("open {path}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let echo = Echo::new();
    let (mut reads, mut polls, mut rtts) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let mut b = [0u8; 4];
        let t = now_ns();
        raw_read(fd.as_raw_fd(), &mut b);
        reads.push((now_ns() - t) as f64);
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let t = now_ns();
        // SAFETY: poll(2) on one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) };
        polls.push((now_ns() - t) as f64);
        rtts.push(echo.rtt());
    }
    let (r, p, e) = (stats(&mut reads), stats(&mut polls), stats(&mut rtts));
    let why = |x: f64| {
        format!(
            "{:.1} socket round trips: one FUSE request, read by the loop from its poll set \
             (passthrough); in page-cache mode a reader thread hands it to the loop, one wake-up more",
            x / e.p50.max(1.0)
        )
    };
    ctx.table
        .ratio(
            "5",
            "device read (EAGAIN), p50",
            r.p50,
            "AF_UNIX round trip p50",
            e.p50,
            Unit::Ns,
            Some(2.0),
        )
        .why(why(r.p50));
    ctx.table
        .ratio(
            "5",
            "device poll, p50",
            p.p50,
            "AF_UNIX round trip p50",
            e.p50,
            Unit::Ns,
            Some(2.0),
        )
        .why(why(p.p50));
    Ok(())
}
