//! The kernel's random generator, for a restore the kernel did not see:
//! mix in the entropy that came with the request (`RNDADDENTROPY`,
//! credited: it came from a privileged caller) and force the CRNG to
//! reseed (`RNDRESEEDCRNG`, Linux 4.17+), so that clones of one snapshot
//! stop sharing one `getrandom` stream before anyone hears of the change.
//! Failures (old kernel, no CAP_SYS_ADMIN, a container) are reported, never
//! fatal: the bump happens anyway.

use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// What [`mix_and_reseed`] managed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reseeded {
    /// Bytes of entropy mixed in (0: none given, or mixing failed).
    pub mixed: usize,
    /// Whether the CRNG was forced to reseed.
    pub reseeded: bool,
    /// What failed, for status and the log.
    pub error: Option<String>,
}

/// Mixes `entropy` (if any) into the pool, credited, then forces a reseed.
pub fn mix_and_reseed(entropy: Option<&[u8]>) -> Reseeded {
    let mut out = Reseeded::default();
    let random = match rustix::fs::open(
        "/dev/random",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            out.error = Some(format!("cannot open /dev/random: {e}"));
            return out;
        }
    };
    let mut errors = Vec::new();
    if let Some(bytes) = entropy.filter(|b| !b.is_empty()) {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        let words = bytes.len().div_ceil(4);
        let mut info = vec![0u32; 2 + words];
        info[0] = (bytes.len() * 8) as u32;
        info[1] = bytes.len() as u32;
        for (i, chunk) in bytes.chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            info[2 + i] = u32::from_ne_bytes(word);
        }
        // SAFETY: `info` is a rand_pool_info whose buf_size matches the
        // bytes that follow its header, alive for the call.
        let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) };
        if rc == 0 {
            out.mixed = bytes.len();
        } else {
            errors.push(format!(
                "RNDADDENTROPY: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc == 0 {
        out.reseeded = true;
    } else {
        errors.push(format!(
            "RNDRESEEDCRNG: {} (needs CAP_SYS_ADMIN and Linux 4.17+)",
            std::io::Error::last_os_error()
        ));
    }
    if !errors.is_empty() {
        out.error = Some(errors.join("; "));
    }
    out
}
