//! Client library for `sysgenidd`, the System Generation ID daemon.
//!
//! The system generation is a `u32` that increases every time this machine
//! is restored from a snapshot or cloned. Code that holds state which must
//! be unique (RNG seeds, UUID generators, keys, leases) watches it, renews
//! that state when it changes, and acknowledges the new value, so an
//! orchestrator can wait until everyone has caught up.
//!
//! * [`Watcher`]: one watcher, as one open handle of the seed's
//!   `/dev/sysgenid`: [`read`](Watcher::read) blocks for a *new*
//!   generation, [`ack`](Watcher::ack) confirms it, its descriptor is
//!   readable exactly while it is outdated (drop it into poll/epoll), and it
//!   survives daemon restarts.
//! * [`Control`]: status, forced updates and barrier waits without being a
//!   watcher.
//! * [`Probe`]: the mapped page, for a zero-syscall check in hot paths.
//! * `tokio` feature: [`AsyncWatcher`](asyncio::AsyncWatcher).
//! * [`SnapSafe<T>`]: a value rebuilt on first use after a restore (one
//!   load per use); `rand_core` feature: [`SnapSafeRng`], any seedable RNG
//!   reseeded from the OS after a restore.
//! * [`host_channel`]: the hypervisor host's side of a guest daemon's
//!   vsock host channel (restored, freeze, thaw, wait-watchers, status).
//! * The snapshot lifecycle: a watcher opened with
//!   [`lifecycle(true)`](WatcherBuilder::lifecycle) is a participant that
//!   [`read_event`](Watcher::read_event) tells to freeze, thaw, or renew,
//!   and that [`confirm`](Watcher::confirm)s a freeze; [`Control::freeze`]
//!   and [`Control::thaw`] are the orchestrator's side (see [`Event`]).
//!
//! ```no_run
//! let mut watcher = sysgenid::Watcher::open()?;
//! loop {
//!     let generation = watcher.read()?;      // blocks until a restore
//!     // ... reseed, regenerate ids, drop leases ...
//!     watcher.ack(generation)?;              // tell the system we are done
//! }
//! # Ok::<(), sysgenid::Error>(())
//! ```

#[cfg(feature = "tokio")]
pub mod asyncio;
mod barrier;
mod conn;
pub mod host_channel;
mod lifecycle;
#[cfg(feature = "rand_core")]
mod rng;
mod snapsafe;
mod trust;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use lifecycle::Event;
use lifecycle::Freezes;
use rustix::event::PollFlags;
pub use sysgenid_proto::{
    BumpDetails, ChangeKind, DetailError, Entropy, ErrorCode, HooksStatus, Hostname,
    LifecycleState, RngStatus, SourceStatus, StatusReport, TrustStatus, MAX_ENTROPY, MAX_HOSTNAME,
    MIN_ENTROPY, PROTOCOL_VERSION,
};
use sysgenid_proto::{Reply, Request, Role, MIN_PROTOCOL_VERSION, PAGE_NAME, SOCKET_NAME};

use barrier::{wait_on_page, BarrierPage, PageAnswer};
use conn::{wait_fd, Conn, Try};
#[cfg(feature = "rand_core")]
pub use rng::SnapSafeRng;
pub use snapsafe::SnapSafe;
pub use sysgenid_proto::default_runtime_dir;

/// Everything that can go wrong. [`Error::errno`] gives the errno a kernel
/// implementation of the seed would have returned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon's socket could not be reached.
    #[error("cannot reach sysgenidd at {}: {source}. Is the daemon running? Start it with `sysgenidd` (as root) or point SYSGENID_RUNTIME_DIR at its runtime directory", socket.display())]
    NotRunning {
        /// The socket path tried.
        socket: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The socket or page is served by someone this process does not trust
    /// (not root, not its own uid): see [`Probe::open`] and the module
    /// `trust` (`EPERM`).
    #[error("refusing {}: {why}, and only root or this process's own uid {caller} is trusted (another user may have planted it). Use the system daemon (/run/sysgenid, the default) or point SYSGENID_RUNTIME_DIR at a daemon run by root or by you", path.display())]
    Untrusted {
        /// The socket or page path.
        path: PathBuf,
        /// The uid found (the daemon's, or the page file's owner).
        owner: u32,
        /// This process's effective uid.
        caller: u32,
        /// What was found.
        why: String,
    },
    /// Non-blocking read with nothing new (`EAGAIN`).
    #[error("no new generation (would block)")]
    WouldBlock,
    /// The acknowledged value is not current (`EINVAL`).
    #[error("{message}")]
    WrongGeneration {
        /// The current generation.
        current: u32,
        /// The daemon's message.
        message: String,
    },
    /// The caller's watcher is outdated (`EINTR`): handle, ack, retry.
    #[error("{message}")]
    Interrupted {
        /// The generation to handle.
        generation: u32,
        /// The daemon's message.
        message: String,
    },
    /// Barrier timeout (`ETIMEDOUT`).
    #[error("{message}")]
    TimedOut {
        /// Tracked watchers still outdated when it expired.
        outdated: u32,
        /// The daemon's message.
        message: String,
    },
    /// The freeze was aborted (timed out, thawed, or a restore came first)
    /// and every participant was thawed (`ETIMEDOUT`).
    #[error("{message}")]
    FreezeAborted {
        /// Tracked participants (and hooks) that had not confirmed.
        pending: u32,
        /// The daemon's message.
        message: String,
    },
    /// Not privileged to bump, freeze or thaw (`EACCES`).
    #[error("{0}")]
    PermissionDenied(String),
    /// Bump past `u32::MAX` (`EOVERFLOW`).
    #[error("{message}")]
    Overflow {
        /// The generation that stays.
        current: u32,
        /// The daemon's message.
        message: String,
    },
    /// The daemon speaks another protocol version (`EPROTONOSUPPORT`).
    #[error("{message}")]
    VersionMismatch {
        /// The daemon's version.
        daemon: u16,
        /// The daemon's message.
        message: String,
    },
    /// Any other refusal by the daemon.
    #[error("sysgenidd refused: {message} ({code:?})")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The daemon's message.
        message: String,
    },
    /// A guest's host channel could not be reached (`host_channel`).
    #[error("cannot reach the guest's host channel at {target}: {source}")]
    HostUnreachable {
        /// The target tried (`vsock:CID:PORT`, `uds:PATH:PORT`).
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// The daemon closed the connection (it stopped or restarted).
    #[error("sysgenidd closed the connection (stopped or restarting)")]
    Disconnected,
    /// The daemon sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A system call failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    fn from_io(e: rustix::io::Errno) -> Error {
        match e {
            rustix::io::Errno::CONNRESET | rustix::io::Errno::PIPE => Error::Disconnected,
            e => Error::Io(e.into()),
        }
    }

    fn from_reply(e: sysgenid_proto::ErrorReply) -> Error {
        let message = e.message;
        match e.code {
            ErrorCode::WrongGeneration => Error::WrongGeneration {
                current: e.value,
                message,
            },
            ErrorCode::Interrupted => Error::Interrupted {
                generation: e.value,
                message,
            },
            ErrorCode::TimedOut => Error::TimedOut {
                outdated: e.value,
                message,
            },
            ErrorCode::PermissionDenied => Error::PermissionDenied(message),
            ErrorCode::Overflow => Error::Overflow {
                current: e.value,
                message,
            },
            ErrorCode::VersionMismatch => Error::VersionMismatch {
                daemon: e.value as u16,
                message,
            },
            ErrorCode::FreezeAborted => Error::FreezeAborted {
                pending: e.value,
                message,
            },
            code => Error::Refused { code, message },
        }
    }

    /// The errno the seed's device would have returned (positive).
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotRunning { source, .. } => source.raw_os_error().unwrap_or(libc_errno::ENOENT),
            Error::Untrusted { .. } => libc_errno::EPERM,
            Error::WouldBlock => libc_errno::EAGAIN,
            Error::WrongGeneration { .. } => ErrorCode::WrongGeneration.errno(),
            Error::Interrupted { .. } => ErrorCode::Interrupted.errno(),
            Error::TimedOut { .. } => ErrorCode::TimedOut.errno(),
            Error::FreezeAborted { .. } => ErrorCode::FreezeAborted.errno(),
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied.errno(),
            Error::Overflow { .. } => ErrorCode::Overflow.errno(),
            Error::VersionMismatch { .. } => ErrorCode::VersionMismatch.errno(),
            Error::Refused { code, .. } => code.errno(),
            Error::Disconnected => libc_errno::ECONNRESET,
            Error::HostUnreachable { source, .. } => {
                source.raw_os_error().unwrap_or(libc_errno::ECONNREFUSED)
            }
            Error::Protocol(_) => ErrorCode::ProtocolViolation.errno(),
            Error::Io(e) => e.raw_os_error().unwrap_or(libc_errno::EIO),
        }
    }
}

mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EAGAIN: i32 = 11;
    pub const ECONNRESET: i32 = 104;
    pub const ECONNREFUSED: i32 = 111;
}

fn expect_done(reply: Reply) -> Result<u32, Error> {
    match reply {
        Reply::Done { generation } => Ok(generation),
        Reply::Error(e) => Err(Error::from_reply(e)),
        other => Err(Error::Protocol(format!("unexpected reply {other:?}"))),
    }
}

/// The `Welcome` to a `Hello` of `sent` version. A daemon answers with
/// the version the client asked for; any other version is one this client
/// may not speak, so it hangs up with a clear error (`docs/protocol.md`).
fn expect_welcome(conn: &Conn, sent: u16) -> Result<u32, Error> {
    match conn.reply()? {
        Reply::Welcome {
            version,
            generation,
        } if version == sent => Ok(generation),
        Reply::Welcome { version, .. } => Err(Error::VersionMismatch {
            daemon: version,
            message: format!(
                "sysgenidd answered with protocol {version} to this client's protocol {sent}: use a client and daemon from compatible releases"
            ),
        }),
        Reply::Error(e) => Err(Error::from_reply(e)),
        other => Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

/// How to open a [`Watcher`].
#[derive(Debug, Clone)]
pub struct WatcherBuilder {
    runtime_dir: PathBuf,
    untracked: bool,
    nonblocking: bool,
    reconnect: bool,
    lifecycle: bool,
}

impl Default for WatcherBuilder {
    fn default() -> Self {
        WatcherBuilder {
            runtime_dir: default_runtime_dir(),
            untracked: false,
            nonblocking: false,
            reconnect: true,
            lifecycle: false,
        }
    }
}

impl WatcherBuilder {
    /// The daemon's runtime directory (default: [`default_runtime_dir`]).
    pub fn runtime_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.runtime_dir = dir.into();
        self
    }

    /// Untracked watchers never hold up [`Watcher::wait_watchers`].
    pub fn untracked(mut self, untracked: bool) -> Self {
        self.untracked = untracked;
        self
    }

    /// [`Watcher::read`] returns [`Error::WouldBlock`] instead of blocking
    /// (the seed's `O_NONBLOCK`).
    pub fn nonblocking(mut self, nonblocking: bool) -> Self {
        self.nonblocking = nonblocking;
        self
    }

    /// Reconnect by itself when the daemon restarts (default: on). A
    /// blocked read then survives the restart and returns any change it
    /// missed.
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Opt in to the snapshot lifecycle: the watcher becomes a participant
    /// that [`Watcher::read_event`] tells to freeze and thaw, and that must
    /// [`Watcher::confirm`] each freeze (tracked participants hold a freeze
    /// up until they do). Needs a daemon speaking protocol 2.
    pub fn lifecycle(mut self, lifecycle: bool) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    /// The role and protocol version of this watcher's `Hello`: plain
    /// watchers announce version 1, so they work with any daemon; only
    /// participants need the lifecycle's version.
    fn hello(&self, acked: Option<u32>) -> (Role, u16) {
        let role = Role::Watcher {
            untracked: self.untracked,
            acked,
            lifecycle: self.lifecycle,
        };
        let version = if self.lifecycle {
            sysgenid_proto::LIFECYCLE_VERSION
        } else {
            MIN_PROTOCOL_VERSION
        };
        (role, version)
    }

    /// Connects and registers the watcher.
    pub fn open(self) -> Result<Watcher, Error> {
        let socket = self.runtime_dir.join(SOCKET_NAME);
        let (role, version) = self.hello(None);
        let conn = Conn::connect(&socket, role, version)?;
        let acked = expect_welcome(&conn, version)?;
        let page = BarrierPage::new(self.runtime_dir.join(PAGE_NAME));
        Ok(Watcher {
            conn,
            page,
            socket,
            opts: self,
            acked,
            events: VecDeque::new(),
            skipped: None,
            freezes: Freezes::default(),
        })
    }
}

/// One watcher of the system generation (see the crate docs).
///
/// Not `Sync`: use it from one thread at a time, as the seed's examples use
/// their file descriptor. Dropping it unregisters the watcher.
pub struct Watcher {
    conn: Conn,
    /// The page, for barrier waits that need no daemon hop.
    page: BarrierPage,
    socket: PathBuf,
    opts: WatcherBuilder,
    /// The generation this watcher last acknowledged (or registered at).
    acked: u32,
    /// Lifecycle events read while waiting for a reply, oldest first.
    events: VecDeque<Event>,
    /// A generation the caller chose not to acknowledge yet
    /// ([`Watcher::skip`]).
    skipped: Option<u32>,
    /// The freezes told of, across reconnections.
    freezes: Freezes,
}

impl Watcher {
    /// A tracked, blocking, reconnecting watcher on the default runtime dir.
    pub fn open() -> Result<Watcher, Error> {
        WatcherBuilder::default().open()
    }

    /// Options for opening a watcher.
    pub fn builder() -> WatcherBuilder {
        WatcherBuilder::default()
    }

    /// The generation this watcher last acknowledged, or registered at.
    pub fn acked(&self) -> u32 {
        self.acked
    }

    /// Blocks until this watcher is outdated and returns the current
    /// generation; returns it again on every call until acknowledged. In
    /// non-blocking mode returns [`Error::WouldBlock`] when there is nothing
    /// new. Survives daemon restarts when reconnecting is on.
    ///
    /// On a lifecycle participant, use [`read_event`](Self::read_event):
    /// `read` returns changes only and drops freeze and thaw events (their
    /// freezes then go unconfirmed).
    pub fn read(&mut self) -> Result<u32, Error> {
        if self.opts.lifecycle {
            return loop {
                if let Event::Change { generation } = self.read_event()? {
                    break Ok(generation);
                }
            };
        }
        self.blocking(|w| w.conn.try_changed())
    }

    /// Like [`read`](Self::read) but never blocks: `Ok(None)` when there is
    /// nothing new. If the daemon went away it tries to reconnect once
    /// (without waiting) and otherwise returns [`Error::Disconnected`] or
    /// [`Error::NotRunning`].
    pub fn try_read(&mut self) -> Result<Option<u32>, Error> {
        if self.opts.lifecycle {
            while let Some(event) = self.try_read_event()? {
                if let Event::Change { generation } = event {
                    return Ok(Some(generation));
                }
            }
            return Ok(None);
        }
        match self.conn.try_changed() {
            Ok(Try::Ready(g)) => Ok(Some(g)),
            Ok(Try::WouldBlock) => Ok(None),
            Err(Error::Disconnected) if self.opts.reconnect => {
                self.reconnect_once()?;
                self.try_read_once()
            }
            Err(e) => Err(e),
        }
    }

    fn try_read_once(&mut self) -> Result<Option<u32>, Error> {
        match self.conn.try_changed()? {
            Try::Ready(g) => Ok(Some(g)),
            Try::WouldBlock => Ok(None),
        }
    }

    /// Waits up to `timeout` for the watcher to become outdated; `Ok(true)`
    /// if it is.
    pub fn wait_readable(&self, timeout: Duration) -> Result<bool, Error> {
        wait_fd(self.conn.fd(), PollFlags::IN, Some(timeout))
    }

    /// Acknowledges `generation`, which must be the current one
    /// ([`Error::WrongGeneration`] otherwise; nothing changes).
    pub fn ack(&mut self, generation: u32) -> Result<(), Error> {
        self.request(&Request::Ack { generation })?;
        self.acked = generation;
        self.skipped = None;
        Ok(())
    }

    /// The seed's `SYSGENID_WAIT_WATCHERS`: returns when no tracked watcher
    /// is outdated, [`Error::Interrupted`] if this watcher is or becomes
    /// outdated (handle, ack, retry), [`Error::TimedOut`] after `timeout`
    /// (`None` = forever).
    ///
    /// When the daemon's page carries the barrier's count, a satisfied
    /// barrier is seen there (a futex wait, no daemon hop); the other
    /// answers still come from the daemon (see the `barrier` module; a
    /// timed-out wait then takes up to 1 ms longer).
    pub fn wait_watchers(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        let timeout = match wait_on_page(&mut self.page, self.conn.fd(), timeout, Some(self.acked))?
        {
            PageAnswer::Satisfied => return Ok(()),
            PageAnswer::AskDaemon(left) => left,
        };
        self.request(&Request::WaitWatchers {
            timeout_ms: timeout_ms(timeout),
        })
        .map(drop)
    }

    /// The seed's `SYSGENID_FORCE_GEN_UPDATE`: privileged; returns the new
    /// generation, `max(min_generation, current + 1)`.
    /// A minimum in the counter's last 2^20 values (which would leave no
    /// generation for later restores) is refused with [`Error::Overflow`];
    /// see [`Watcher::trigger_update_allowing_exhaustion`].
    pub fn trigger_update(&mut self, min_generation: u32) -> Result<u32, Error> {
        self.request(&Request::Bump {
            min_generation,
            allow_exhaustion: false,
            details: BumpDetails::default(),
        })
    }

    /// [`Watcher::trigger_update`] that also accepts a minimum in the
    /// counter's last 2^20 values, up to `u32::MAX`: after that, no later
    /// restore can ever be signalled. Only for an operator who means it.
    pub fn trigger_update_allowing_exhaustion(
        &mut self,
        min_generation: u32,
    ) -> Result<u32, Error> {
        self.request(&Request::Bump {
            min_generation,
            allow_exhaustion: true,
            details: BumpDetails::default(),
        })
    }

    /// [`Watcher::trigger_update`] with the allow-exhaustion flag and the
    /// change's [`BumpDetails`] (kind, host entropy, hostname), as
    /// [`Control::bump_with`].
    pub fn trigger_update_with(
        &mut self,
        min_generation: u32,
        allow_exhaustion: bool,
        details: BumpDetails,
    ) -> Result<u32, Error> {
        self.request(&Request::Bump {
            min_generation,
            allow_exhaustion,
            details,
        })
    }

    /// The daemon's status.
    pub fn status(&mut self) -> Result<StatusReport, Error> {
        self.conn.send(&Request::Status)?;
        match self.watcher_reply(false)? {
            Reply::Status(s) => Ok(s),
            Reply::Error(e) => Err(Error::from_reply(e)),
            other => Err(Error::Protocol(format!("expected Status, got {other:?}"))),
        }
    }

    /// The reply to the request just sent, keeping the readiness invariant
    /// visible to the caller: if the frames consumed show this watcher is
    /// still outdated, the daemon's trailing `Changed` is awaited.
    fn watcher_reply(&mut self, is_ack: bool) -> Result<Reply, Error> {
        let (reply, newest) = self.conn.reply_noting_changes(&mut self.events)?;
        // Only a successful Ack of the newest generation makes the watcher
        // up to date (a Bump's Done names the new generation while the
        // watcher is outdated).
        let acked_now = match (&reply, newest) {
            (Reply::Done { generation }, Some(n)) if is_ack && *generation == n => Some(n),
            _ => None,
        };
        if let Some(newest) = newest {
            let still_outdated = match acked_now {
                Some(_) => false,
                None => newest != self.acked,
            };
            if still_outdated && !matches!(self.conn.try_peek()?, Try::Ready(_)) {
                self.conn.await_trailing_changed()?;
            }
        }
        Ok(reply)
    }

    fn request(&mut self, request: &Request) -> Result<u32, Error> {
        let is_ack = matches!(request, Request::Ack { .. });
        let result = self
            .conn
            .send(request)
            .and_then(|()| self.watcher_reply(is_ack))
            .and_then(expect_done);
        match result {
            Err(Error::Disconnected) if self.opts.reconnect => {
                self.reconnect()?;
                self.conn.send(request)?;
                let reply = self.watcher_reply(is_ack)?;
                expect_done(reply)
            }
            other => other,
        }
    }

    /// Reconnects with backoff (10 ms doubling to 1 s), telling the daemon
    /// the generation last acknowledged so a change missed while away is
    /// delivered.
    fn reconnect(&mut self) -> Result<(), Error> {
        let mut delay = Duration::from_millis(10);
        loop {
            match self.reconnect_once() {
                Err(Error::NotRunning { .. } | Error::Disconnected) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// What `attempt` gives once it is ready: between attempts, waits for
    /// the socket (non-blocking: [`Error::WouldBlock`]), and reconnects when
    /// the daemon went away (if reconnecting is on; non-blocking: one try,
    /// no waiting). The loop of [`read`](Self::read) and
    /// [`read_event`](Self::read_event).
    fn blocking<T>(
        &mut self,
        mut attempt: impl FnMut(&mut Watcher) -> Result<Try<T>, Error>,
    ) -> Result<T, Error> {
        loop {
            match attempt(self) {
                Ok(Try::Ready(value)) => return Ok(value),
                Ok(Try::WouldBlock) if self.opts.nonblocking => return Err(Error::WouldBlock),
                Ok(Try::WouldBlock) => {
                    wait_fd(self.conn.fd(), PollFlags::IN, None)?;
                }
                Err(Error::Disconnected) if self.opts.reconnect && !self.opts.nonblocking => {
                    self.reconnect()?;
                }
                Err(Error::Disconnected) if self.opts.reconnect => self.reconnect_once()?,
                Err(e) => return Err(e),
            }
        }
    }

    /// One reconnection attempt, without waiting.
    fn reconnect_once(&mut self) -> Result<(), Error> {
        let (role, version) = self.opts.hello(Some(self.acked));
        let conn = Conn::connect(&self.socket, role, version)?;
        let generation = expect_welcome(&conn, version)?;
        self.conn = conn;
        let conn = &self.conn;
        let thaw = self.freezes.reconnected(generation, || {
            matches!(conn.try_peek(), Ok(Try::Ready(Reply::Freeze { .. })))
        });
        self.events.extend(thaw);
        Ok(())
    }
}

impl AsFd for Watcher {
    /// Readable exactly while the watcher is outdated. Changes after a
    /// reconnect: re-register it in your event loop if `read` reconnected.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.conn.fd()
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.conn.fd().as_raw_fd()
    }
}

fn timeout_ms(timeout: Option<Duration>) -> u32 {
    timeout.map_or(0, |d| d.as_millis().clamp(1, u128::from(u32::MAX)) as u32)
}

fn status_reply(conn: &Conn) -> Result<StatusReport, Error> {
    match conn.reply()? {
        Reply::Status(s) => Ok(s),
        Reply::Error(e) => Err(Error::from_reply(e)),
        other => Err(Error::Protocol(format!("expected Status, got {other:?}"))),
    }
}

/// A connection for status, forced updates and barrier waits, without
/// being a watcher.
pub struct Control {
    conn: Conn,
    /// The page, for barrier waits that need no daemon hop.
    page: BarrierPage,
    generation: u32,
    /// The protocol version this connection speaks.
    version: u16,
}

impl Control {
    /// Connects to the daemon in `runtime_dir` (`None`: the default). Speaks
    /// the newest protocol; a daemon that only speaks version 1 is served
    /// with version 1 (everything but the lifecycle works).
    /// The daemon must run as root or as this process's uid
    /// ([`Error::Untrusted`] otherwise).
    pub fn connect(runtime_dir: Option<&Path>) -> Result<Control, Error> {
        let dir = runtime_dir.map_or_else(default_runtime_dir, Path::to_path_buf);
        let socket = dir.join(SOCKET_NAME);
        let mut version = PROTOCOL_VERSION;
        loop {
            let conn = Conn::connect(&socket, Role::Control, version)?;
            match expect_welcome(&conn, version) {
                Ok(generation) => {
                    return Ok(Control {
                        conn,
                        page: BarrierPage::new(dir.join(PAGE_NAME)),
                        generation,
                        version,
                    })
                }
                Err(Error::VersionMismatch { daemon, .. })
                    if daemon < version && daemon >= MIN_PROTOCOL_VERSION =>
                {
                    version = daemon;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The generation when this connection was made.
    pub fn generation_at_connect(&self) -> u32 {
        self.generation
    }

    /// Ends the connection and waits, up to `timeout`, until the daemon
    /// has closed its end too; true if it did. For a caller that must know
    /// the daemon holds nothing of this connection any more: CRIU's
    /// `pre-dump` hook, whose connection comes from outside the container
    /// (its socket is not in the container's network namespace, and one
    /// still open in the daemon would fail the dump).
    pub fn close_and_wait(self, timeout: Duration) -> bool {
        let fd = self.conn.fd();
        if rustix::net::shutdown(fd, rustix::net::Shutdown::Write).is_err() {
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            match wait_fd(fd, PollFlags::IN, Some(left)) {
                Ok(true) => {}
                Ok(false) | Err(_) => return false,
            }
            // Replies still queued come first; then the end of the stream.
            match rustix::net::recv(fd, &mut buf, rustix::net::RecvFlags::DONTWAIT) {
                Ok((0, _)) => return true,
                Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::CONNRESET) => return true,
                Err(_) => return false,
            }
        }
    }

    /// The daemon's status.
    pub fn status(&mut self) -> Result<StatusReport, Error> {
        self.conn.send(&Request::Status)?;
        status_reply(&self.conn)
    }

    /// Forced update (privileged): returns the new generation,
    /// `max(min_generation, current + 1)`. A minimum in the counter's last
    /// 2^20 values (above 4 293 918 719, when it jumps past `current + 1`)
    /// is refused with [`Error::Overflow`]: see
    /// [`Control::bump_allowing_exhaustion`].
    pub fn bump(&mut self, min_generation: u32) -> Result<u32, Error> {
        self.send_bump(min_generation, false)
    }

    /// [`Control::bump`] that also accepts a minimum in the counter's last
    /// 2^20 values, up to `u32::MAX`: after that, no later restore can ever
    /// be signalled. Only for an operator who means it.
    pub fn bump_allowing_exhaustion(&mut self, min_generation: u32) -> Result<u32, Error> {
        self.send_bump(min_generation, true)
    }

    fn send_bump(&mut self, min_generation: u32, allow_exhaustion: bool) -> Result<u32, Error> {
        self.bump_with(min_generation, allow_exhaustion, BumpDetails::default())
    }

    /// [`Control::bump`] that also says what kind of change this is, hands
    /// the daemon entropy to mix into the kernel's pool before it reseeds
    /// it and draws the epoch, and names the hostname the hooks get as
    /// `SYSGENID_HOSTNAME` (see [`BumpDetails`]; [`Entropy`] and
    /// [`Hostname`] check their limits when made). A daemon that predates
    /// these details refuses them: [`Error::Protocol`] saying so, and
    /// nothing changed.
    pub fn bump_with(
        &mut self,
        min_generation: u32,
        allow_exhaustion: bool,
        details: BumpDetails,
    ) -> Result<u32, Error> {
        let detailed = !details.is_default();
        self.conn.send(&Request::Bump {
            min_generation,
            allow_exhaustion,
            details,
        })?;
        match expect_done(self.conn.reply()?) {
            Err(Error::Refused {
                code: ErrorCode::ProtocolViolation,
                message,
            }) if detailed && message.contains("unknown bump flags") => Err(Error::Protocol(
                "this sysgenidd predates bumps with a kind, entropy or a hostname \
                 (it refused them; nothing changed): upgrade the daemon, or bump without them"
                    .into(),
            )),
            other => other,
        }
    }

    /// Waits until no tracked watcher is outdated (never interrupted: this
    /// connection is not a watcher). `None` waits forever.
    ///
    /// When the daemon's page carries the barrier's count, the wait is a
    /// futex wait on it (no daemon hop); a timeout is still answered by
    /// the daemon (see the `barrier` module; up to 1 ms later).
    pub fn wait_watchers(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        let timeout = match wait_on_page(&mut self.page, self.conn.fd(), timeout, None)? {
            PageAnswer::Satisfied => return Ok(()),
            PageAnswer::AskDaemon(left) => left,
        };
        self.conn.send(&Request::WaitWatchers {
            timeout_ms: timeout_ms(timeout),
        })?;
        expect_done(self.conn.reply()?).map(drop)
    }
}

/// The mapped generation page: [`Probe::generation`] is one memory load.
///
/// The mapping stays valid and current across bumps and daemon restarts.
pub struct Probe {
    page: sysgenid_page::PageReader,
}

impl Probe {
    /// Maps the page in `runtime_dir` (`None`: the default). The page must
    /// be owned by root or by this process's uid and writable by nobody
    /// else ([`Error::Untrusted`] otherwise).
    pub fn open(runtime_dir: Option<&Path>) -> Result<Probe, Error> {
        let dir = runtime_dir.map_or_else(default_runtime_dir, Path::to_path_buf);
        let path = dir.join(PAGE_NAME);
        let not_running = |source| Error::NotRunning {
            socket: path.clone(),
            source,
        };
        let file = std::fs::File::open(&path).map_err(not_running)?;
        trust::check_page(&file, &path)?;
        let page = sysgenid_page::PageReader::from_file(&file, &path).map_err(|e| match e {
            sysgenid_page::PageError::Io { source, .. } => not_running(source),
            e => Error::Protocol(e.to_string()),
        })?;
        Ok(Probe { page })
    }

    /// The current generation, with no system call.
    #[inline]
    pub fn generation(&self) -> u32 {
        self.page.generation()
    }

    /// The generation word, for callers that keep a pointer (as the C
    /// probe does).
    #[inline]
    pub fn generation_word(&self) -> &std::sync::atomic::AtomicU32 {
        self.page.generation_atomic()
    }

    /// Generation, epoch id and change time, read consistently.
    pub fn record(&self) -> sysgenid_page::PageRecord {
        self.page.record()
    }
}
