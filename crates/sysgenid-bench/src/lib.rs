//! Building blocks for the sysgenid benchmarks: a monotonic clock that is
//! comparable across processes, shared anonymous memory, futexes on it,
//! `fork`ed children, raw mappings of the page file, and percentiles.
//!
//! Everything here is deliberately thin over the system calls: the point of
//! the benchmarks is to put our path next to the kernel's own primitive in
//! the same run, so the baselines must not carry library overhead either.
//!
//! The driver (`src/main.rs`) is single-threaded on purpose: it `fork`s
//! thousands of children, which is only sound in a process that has no
//! other threads.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// `CLOCK_REALTIME` in nanoseconds: what the daemon stamps into the page
/// (`changed_unix_ns`) when a bump starts.
#[inline]
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process, so
/// a child's wake-up time can be subtracted from the parent's send time.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A `MAP_SHARED | MAP_ANONYMOUS` region: shared with every child forked
/// after it was made. Holds a few control words and one `u64` slot per
/// child.
pub struct Shm {
    base: *mut u8,
    len: usize,
    slots: usize,
}

/// Control words at the start of a [`Shm`].
pub const WORDS: usize = 16;

impl Shm {
    /// A region with [`WORDS`] `u32` words and `slots` `u64` slots, zeroed.
    pub fn new(slots: usize) -> Shm {
        let len = (WORDS * 4 + slots * 8).next_multiple_of(4096);
        // SAFETY: an anonymous shared mapping; no file, no aliasing with
        // Rust-owned memory. Checked for MAP_FAILED below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            base != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Shm {
            base: base as *mut u8,
            len,
            slots,
        }
    }

    /// Control word `i` (`i < WORDS`).
    pub fn word(&self, i: usize) -> &AtomicU32 {
        assert!(i < WORDS);
        // SAFETY: in bounds, 4-aligned, inside a live mapping owned by self;
        // only ever accessed through atomics (also by other processes).
        unsafe { &*(self.base.add(i * 4) as *const AtomicU32) }
    }

    /// Slot `i` (`i < slots`).
    pub fn slot(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.slots);
        // SAFETY: as in `word`; WORDS * 4 is 8-aligned.
        unsafe { &*(self.base.add(WORDS * 4 + i * 8) as *const AtomicU64) }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Zeroes every slot.
    pub fn clear_slots(&self) {
        for i in 0..self.slots {
            self.slot(i).store(0, Ordering::Relaxed);
        }
    }

    /// The largest value of slots `range`.
    pub fn max_slot(&self, range: std::ops::Range<usize>) -> u64 {
        range
            .map(|i| self.slot(i).load(Ordering::Acquire))
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: unmapping the region this value mapped.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// `FUTEX_WAIT` (shared, not private: the word lives in a `MAP_SHARED`
/// mapping used by several processes) while `word == expected`.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: futex(2) on a valid, aligned u32 that outlives the call.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
        )
    };
}

/// `FUTEX_WAKE` up to `n` waiters.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: futex(2) on a valid, aligned u32.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, n) };
}

/// Blocks until `word >= target` (futex, re-checking every millisecond), or
/// `limit` passes: then an error naming `what`.
pub fn wait_at_least(
    word: &AtomicU32,
    target: u32,
    limit: Duration,
    what: &str,
) -> Result<(), String> {
    let start = std::time::Instant::now();
    loop {
        let v = word.load(Ordering::Acquire);
        if v >= target {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("timed out waiting for {what}: {v} of {target}"));
        }
        futex_wait(word, v, Some(Duration::from_millis(1)));
    }
}

/// Adds one to `word` and wakes a waiter of [`wait_at_least`] when it
/// reaches `target`.
pub fn count_up(word: &AtomicU32, target: u32) {
    if word.fetch_add(1, Ordering::AcqRel) + 1 >= target {
        futex_wake(word, i32::MAX);
    }
}

/// Forks a child that runs `f` and exits with its code (`_exit`, so no
/// destructors or atexit handlers of the parent run twice). Sound only in a
/// single-threaded parent.
pub fn fork_child(f: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: the benchmark driver is single-threaded, so the child's copy
    // of the address space has no lock held by a thread that does not exist
    // in it; the child leaves through _exit.
    match unsafe { libc::fork() } {
        0 => {
            // Die with the driver, however it ends.
            // SAFETY: prctl(2) with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: terminating the child without running the parent's
            // cleanup.
            unsafe { libc::_exit(code) }
        }
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        pid => pid,
    }
}

/// Closes every descriptor from `first` up (the child's inherited copies of
/// the parent's sockets), keeping 0..first.
pub fn close_from(first: i32) {
    // SAFETY: close_range(2) closes descriptors; the caller no longer uses
    // any of them.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
}

/// SIGKILLs and reaps `pids`.
pub fn kill_all(pids: &mut Vec<libc::pid_t>) {
    for &pid in pids.iter() {
        // SAFETY: kill(2) on our own children.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for pid in pids.drain(..) {
        let mut status = 0;
        // SAFETY: waitpid(2) on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
    }
}

/// Raises `RLIMIT_NOFILE` (inherited by the daemon and the children): to
/// `want` if allowed (root may raise the hard limit up to
/// `/proc/sys/fs/nr_open`), else to the hard limit. Returns the new soft
/// limit.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit with a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// A raw read-only `MAP_SHARED` mapping of a file's first page: the
/// baseline a probe is compared with (what AWS-LC does with the page).
pub struct RawMap {
    ptr: *const u32,
}

impl RawMap {
    /// Maps the first 4096 bytes of `path` read-only, shared.
    pub fn open(path: &Path) -> std::io::Result<RawMap> {
        let file = File::open(path)?;
        // SAFETY: mapping a file read-only; the pointer is only read
        // through volatile/atomic loads.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(RawMap {
            ptr: ptr as *const u32,
        })
    }

    /// A volatile load of bytes 0..4 (the C probe's `*(volatile u32 *)`).
    #[inline(always)]
    pub fn volatile_load(&self) -> u32 {
        // SAFETY: offset 0 of a live, page-aligned mapping.
        unsafe { std::ptr::read_volatile(self.ptr) }
    }

    /// The same word as an atomic.
    #[inline(always)]
    pub fn atomic(&self) -> &AtomicU32 {
        // SAFETY: offset 0 of a live, page-aligned mapping owned by self.
        unsafe { &*(self.ptr as *const AtomicU32) }
    }

    /// The raw pointer (for a hand-written seqlock read).
    pub fn ptr(&self) -> *const u32 {
        self.ptr
    }
}

impl Drop for RawMap {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 4096) };
    }
}

/// Writes a valid generation page (as the daemon does) into `dir`, so the
/// probe can be benchmarked without a daemon.
pub fn write_page(dir: &Path, generation: u32) -> std::path::PathBuf {
    let path = dir.join("generation");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("create page file");
    let mut writer = sysgenid_page::PageWriter::new(file, &path).expect("page writer");
    writer.publish(&sysgenid_page::PageRecord {
        generation,
        epoch: [7; 16],
        changed_unix_ns: 1,
    });
    // The page lives in the file; the writer's mapping can go.
    drop(writer);
    path
}

/// Summary statistics of a sample, in the sample's unit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Number of values.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// Statistics of `values` (sorted in place).
pub fn stats(values: &mut [f64]) -> Stats {
    if values.is_empty() {
        return Stats::default();
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| {
        let i = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values[i.clamp(1, values.len()) - 1]
    };
    Stats {
        n: values.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        min: values[0],
        max: values[values.len() - 1],
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `RssAnon`, ...) in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// `VmRSS` of `pid` in bytes, from `/proc/<pid>/status`.
pub fn vm_rss(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS")
}

/// `Slab:` of `/proc/meminfo` in bytes (kernel memory held by sockets,
/// epoll items, ...: what a watcher costs outside the daemon's RSS).
pub fn slab_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("Slab:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A seqlock read of the page record written without the library (layout in
/// `sysgenid-page`): seq at 4, generation at 0, epoch 16..32, time 32..40.
#[inline(always)]
pub fn raw_seqlock(raw: &RawMap) -> (u32, [u32; 4], u64) {
    use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
    let p = raw.ptr();
    // SAFETY: all offsets are inside the live 4096-byte mapping and aligned.
    let at = |off: usize| unsafe { &*(p.add(off / 4) as *const AtomicU32) };
    // SAFETY: as above, 8-aligned.
    let changed = unsafe { &*(p.add(8) as *const AtomicU64) };
    loop {
        let s = at(4).load(Ordering::Acquire);
        if s & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let g = at(0).load(Ordering::Relaxed);
        let e = [
            at(16).load(Ordering::Relaxed),
            at(20).load(Ordering::Relaxed),
            at(24).load(Ordering::Relaxed),
            at(28).load(Ordering::Relaxed),
        ];
        let c = changed.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if at(4).load(Ordering::Relaxed) == s {
            return (g, e, c);
        }
    }
}

/// The CPUs this process may run on (`sched_getaffinity`), in order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) writes at most size_of(set) bytes into
    // a set we own.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set in bounds (i < CPU_SETSIZE).
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// Pins thread `tid` (0: the calling thread) to `cpus`.
pub fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: CPU_SET writes in bounds (cpu < CPU_SETSIZE).
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity(2) reads one set we own.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins every thread of process `pid` to `cpus` (threads it starts later
/// inherit the mask of the thread that starts them).
pub fn set_process_affinity(pid: u32, cpus: &[usize]) -> std::io::Result<()> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let tid: libc::pid_t = task?
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("odd /proc task entry"))?;
        match set_affinity(tid, cpus) {
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            other => other?,
        }
    }
    Ok(())
}
