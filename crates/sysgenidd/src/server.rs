//! The socket frontend and the event loop: one thread, one `epoll` (via
//! mio), every connection a small record in a slab.
//!
//! Everything that changes the generation or a watcher runs on this thread,
//! so the core needs no locks. Sources run in their own threads and hand
//! their events over a channel plus a [`mio::Waker`].
//!
//! # Readiness
//! The protocol's invariant (see `sysgenid-proto`): while a watcher is
//! outdated, the last frame the daemon has sent it is `Changed`. So on a
//! bump every watcher gets one `Changed` frame (one `send` per watcher, the
//! cheapest fan-out the kernel offers for sockets), and after every reply
//! to a still-outdated watcher another one follows. Frames that do not fit
//! in the socket buffer wait in a small per-connection outbox; consecutive
//! `Changed` frames there collapse into one, so a watcher that never reads
//! costs a bounded amount of memory, and a client that floods requests
//! without reading replies is dropped.
//!
//! # Barrier waits
//! A connection with a pending `WaitWatchers` is not read from until the
//! wait ends (one request at a time per connection, like a blocked ioctl).
//! Waits are re-evaluated after every ack, close and bump, and expire on
//! their deadline, which bounds the `epoll_wait` timeout.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use slab::Slab;
use sysgenid_core::{Barrier, CoreError, Tracking, WatcherId};
use sysgenid_proto::{
    ErrorCode, ErrorReply, Reply, Request, Role, SourceStatus, StatusReport, MAX_FRAME,
    PROTOCOL_VERSION,
};

use crate::peer::Peer;
use crate::service::{BumpError, Service};
use crate::state::epoch_hex;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Descriptors kept free of connections (pidfds for privilege checks,
/// state and device work).
const RESERVED_FDS: usize = 64;

/// Frames a connection may have waiting for its socket buffer before it is
/// considered not to be reading and dropped.
const MAX_OUTBOX: usize = 64;

/// Limits on watchers, to keep one user from exhausting the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Watchers in total.
    pub max_watchers: u32,
    /// Watchers per uid.
    pub max_watchers_per_uid: u32,
    /// Socket connections (watchers or not) per non-root uid, so that one
    /// user cannot take every descriptor the daemon has.
    pub max_connections_per_uid: u32,
    /// How long a new connection may take to send its `Hello`.
    pub hello_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_watchers: 200_000,
            max_watchers_per_uid: 50_000,
            max_connections_per_uid: 4_096,
            hello_timeout: Duration::from_secs(10),
        }
    }
}

/// Work handed to the event loop by other threads.
#[derive(Debug)]
pub enum Command {
    /// A restore-signal source saw a restore.
    SourceEvent(sysgenid_sources::SourceEvent),
    /// A source thread ended.
    SourceStopped {
        /// The source.
        name: &'static str,
        /// Why.
        error: String,
    },
    /// A request on the `/dev/sysgenid` FUSE device (see `device`).
    Device(crate::device::DeviceRequest),
}

/// A handle other threads use to reach the loop.
#[derive(Clone)]
pub struct LoopHandle {
    tx: Sender<Command>,
    waker: Arc<Waker>,
}

impl LoopHandle {
    /// Sends a command and wakes the loop. Returns false when the loop is
    /// gone (the daemon is exiting).
    pub fn send(&self, command: Command) -> bool {
        self.tx.send(command).is_ok() && self.waker.wake().is_ok()
    }
}

struct Conn {
    /// Accept order, to tell a reused slab key's connections apart.
    serial: u64,
    fd: OwnedFd,
    peer: Peer,
    greeted: bool,
    watcher: Option<WatcherId>,
    /// Pending barrier wait: its deadline (None = forever).
    waiting: Option<Option<Instant>>,
    outbox: VecDeque<Vec<u8>>,
    writable_interest: bool,
    /// Set when the connection must be closed at the end of this turn.
    doomed: bool,
    /// Close once the outbox is flushed (after a fatal error reply).
    close_after_flush: bool,
}

/// The event loop and everything it owns.
pub struct Server {
    poll: Poll,
    listener: OwnedFd,
    /// Kept open: the signal handler writes to its other end.
    _signals: mio::unix::pipe::Receiver,
    commands: Receiver<Command>,
    handle: LoopHandle,
    conns: Slab<Conn>,
    /// Connections with a pending barrier wait.
    waiters: Vec<usize>,
    /// Connections not yet greeted, oldest first: (key, serial, deadline
    /// for Hello). The serial tells a reused key's new connection apart.
    ungreeted: VecDeque<(usize, u64, Instant)>,
    /// Serial number of the next accepted connection.
    next_serial: u64,
    per_uid: HashMap<u32, u32>,
    /// Socket connections per uid.
    conns_per_uid: HashMap<u32, u32>,
    /// Connections accepted at most: the descriptor limit less a reserve,
    /// so a bump's privilege check (which needs a pidfd) and the device
    /// always have descriptors left.
    max_connections: usize,
    limits: Limits,
    service: Service,
    /// Connections marked for closing this turn.
    doomed: Vec<usize>,
    sources: Vec<SourceStatus>,
    coalescer: sysgenid_sources::Coalescer,
    shutting_down: bool,
    /// The FUSE device frontend, when serving one.
    device: Option<crate::device::Device>,
    /// systemd's watchdog, pinged by this loop as one of its timers.
    watchdog: crate::supervisor::Watchdog,
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn error(code: ErrorCode, value: u32, message: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply {
        code,
        value,
        message: message.into(),
    })
}

impl Server {
    /// Sets up the loop around a started service and a bound listener.
    pub fn new(
        service: Service,
        listener: OwnedFd,
        limits: Limits,
        coalescer: sysgenid_sources::Coalescer,
    ) -> io::Result<Server> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, commands) = std::sync::mpsc::channel();
        poll.registry().register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        let (sig_tx, mut signals) = mio::unix::pipe::new()?;
        let sig_tx = OwnedFd::from(sig_tx);
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::low_level::pipe::register(sig, sig_tx.try_clone()?)?;
        }
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        // Writing to a socket whose peer is gone must be an error, not death.
        // SAFETY: setting SIGPIPE to SIG_IGN is async-signal-safe and has no
        // memory-safety preconditions.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        Ok(Server {
            poll,
            listener,
            _signals: signals,
            commands,
            handle: LoopHandle { tx, waker },
            conns: Slab::new(),
            waiters: Vec::new(),
            ungreeted: VecDeque::new(),
            next_serial: 0,
            per_uid: HashMap::new(),
            conns_per_uid: HashMap::new(),
            max_connections: {
                let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
                nofile
                    .current
                    .map_or(usize::MAX, |n| (n as usize).saturating_sub(RESERVED_FDS))
            },
            limits,
            service,
            doomed: Vec::new(),
            sources: vec![SourceStatus {
                name: "manual".into(),
                active: true,
                detail: "privileged bump requests on the socket".into(),
                ..SourceStatus::default()
            }],
            coalescer,
            shutting_down: false,
            device: None,
            watchdog: crate::supervisor::Watchdog::from_env(),
        })
    }

    /// A handle for source threads.
    pub fn handle(&self) -> LoopHandle {
        self.handle.clone()
    }

    /// Registers a source for status reporting.
    pub fn add_source_status(&mut self, status: SourceStatus) {
        self.sources.push(status);
    }

    /// Serves the device's requests from now on (see `device`).
    pub fn attach_device(&mut self, device: crate::device::Device) {
        self.device = Some(device);
    }

    /// The service (for the startup line).
    pub fn service(&self) -> &Service {
        &self.service
    }

    /// Runs until SIGTERM/SIGINT.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !self.shutting_down {
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => self.drain_commands(),
                    SIGNALS => self.shutting_down = true,
                    Token(key) => {
                        if event.is_writable() {
                            self.flush(key);
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read_conn(key, event.is_read_closed() || event.is_error());
                        }
                    }
                }
            }
            self.expire_waits();
            self.expire_silent_connections();
            self.watchdog.tick(Instant::now());
            self.reap();
        }
        self.shutdown();
        Ok(())
    }

    fn shutdown(&mut self) {
        tracing::info!(
            generation = self.service.generation(),
            "shutting down; the saved generation is kept for the next start"
        );
        for key in std::mem::take(&mut self.waiters) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.waiting = None;
            }
            self.send_reply(
                key,
                error(
                    ErrorCode::ShuttingDown,
                    0,
                    "sysgenidd is shutting down; retry when it is back",
                ),
            );
        }
        self.service.dir().remove_socket();
        if let Some(device) = &mut self.device {
            device.shutdown();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.waiters
            .iter()
            .filter_map(|&k| self.conns.get(k).and_then(|c| c.waiting.flatten()))
            .chain(self.device.as_ref().and_then(|d| d.next_deadline()))
            .chain(self.ungreeted.front().map(|&(_, _, deadline)| deadline))
            .chain(self.watchdog.deadline())
            .min()
    }

    fn accept_all(&mut self) {
        loop {
            let fd = match rustix::net::accept_with(
                &self.listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog and
                    // try again on the next event rather than spin.
                    tracing::warn!("accept failed: {e}; raise RLIMIT_NOFILE if this persists");
                    return;
                }
            };
            let peer = match Peer::of(&fd) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("dropping connection with unreadable peer: {e}");
                    continue;
                }
            };
            let theirs = self.conns_per_uid.get(&peer.uid).copied().unwrap_or(0);
            let refusal = if self.conns.len() >= self.max_connections {
                Some(format!(
                    "sysgenidd has {} connections, all its descriptors allow; try again later",
                    self.conns.len()
                ))
            } else if peer.uid != 0 && theirs >= self.limits.max_connections_per_uid {
                Some(format!(
                    "uid {} already has {theirs} connections, the per-user limit (--max-connections-per-uid)",
                    peer.uid
                ))
            } else {
                None
            };
            if let Some(message) = refusal {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    "refusing a connection: {message}"
                );
                let frame = error(ErrorCode::TooManyWatchers, 0, message).encode();
                let _ = rustix::net::send(&fd, &frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
                // Read what the client already sent: closing with unread
                // data would report a reset to it ahead of our error frame.
                let mut sink = [0u8; 64];
                while rustix::net::recv(&fd, &mut sink, RecvFlags::DONTWAIT)
                    .is_ok_and(|(n, _)| n > 0)
                {}
                continue;
            }

            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut SourceFd(&fd.as_raw_fd()),
                Token(key),
                Interest::READABLE,
            ) {
                tracing::warn!("cannot watch a new connection: {e}");
                continue;
            }
            *self.conns_per_uid.entry(peer.uid).or_insert(0) += 1;
            let serial = self.next_serial;
            self.next_serial += 1;
            self.ungreeted
                .push_back((key, serial, Instant::now() + self.limits.hello_timeout));
            entry.insert(Conn {
                serial,
                fd,
                peer,
                greeted: false,
                watcher: None,
                waiting: None,
                outbox: VecDeque::new(),
                writable_interest: false,
                doomed: false,
                close_after_flush: false,
            });
        }
    }

    fn drain_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::SourceEvent(ev) => self.on_source_event(ev),
                Command::Device(request) => self.on_device(request),
                Command::SourceStopped { name, error } => {
                    tracing::error!(source = name, "source stopped: {error}");
                    if let Some(s) = self.sources.iter_mut().find(|s| s.name == name) {
                        s.active = false;
                        s.detail = format!("stopped: {error}");
                    }
                }
            }
        }
    }

    fn on_source_event(&mut self, ev: sysgenid_sources::SourceEvent) {
        if let Some(s) = self.sources.iter_mut().find(|s| s.name == ev.source) {
            s.events += 1;
            s.last_event_unix_ms = Some(unix_ms_now());
        }
        match self.coalescer.offer(ev.source, Instant::now()) {
            sysgenid_sources::Offer::Bump => {
                tracing::info!(source = ev.source, "restore signal: {}", ev.detail);
                if let Err(e) = self.bump(0, ev.source) {
                    tracing::error!(source = ev.source, "could not bump: {e}");
                }
            }
            sysgenid_sources::Offer::Merged => {
                tracing::info!(
                    source = ev.source,
                    "restore signal coalesced with the change just made: {}",
                    ev.detail
                );
                self.service.note_agreeing_source(ev.source);
            }
        }
    }

    /// Bumps and notifies everyone. The page is already published when this
    /// starts sending.
    fn bump(&mut self, min: u32, source: &str) -> Result<u32, BumpError> {
        let generation = self.service.bump(min, source)?;
        tracing::info!(generation, source, "generation changed");
        if let Some(device) = &mut self.device {
            device.on_bump(&self.service.core, self.service.record());
        }
        let changed = Reply::Changed { generation }.encode();
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.watcher.is_some())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.send_frame(key, &changed);
        }
        self.settle_waits();
        Ok(generation)
    }

    fn read_conn(&mut self, key: usize, closed: bool) {
        let mut buf = [0u8; MAX_FRAME + 1];
        loop {
            let Some(conn) = self.conns.get(key) else {
                return;
            };
            if conn.doomed || conn.close_after_flush || conn.waiting.is_some() {
                if closed && conn.waiting.is_some() {
                    // The waiter hung up: end its wait with it.
                    self.doom(key);
                }
                return;
            }
            match rustix::net::recv(&conn.fd, &mut buf, RecvFlags::DONTWAIT | RecvFlags::TRUNC) {
                Ok((0, _)) => {
                    self.doom(key);
                    return;
                }
                Ok((_, len)) if len > MAX_FRAME => {
                    self.fatal(
                        key,
                        ErrorCode::ProtocolViolation,
                        format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
                    );
                    return;
                }
                Ok((n, _)) => self.on_frame(key, &buf[..n]),
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => {
                    self.doom(key);
                    return;
                }
            }
        }
    }

    fn on_frame(&mut self, key: usize, frame: &[u8]) {
        let greeted = self.conns[key].greeted;
        if !greeted {
            if let Some(v) = Request::peek_hello_version(frame) {
                if v != PROTOCOL_VERSION {
                    self.fatal(key, ErrorCode::VersionMismatch, format!(
                        "this client speaks sysgenid protocol {v}, but sysgenidd {} speaks protocol {PROTOCOL_VERSION}: use a client and daemon from the same release",
                        env!("CARGO_PKG_VERSION")
                    ));
                    return;
                }
            }
        }
        let request = match Request::decode(frame) {
            Ok(r) => r,
            Err(e) => {
                self.fatal(
                    key,
                    ErrorCode::ProtocolViolation,
                    format!("malformed frame: {e}"),
                );
                return;
            }
        };
        match (greeted, request) {
            (false, Request::Hello { role, .. }) => self.on_hello(key, role),
            (false, _) => self.fatal(
                key,
                ErrorCode::ProtocolViolation,
                "the first frame must be Hello",
            ),
            (true, Request::Hello { .. }) => {
                self.fatal(key, ErrorCode::ProtocolViolation, "Hello sent twice")
            }
            (true, Request::Ack { generation }) => self.on_ack(key, generation),
            (true, Request::WaitWatchers { timeout_ms }) => self.on_wait(key, timeout_ms),
            (true, Request::Bump { min_generation }) => self.on_bump(key, min_generation),
            (true, Request::Status) => {
                let report = self.status();
                self.send_reply(key, Reply::Status(report));
            }
        }
    }

    fn on_hello(&mut self, key: usize, role: Role) {
        let uid = self.conns[key].peer.uid;
        if let Role::Watcher { untracked, acked } = role {
            let counts = self.service.core.counts();
            let mine = self.per_uid.get(&uid).copied().unwrap_or(0);
            if counts.watchers >= self.limits.max_watchers {
                self.fatal(
                    key,
                    ErrorCode::TooManyWatchers,
                    format!(
                        "sysgenidd already has {} watchers, its limit (--max-watchers)",
                        self.limits.max_watchers
                    ),
                );
                return;
            }
            if mine >= self.limits.max_watchers_per_uid {
                self.fatal(key, ErrorCode::TooManyWatchers, format!(
                    "uid {uid} already has {mine} watchers, the per-user limit (--max-watchers-per-uid)"
                ));
                return;
            }
            let tracking = if untracked {
                Tracking::Untracked
            } else {
                Tracking::Tracked
            };
            let id = self.service.core.register(tracking, acked);
            *self.per_uid.entry(uid).or_insert(0) += 1;
            self.conns[key].watcher = Some(id);
        }
        self.conns[key].greeted = true;
        let generation = self.service.generation();
        self.send_reply(
            key,
            Reply::Welcome {
                version: PROTOCOL_VERSION,
                generation,
            },
        );
    }

    fn on_ack(&mut self, key: usize, generation: u32) {
        let Some(id) = self.conns[key].watcher else {
            self.send_reply(
                key,
                error(
                    ErrorCode::NotAWatcher,
                    0,
                    "this connection is not a watcher; open it as one to acknowledge",
                ),
            );
            return;
        };
        match self.service.core.ack(id, generation) {
            Ok(changed) => {
                self.send_reply(key, Reply::Done { generation });
                if changed {
                    self.settle_waits();
                }
            }
            Err(CoreError::WrongGeneration { acked, current }) => self.send_reply(
                key,
                error(
                    ErrorCode::WrongGeneration,
                    current,
                    format!(
                    "cannot acknowledge generation {acked}: the current generation is {current}"
                ),
                ),
            ),
            Err(e) => self.send_reply(key, error(ErrorCode::Internal, 0, e.to_string())),
        }
    }

    fn on_wait(&mut self, key: usize, timeout_ms: u32) {
        let caller = self.conns[key].watcher;
        match self.service.core.barrier(caller) {
            Ok(Barrier::Satisfied) => {
                let generation = self.service.generation();
                self.send_reply(key, Reply::Done { generation });
            }
            Ok(Barrier::Interrupted { generation }) => {
                self.send_reply(key, interrupted(generation))
            }
            Ok(Barrier::Pending { .. }) => {
                let deadline = (timeout_ms > 0)
                    .then(|| Instant::now() + Duration::from_millis(u64::from(timeout_ms)));
                self.conns[key].waiting = Some(deadline);
                self.waiters.push(key);
            }
            Err(e) => self.send_reply(key, error(ErrorCode::Internal, 0, e.to_string())),
        }
    }

    fn on_bump(&mut self, key: usize, min: u32) {
        let conn = &self.conns[key];
        let peer = &conn.peer;
        if !peer.may_bump(&conn.fd) {
            let message = format!(
                "permission denied: forcing a generation update needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE (uid {}, pid {} has neither)",
                peer.uid, peer.pid
            );
            tracing::warn!("{message}");
            self.send_reply(key, error(ErrorCode::PermissionDenied, 0, message));
            return;
        }
        if let Some(s) = self.sources.iter_mut().find(|s| s.name == "manual") {
            s.events += 1;
            s.last_event_unix_ms = Some(unix_ms_now());
        }
        // A manual bump is deliberate: never coalesced with anything.
        match self.bump(min, "manual") {
            Ok(generation) => self.send_reply(key, Reply::Done { generation }),
            Err(BumpError::Core(CoreError::Overflow { current })) => self.send_reply(
                key,
                error(
                    ErrorCode::Overflow,
                    current,
                    format!(
                        "generation {current} cannot be bumped: the next value would pass {}",
                        u32::MAX
                    ),
                ),
            ),
            Err(e) => self.send_reply(key, error(ErrorCode::Internal, 0, e.to_string())),
        }
    }

    /// Answers every pending wait whose barrier is no longer pending.
    fn settle_waits(&mut self) {
        if let Some(device) = &mut self.device {
            device.settle(&self.service.core);
        }
        let mut i = 0;
        while i < self.waiters.len() {
            let key = self.waiters[i];
            let Some(conn) = self.conns.get(key) else {
                self.waiters.swap_remove(i);
                continue;
            };
            let reply = match self.service.core.barrier(conn.watcher) {
                Ok(Barrier::Pending { .. }) => {
                    i += 1;
                    continue;
                }
                Ok(Barrier::Satisfied) => Reply::Done {
                    generation: self.service.generation(),
                },
                Ok(Barrier::Interrupted { generation }) => interrupted(generation),
                Err(e) => error(ErrorCode::Internal, 0, e.to_string()),
            };
            self.waiters.swap_remove(i);
            self.end_wait(key, reply);
        }
    }

    fn expire_waits(&mut self) {
        let now = Instant::now();
        if let Some(device) = &mut self.device {
            device.expire(now);
        }
        let mut i = 0;
        while i < self.waiters.len() {
            let key = self.waiters[i];
            let expired = self
                .conns
                .get(key)
                .map(|c| matches!(c.waiting, Some(Some(d)) if d <= now));
            match expired {
                None => {
                    self.waiters.swap_remove(i);
                }
                Some(false) => i += 1,
                Some(true) => {
                    self.waiters.swap_remove(i);
                    let outdated = self.service.core.counts().outdated;
                    self.end_wait(
                        key,
                        error(
                            ErrorCode::TimedOut,
                            outdated,
                            format!("timed out with {outdated} tracked watcher(s) still outdated"),
                        ),
                    );
                }
            }
        }
    }

    /// Drops connections that did not send their `Hello` in time.
    fn expire_silent_connections(&mut self) {
        let now = Instant::now();
        while let Some(&(key, serial, deadline)) = self.ungreeted.front() {
            if deadline > now {
                break;
            }
            self.ungreeted.pop_front();
            let silent = self.conns.get(key).is_some_and(|c| {
                c.serial == serial && !c.greeted && !c.doomed && !c.close_after_flush
            });
            if silent {
                let ms = self.limits.hello_timeout.as_millis();
                self.fatal(
                    key,
                    ErrorCode::ProtocolViolation,
                    format!("no Hello within {ms} ms of connecting"),
                );
            }
        }
    }

    fn end_wait(&mut self, key: usize, reply: Reply) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.waiting = None;
            self.send_reply(key, reply);
            // Requests that arrived during the wait are still queued.
            self.read_conn(key, false);
        }
    }

    fn status(&self) -> StatusReport {
        let counts = self.service.core.counts();
        let record = self.service.record();
        StatusReport {
            generation: counts.generation,
            epoch: epoch_hex(&record.epoch),
            watchers: counts.watchers,
            tracked: counts.tracked,
            outdated: counts.outdated,
            outdated_untracked: counts.outdated_untracked,
            uptime_ms: self.service.uptime().as_millis() as u64,
            last_change_unix_ms: (record.changed_unix_ns > 0)
                .then_some(record.changed_unix_ns / 1_000_000),
            last_change_sources: self.service.last_change_sources().to_vec(),
            sources: self.sources.clone(),
            runtime_dir: self.service.dir().path().display().to_string(),
            device: self.device.as_ref().map(|d| d.describe()),
            daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    /// Sends a reply and, if the connection is a still-outdated watcher, the
    /// `Changed` frame that keeps its socket readable.
    fn send_reply(&mut self, key: usize, reply: Reply) {
        self.send_frame(key, &reply.encode());
        let Some(id) = self.conns.get(key).and_then(|c| c.watcher) else {
            return;
        };
        if let Ok(Some(generation)) = self.service.core.poll_read(id) {
            self.send_frame(key, &Reply::Changed { generation }.encode());
        }
    }

    /// Sends an error and closes the connection once it is flushed.
    fn fatal(&mut self, key: usize, code: ErrorCode, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(conn = key, "closing connection: {message}");
        self.send_frame(
            key,
            &error(
                code,
                if code == ErrorCode::VersionMismatch {
                    u32::from(PROTOCOL_VERSION)
                } else {
                    0
                },
                message,
            )
            .encode(),
        );
        if let Some(conn) = self.conns.get_mut(key) {
            conn.close_after_flush = true;
            if conn.outbox.is_empty() {
                conn.doomed = true;
                self.doomed.push(key);
            }
        }
    }

    /// Sends one frame now, or queues it (allocating only then) when the
    /// socket buffer is full.
    fn send_frame(&mut self, key: usize, frame: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.doomed {
            return;
        }
        if conn.outbox.is_empty() {
            match rustix::net::send(&conn.fd, frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(_) => return,
                Err(rustix::io::Errno::AGAIN) => {}
                Err(_) => {
                    conn.doomed = true;
                    self.doomed.push(key);
                    return;
                }
            }
        }
        let is_changed = |f: &[u8]| matches!(Reply::decode(f), Ok(Reply::Changed { .. }));
        if is_changed(frame) && conn.outbox.back().is_some_and(|f| is_changed(f)) {
            // Only the newest Changed matters.
            *conn.outbox.back_mut().expect("checked non-empty") = frame.to_vec();
        } else {
            conn.outbox.push_back(frame.to_vec());
        }
        if conn.outbox.len() > MAX_OUTBOX {
            tracing::warn!(
                conn = key,
                pid = conn.peer.pid,
                "dropping a client that does not read its replies"
            );
            conn.doomed = true;
            self.doomed.push(key);
            return;
        }
        if !conn.writable_interest {
            conn.writable_interest = true;
            let _ = self.poll.registry().reregister(
                &mut SourceFd(&conn.fd.as_raw_fd()),
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            );
        }
    }

    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        while let Some(frame) = conn.outbox.front() {
            match rustix::net::send(&conn.fd, frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
                Ok(_) => {
                    conn.outbox.pop_front();
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => {
                    conn.doomed = true;
                    self.doomed.push(key);
                    return;
                }
            }
        }
        if conn.close_after_flush {
            conn.doomed = true;
            self.doomed.push(key);
            return;
        }
        conn.writable_interest = false;
        let _ = self.poll.registry().reregister(
            &mut SourceFd(&conn.fd.as_raw_fd()),
            Token(key),
            Interest::READABLE,
        );
    }

    fn doom(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.doomed {
                conn.doomed = true;
                self.doomed.push(key);
            }
        }
    }

    /// Closes doomed connections, releasing their watchers.
    fn reap(&mut self) {
        if self.doomed.is_empty() {
            return;
        }
        let mut released = false;
        for key in std::mem::take(&mut self.doomed) {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&conn.fd.as_fd().as_raw_fd()));
            if let Some(n) = self.conns_per_uid.get_mut(&conn.peer.uid) {
                *n -= 1;
                if *n == 0 {
                    self.conns_per_uid.remove(&conn.peer.uid);
                }
            }
            if let Some(id) = conn.watcher {
                released |= self.service.core.unregister(id).is_ok();
                if let Some(n) = self.per_uid.get_mut(&conn.peer.uid) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_uid.remove(&conn.peer.uid);
                    }
                }
            }
            self.waiters.retain(|&k| k != key);
        }
        if released {
            self.settle_waits();
        }
        // Descriptors were freed: accept what may have waited in the
        // backlog since an accept failed with EMFILE (the listener is
        // edge-triggered and would not report those connections again).
        self.accept_all();
    }
}

impl Server {
    /// A request on the FUSE device: the device frontend answers it; a
    /// forced update goes through the same bump as the socket's.
    fn on_device(&mut self, request: crate::device::DeviceRequest) {
        let Some(device) = &mut self.device else {
            return;
        };
        let effect = device.handle(
            request,
            &mut self.service.core,
            &mut self.per_uid,
            &self.limits,
        );
        if let Some((unique, min)) = effect.bump {
            if let Some(s) = self.sources.iter_mut().find(|s| s.name == "manual") {
                s.events += 1;
                s.last_event_unix_ms = Some(unix_ms_now());
            }
            let result = self.bump(min, "manual");
            if let Err(e) = &result {
                tracing::error!("forced update on the device failed: {e}");
            }
            if let Some(device) = &self.device {
                device.answer_bump(unique, &result);
            }
        }
        if effect.settle {
            self.settle_waits();
        }
    }
}

fn interrupted(generation: u32) -> Reply {
    error(
        ErrorCode::Interrupted,
        generation,
        format!("interrupted: this watcher is outdated; handle generation {generation}, acknowledge it and retry"),
    )
}
