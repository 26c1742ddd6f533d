//! The socket frontend: `<runtime dir>/sysgenid.sock`, one `SOCK_SEQPACKET`
//! connection per client, each a small record in a slab.
//!
//! It accepts, reads frames, answers the protocol (`docs/protocol.md`) and
//! keeps every connection's outbox. It changes watchers only through
//! [`Watchers`] and leaves what follows from a change (settling barrier
//! waits, a privileged bump and its fan-out) to the event loop through the
//! [`WorkList`]. It owns no loop: the loop hands it readiness events and
//! calls it back.
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
//! without reading replies is dropped: when its outbox passes
//! `MAX_OUTBOX` (64) frames, or when the bytes waiting in all of its uid's
//! outboxes (or in everyone's) would pass the budget
//! (`--max-queued-bytes-per-uid`, `--max-queued-bytes`). An outbox that
//! empties gives its memory back, and after a large release the allocator
//! is asked to return free pages to the kernel, so the daemon shrinks
//! again once a flood ends.
//!
//! # Lifecycle participants (protocol version 2)
//! A watcher that opted in is also a lifecycle participant: the loop hands
//! this frontend each lifecycle transition and it sends `Freeze` or `Thaw`
//! to every participant, followed by a `Changed` when that participant is
//! outdated (so the readiness invariant holds). A `Freeze` request keeps
//! its connection busy, like a barrier wait, until the loop answers it
//! with the freeze's outcome ([`SocketFrontend::answer_freeze`]); if that
//! connection closes first, the freeze is aborted. Version 1 connections
//! never see any of it.
//!
//! # One request at a time, a bounded number per turn
//! A connection with a pending `WaitWatchers` or `Bump` is not read from
//! until the loop answers it (one request at a time per connection, like a
//! blocked ioctl); the answer queues the connection to be read again on
//! the loop's next turn, never from inside the answer. A connection is
//! read for at most [`FRAMES_PER_TURN`] frames per turn and then waits its
//! turn behind the other ready connections, so one client that pipelines
//! requests cannot starve the others.
//!
//! The listener is treated the same way: at most [`ACCEPTS_PER_TURN`]
//! connections are accepted per turn, and if the backlog may hold more the
//! listener is queued on the work list for the next turn. A client that
//! connects and closes in a loop keeps the backlog from ever emptying;
//! accepting until `EAGAIN` once kept the loop in here for as long as that
//! lasted (no replies, bumps, deadlines or watchdog pings). A refused
//! connection costs O(1): a pre-encoded error frame, no formatting, and a
//! rate-limited log line (`ratelimit`).

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use slab::Slab;
use sysgenid_core::lifecycle::{FreezeId, LifecycleError, ParticipantId};
use sysgenid_core::{CoreError, Generation, Tracking, WatcherId};
use sysgenid_proto::{
    ErrorCode, Reply, Request, Role, StatusReport, LIFECYCLE_VERSION, MAX_FRAME,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

use crate::peer::{Peer, Sender};
use crate::requests::{self, error, Started};
use crate::service::BumpError;
use crate::watchers::{Bumped, Limits, Watchers};
use crate::work::{BumpRequest, Pending, PrivilegedBump, Requester, WorkList};

/// The listener's token; connections use their slab key.
pub const LISTENER: Token = Token(usize::MAX - 1);

/// Descriptors kept free of connections (pidfds for privilege checks,
/// state and device work).
const RESERVED_FDS: usize = 64;

/// Frames a connection may have waiting for its socket buffer before it is
/// considered not to be reading and dropped.
const MAX_OUTBOX: usize = 64;

/// Frames read from one connection per loop turn before the other ready
/// connections get theirs.
pub const FRAMES_PER_TURN: usize = 16;

/// Connections accepted (or refused) per loop turn before everything
/// else gets its turn.
pub const ACCEPTS_PER_TURN: usize = 64;

/// Bytes read (and dropped) from a refused connection before closing it,
/// so the client sees our error frame rather than a reset.
const REFUSED_DRAIN_FRAMES: usize = 4;

/// What a queued frame costs beyond its bytes, for the memory budget: its
/// `Vec` in the outbox and the allocator's chunk header and rounding.
pub const FRAME_OVERHEAD: usize = 64;

/// Freed outbox bytes after which the allocator is asked to give free
/// pages back to the kernel.
const TRIM_AFTER: usize = 1 << 20;

/// What a socket handler may touch besides the frontend itself.
pub struct Context<'a> {
    /// The one owner of watchers and limits.
    pub watchers: &'a mut Watchers,
    /// Where consequences go.
    pub work: &'a mut WorkList,
    /// Builds a status report (the loop knows the sources and the device).
    pub status: &'a dyn Fn(&Watchers) -> StatusReport,
}

struct Conn {
    /// Accept order, to tell a reused slab key's connections apart.
    serial: u64,
    fd: OwnedFd,
    peer: Peer,
    greeted: bool,
    /// The protocol version announced in `Hello`.
    version: u16,
    watcher: Option<WatcherId>,
    /// Set for lifecycle participants (version 2 watchers that opted in).
    participant: Option<ParticipantId>,
    /// A `WaitWatchers`, `Bump` or `Freeze` is in the loop's hands: read
    /// nothing more.
    busy: bool,
    /// Queued on the work list to be read again: readiness events do not
    /// read it meanwhile, so it gets one share per turn however often its
    /// client writes.
    scheduled: bool,
    outbox: VecDeque<Vec<u8>>,
    /// What the outbox costs (see [`FRAME_OVERHEAD`]).
    queued: usize,
    writable_interest: bool,
    /// Set when the connection must be closed at the end of this turn.
    doomed: bool,
    /// Close once the outbox is flushed (after a fatal error reply).
    close_after_flush: bool,
}

/// The socket frontend.
pub struct SocketFrontend {
    registry: Registry,
    listener: OwnedFd,
    conns: Slab<Conn>,
    /// Pending barrier waits, by connection key.
    waits: Pending<usize>,
    /// Connections not yet greeted, oldest first: (key, serial, deadline
    /// for Hello). The serial tells a reused key's new connection apart.
    ungreeted: VecDeque<(usize, u64, Instant)>,
    /// Serial number of the next accepted connection.
    next_serial: u64,
    /// Socket connections per uid.
    conns_per_uid: HashMap<u32, u32>,
    /// Connections accepted at most: the descriptor limit less a reserve,
    /// so a bump's privilege check (which needs a pidfd) and the device
    /// always have descriptors left.
    max_connections: usize,
    /// Connections marked for closing this turn.
    doomed: Vec<usize>,
    /// The outboxes' memory budget and use.
    queued: QueueBudget,
    /// The connections waiting for the outcome of their `Freeze`, by
    /// freeze number. Usually one; a freeze whose outcome is not announced
    /// yet may have ended and another started in the same turn, and each
    /// outcome goes to the orchestrator of that very freeze.
    freezers: Vec<(FreezeId, usize)>,
    /// The refusals at accept, encoded once: (every descriptor in use,
    /// the per-uid limit).
    refusal_full: Vec<u8>,
    refusal_per_uid: Vec<u8>,
    /// An accept failed for want of descriptors: accept again once a
    /// connection closes.
    accept_starved: bool,
}

pub use crate::requests::FreezeOutcome;

/// Bytes waiting in outboxes, in total and per uid, against their limits.
struct QueueBudget {
    max_total: usize,
    max_per_uid: usize,
    total: usize,
    per_uid: HashMap<u32, usize>,
    /// Released since the allocator was last asked to trim.
    freed_since_trim: usize,
}

impl QueueBudget {
    /// Why `uid` may not queue `cost` more bytes, if it may not.
    fn refusal(&self, uid: u32, cost: usize) -> Option<String> {
        let theirs = self.per_uid.get(&uid).copied().unwrap_or(0);
        if uid != 0 && theirs + cost > self.max_per_uid {
            Some(format!(
                "the unread replies of uid {uid} would take {} bytes, over the per-user budget of {} (--max-queued-bytes-per-uid)",
                theirs + cost,
                self.max_per_uid
            ))
        } else if self.total + cost > self.max_total {
            Some(format!(
                "the unread replies of all clients would take {} bytes, over the budget of {} (--max-queued-bytes)",
                self.total + cost,
                self.max_total
            ))
        } else {
            None
        }
    }

    fn charge(&mut self, uid: u32, cost: usize) {
        self.total += cost;
        *self.per_uid.entry(uid).or_insert(0) += cost;
    }

    fn release(&mut self, uid: u32, cost: usize) {
        self.total -= cost;
        self.freed_since_trim += cost;
        if let Some(n) = self.per_uid.get_mut(&uid) {
            *n -= cost;
            if *n == 0 {
                self.per_uid.remove(&uid);
            }
        }
    }
}

/// Asks the allocator to return free heap pages to the kernel. glibc keeps
/// freed small chunks in its arenas, so after thousands of outboxes are
/// freed the daemon's resident size would otherwise stay at its peak.
fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists (under
    // its lock) and releases whole free pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What one receive call got.
enum Received {
    /// A frame of this many bytes (at most `MAX_FRAME`), and its sender if
    /// it is of a privileged kind (see `peer::recv_frame`).
    Frame(usize, Option<Sender>),
    /// A frame over the limit, of this many bytes.
    TooLong(usize),
    /// The peer hung up.
    Closed,
    /// Nothing to read now.
    Empty,
    /// The socket failed.
    Failed,
}

/// Receives one frame into `buf` (`MAX_FRAME + 1` bytes).
fn receive(fd: &OwnedFd, buf: &mut [u8]) -> Received {
    loop {
        return match crate::peer::recv_frame(fd.as_fd(), &mut *buf) {
            Ok((0, _, _)) => Received::Closed,
            Ok((_, len, _)) if len > MAX_FRAME => Received::TooLong(len),
            Ok((n, _, sender)) => Received::Frame(n, sender),
            Err(rustix::io::Errno::AGAIN) => Received::Empty,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => Received::Failed,
        };
    }
}

impl SocketFrontend {
    /// Serves a bound listener, registering it with `registry`.
    pub fn new(
        listener: OwnedFd,
        registry: Registry,
        limits: &Limits,
    ) -> std::io::Result<SocketFrontend> {
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        Ok(SocketFrontend {
            registry,
            listener,
            conns: Slab::new(),
            waits: Pending::default(),
            ungreeted: VecDeque::new(),
            next_serial: 0,
            conns_per_uid: HashMap::new(),
            max_connections: nofile
                .current
                .map_or(usize::MAX, |n| (n as usize).saturating_sub(RESERVED_FDS)),
            doomed: Vec::new(),
            queued: QueueBudget {
                max_total: limits.max_queued_bytes,
                max_per_uid: limits.max_queued_bytes_per_uid,
                total: 0,
                per_uid: HashMap::new(),
                freed_since_trim: 0,
            },
            freezers: Vec::new(),
            refusal_full: error(
                ErrorCode::TooManyWatchers,
                0,
                "sysgenidd has as many connections as its descriptors allow; try again later",
            )
            .encode(),
            refusal_per_uid: error(
                ErrorCode::TooManyWatchers,
                0,
                format!(
                    "this uid already has {} connections, the per-user limit (--max-connections-per-uid)",
                    limits.max_connections_per_uid
                ),
            )
            .encode(),
            accept_starved: false,
        })
    }

    /// The earliest deadline: a barrier wait's or a `Hello`'s.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.waits
            .next_deadline()
            .into_iter()
            .chain(self.ungreeted.front().map(|&(_, _, deadline)| deadline))
            .min()
    }

    /// Accepts up to [`ACCEPTS_PER_TURN`] connections from the backlog;
    /// if it may hold more, queues the listener on the work list to be
    /// accepted from again next turn.
    pub fn accept_all(&mut self, watchers: &Watchers, work: &mut WorkList) {
        let limits = *watchers.limits();
        // After a restore by CRIU, for the connections still to come.
        crate::peer::keep_passing_credentials(self.listener.as_fd());
        for _ in 0..ACCEPTS_PER_TURN {
            let fd = match rustix::net::accept_with(
                &self.listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    self.accept_starved = true;
                    // EMFILE and friends: leave the rest in the backlog and
                    // try again when a connection closes (`reap`) rather
                    // than spin.
                    crate::log_limited!(
                        crate::ratelimit::Kind::Connection,
                        warn,
                        "accept failed: {e}; raise RLIMIT_NOFILE if this persists"
                    );
                    return;
                }
            };
            crate::peer::keep_passing_credentials(fd.as_fd());
            let peer = match Peer::of(&fd) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!("dropping connection with unreadable peer: {e}");
                    continue;
                }
            };
            let theirs = self.conns_per_uid.get(&peer.uid).copied().unwrap_or(0);
            let refusal = if self.conns.len() >= self.max_connections {
                Some(&self.refusal_full)
            } else if peer.uid != 0 && theirs >= limits.max_connections_per_uid {
                Some(&self.refusal_per_uid)
            } else {
                None
            };
            if let Some(frame) = refusal {
                crate::log_limited!(
                    crate::ratelimit::Kind::Connection,
                    warn,
                    uid = peer.uid,
                    pid = peer.pid,
                    "refusing a connection: {}",
                    if std::ptr::eq(frame, &self.refusal_full) {
                        "every descriptor is in use"
                    } else {
                        "the uid is at its connection limit (--max-connections-per-uid)"
                    }
                );
                let _ = rustix::net::send(&fd, frame, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
                // Read what the client already sent (a bounded amount):
                // closing with unread data would report a reset to it
                // ahead of our error frame.
                let mut sink = [0u8; 64];
                for _ in 0..REFUSED_DRAIN_FRAMES {
                    if !rustix::net::recv(&fd, &mut sink, RecvFlags::DONTWAIT)
                        .is_ok_and(|(n, _)| n > 0)
                    {
                        break;
                    }
                }
                continue;
            }

            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.registry.register(
                &mut SourceFd(&fd.as_raw_fd()),
                Token(key),
                Interest::READABLE,
            ) {
                crate::log_limited!(
                    crate::ratelimit::Kind::Connection,
                    warn,
                    "cannot watch a new connection: {e}"
                );
                continue;
            }
            *self.conns_per_uid.entry(peer.uid).or_insert(0) += 1;
            let serial = self.next_serial;
            self.next_serial += 1;
            self.ungreeted
                .push_back((key, serial, Instant::now() + limits.hello_timeout));
            entry.insert(Conn {
                serial,
                fd,
                peer,
                greeted: false,
                version: MIN_PROTOCOL_VERSION,
                watcher: None,
                participant: None,
                busy: false,
                scheduled: false,
                outbox: VecDeque::new(),
                queued: 0,
                writable_interest: false,
                doomed: false,
                close_after_flush: false,
            });
        }
        // Budget spent: the backlog may hold more (the listener is
        // edge-triggered, so it must be queued explicitly).
        work.accept_again();
    }

    /// A readiness event for connection `key`.
    pub fn on_event(
        &mut self,
        key: usize,
        writable: bool,
        readable: bool,
        closed: bool,
        cx: &mut Context<'_>,
    ) {
        if writable {
            self.flush(key);
        }
        let scheduled = self.conns.get(key).is_some_and(|c| c.scheduled);
        if closed || (readable && !scheduled) {
            self.read_conn(key, closed, cx);
        }
    }

    /// Reads a connection the work list named again (its wait or bump
    /// ended, or its frame budget ran out last turn).
    pub fn resume(&mut self, key: usize, cx: &mut Context<'_>) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.scheduled = false;
        }
        self.read_conn(key, false, cx);
    }

    /// Queues a connection to be read on the next turn, once.
    fn schedule(&mut self, key: usize, work: &mut WorkList) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.scheduled {
                conn.scheduled = true;
                work.resume(key);
            }
        }
    }

    /// Reads up to [`FRAMES_PER_TURN`] frames; queues the connection to be
    /// read again if it may have more.
    fn read_conn(&mut self, key: usize, closed: bool, cx: &mut Context<'_>) {
        let mut buf = [0u8; MAX_FRAME + 1];
        for _ in 0..FRAMES_PER_TURN {
            let Some(conn) = self.conns.get(key) else {
                return;
            };
            if conn.doomed || conn.close_after_flush || conn.busy {
                if closed && conn.busy {
                    // The waiter hung up: end its wait with it.
                    self.doom(key);
                }
                return;
            }
            match receive(&conn.fd, &mut buf) {
                Received::Frame(n, sender) => self.on_frame(key, &buf[..n], sender, cx),
                Received::TooLong(len) => {
                    self.fatal(
                        key,
                        ErrorCode::ProtocolViolation,
                        format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit"),
                    );
                    return;
                }
                Received::Empty => return,
                Received::Closed | Received::Failed => {
                    self.doom(key);
                    return;
                }
            }
        }
        // Budget spent: the rest waits for the next turn (the socket is
        // edge-triggered, so it must be queued explicitly).
        self.schedule(key, cx.work);
    }

    fn on_frame(&mut self, key: usize, frame: &[u8], sender: Option<Sender>, cx: &mut Context<'_>) {
        let greeted = self.conns[key].greeted;
        if !greeted {
            if let Some(v) = Request::peek_hello_version(frame) {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) {
                    self.fatal(key, ErrorCode::VersionMismatch, format!(
                        "this client speaks sysgenid protocol {v}, but sysgenidd {} speaks protocols {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}: use a client and daemon from the same release",
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
        if request.needs_lifecycle_version() && self.conns[key].version < LIFECYCLE_VERSION {
            self.fatal(
                key,
                ErrorCode::ProtocolViolation,
                format!(
                    "malformed frame: {request:?} does not exist in protocol {} (it needs {LIFECYCLE_VERSION})",
                    self.conns[key].version
                ),
            );
            return;
        }
        match (greeted, request) {
            (false, Request::Hello { version, role }) => {
                self.on_hello(key, version, role, cx.watchers)
            }
            (false, _) => self.fatal(
                key,
                ErrorCode::ProtocolViolation,
                "the first frame must be Hello",
            ),
            (true, Request::Hello { .. }) => {
                self.fatal(key, ErrorCode::ProtocolViolation, "Hello sent twice")
            }
            (true, Request::Ack { generation }) => self.on_ack(key, generation, cx),
            (true, Request::WaitWatchers { timeout_ms }) => self.on_wait(key, timeout_ms, cx),
            (
                true,
                Request::Bump {
                    min_generation,
                    allow_exhaustion,
                    details,
                },
            ) => {
                let request = BumpRequest {
                    min: min_generation,
                    allow_exhaustion,
                    details,
                };
                self.on_bump(key, request, sender, cx)
            }
            (true, Request::Status) => {
                let report = (cx.status)(cx.watchers);
                self.send_reply(key, Reply::Status(report), cx.watchers);
            }
            (true, Request::Freeze { timeout_ms }) => self.on_freeze(key, timeout_ms, sender, cx),
            (true, Request::Thaw) => self.on_thaw(key, sender, cx),
            (true, Request::Confirm { freeze }) => self.on_confirm(key, freeze, cx),
        }
    }

    fn on_hello(&mut self, key: usize, version: u16, role: Role, watchers: &mut Watchers) {
        let uid = self.conns[key].peer.uid;
        self.conns[key].version = version;
        let mut freeze = None;
        if let Role::Watcher {
            untracked,
            acked,
            lifecycle,
        } = role
        {
            let tracking = if untracked {
                Tracking::Untracked
            } else {
                Tracking::Tracked
            };
            // Only trusted parties hold the lifecycle (`trust`); judged
            // for tracked watchers only, on what the kernel recorded at
            // connect time.
            let trusted = tracking == Tracking::Tracked && {
                let conn = &self.conns[key];
                let who = crate::trust::Identity {
                    pid: conn.peer.pid,
                    uid,
                    gid: conn.peer.gid,
                };
                watchers
                    .trust()
                    .trusts(who, || crate::trust::socket_groups(conn.fd.as_fd()))
            };
            match watchers.admit(uid, tracking, acked, trusted) {
                Ok(id) => self.conns[key].watcher = Some(id),
                Err(refused) => {
                    self.fatal(key, ErrorCode::TooManyWatchers, refused.to_string());
                    return;
                }
            }
            if lifecycle {
                let joined = watchers.join(tracking, trusted);
                self.conns[key].participant = Some(joined.id);
                freeze = joined.freeze;
            }
        }
        self.conns[key].greeted = true;
        let generation = watchers.generation();
        let welcome = Reply::Welcome {
            version,
            generation,
        };
        match freeze {
            None => self.send_reply(key, welcome, watchers),
            // Registered during a freeze: told at once, right after Welcome.
            Some(freeze) => {
                self.send_frame(key, &welcome.encode());
                self.send_reply(key, Reply::Freeze { freeze, generation }, watchers);
            }
        }
    }

    /// Whether the sender of a bump, freeze or thaw frame may do it
    /// (`peer::privileged`), judged on the process that sent the frame.
    /// Answers the refusal itself; `what` names the request in it.
    fn check_privilege(
        &mut self,
        key: usize,
        what: &str,
        sender: Option<&Sender>,
        watchers: &Watchers,
    ) -> bool {
        let Err(why) = crate::peer::privileged(sender) else {
            return true;
        };
        let (pid, uid) = sender.map_or((0, 0), |s| (s.pid(), s.uid()));
        let message = format!(
            "permission denied: {what} needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE in sysgenidd's user namespace; the sender (pid {pid}, uid {uid}) was refused: {why}"
        );
        crate::log_limited!(crate::ratelimit::Kind::Permission, warn, "{message}");
        self.send_reply(
            key,
            error(ErrorCode::PermissionDenied, 0, message),
            watchers,
        );
        false
    }

    fn on_freeze(
        &mut self,
        key: usize,
        timeout_ms: u32,
        sender: Option<Sender>,
        cx: &mut Context<'_>,
    ) {
        if !self.check_privilege(key, "freezing", sender.as_ref(), cx.watchers) {
            return;
        }
        match requests::freeze(cx.watchers, cx.work, timeout_ms) {
            Started::Freezing(id) => {
                // Answered by the loop with the freeze's outcome.
                self.conns[key].busy = true;
                self.freezers.push((id, key));
            }
            Started::Answer(reply) => self.send_reply(key, reply, cx.watchers),
            Started::Waiting { .. } => unreachable!("a freeze is never a barrier wait"),
        }
    }

    fn on_thaw(&mut self, key: usize, sender: Option<Sender>, cx: &mut Context<'_>) {
        if !self.check_privilege(key, "thawing", sender.as_ref(), cx.watchers) {
            return;
        }
        let reply = requests::thaw(cx.watchers, cx.work);
        self.send_reply(key, reply, cx.watchers);
    }

    fn on_confirm(&mut self, key: usize, freeze: u32, cx: &mut Context<'_>) {
        let Some(id) = self.conns[key].participant else {
            self.send_reply(
                key,
                error(
                    ErrorCode::NotAParticipant,
                    0,
                    "this connection is not a lifecycle participant; open the watcher with the lifecycle flag to confirm freezes",
                ),
                cx.watchers,
            );
            return;
        };
        match cx.watchers.confirm(id, freeze) {
            Ok(transition) => {
                cx.work.transition(transition);
                let generation = cx.watchers.generation();
                self.send_reply(key, Reply::Done { generation }, cx.watchers);
            }
            Err(LifecycleError::WrongFreeze { confirmed, latest }) => self.send_reply(
                key,
                error(
                    ErrorCode::WrongFreeze,
                    latest,
                    format!("cannot confirm freeze {confirmed}: the latest freeze is {latest}"),
                ),
                cx.watchers,
            ),
            Err(e) => self.send_reply(
                key,
                error(ErrorCode::Internal, 0, e.to_string()),
                cx.watchers,
            ),
        }
    }

    /// Answers the connection that asked for freeze `id`, and lets it be
    /// read again.
    pub fn answer_freeze(&mut self, id: FreezeId, outcome: FreezeOutcome, cx: &mut Context<'_>) {
        let Some(i) = self.freezers.iter().position(|&(f, _)| f == id) else {
            return;
        };
        let (_, key) = self.freezers.remove(i);
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.busy = false;
        let reply = requests::freeze_outcome_reply(outcome, cx.watchers.generation());
        self.send_reply(key, reply, cx.watchers);
        self.schedule(key, cx.work);
    }

    /// Fan-out of a lifecycle event (`Freeze` or `Thaw`) to every
    /// participant, each followed (by `send_reply`) by the `Changed` that
    /// keeps an outdated watcher's socket readable.
    pub fn on_lifecycle_event(&mut self, event: Reply, watchers: &Watchers) {
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.participant.is_some() && c.greeted)
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.send_reply(key, event.clone(), watchers);
        }
    }

    fn on_ack(&mut self, key: usize, generation: u32, cx: &mut Context<'_>) {
        let Some(id) = self.conns[key].watcher else {
            self.send_reply(
                key,
                error(
                    ErrorCode::NotAWatcher,
                    0,
                    "this connection is not a watcher; open it as one to acknowledge",
                ),
                cx.watchers,
            );
            return;
        };
        match cx.watchers.ack(id, generation) {
            Ok(changed) => {
                self.send_reply(key, Reply::Done { generation }, cx.watchers);
                if changed {
                    cx.work.settle();
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
                cx.watchers,
            ),
            Err(e) => self.send_reply(
                key,
                error(ErrorCode::Internal, 0, e.to_string()),
                cx.watchers,
            ),
        }
    }

    fn on_wait(&mut self, key: usize, timeout_ms: u32, cx: &mut Context<'_>) {
        let caller = self.conns[key].watcher;
        match requests::wait(cx.watchers, caller, timeout_ms) {
            Started::Waiting { deadline } => {
                self.conns[key].busy = true;
                self.waits.add(key, deadline);
            }
            Started::Answer(reply) => self.send_reply(key, reply, cx.watchers),
            Started::Freezing(_) => unreachable!("a wait never freezes"),
        }
    }

    fn on_bump(
        &mut self,
        key: usize,
        request: BumpRequest,
        sender: Option<Sender>,
        cx: &mut Context<'_>,
    ) {
        if !self.check_privilege(
            key,
            "forcing a generation update",
            sender.as_ref(),
            cx.watchers,
        ) {
            return;
        }
        // The loop bumps and fans out, then calls `answer_bump`.
        self.conns[key].busy = true;
        cx.work.bump(PrivilegedBump {
            request,
            requester: Requester::Socket(key),
        });
    }

    /// Answers a bump that [`Requester::Socket`] asked for, and lets the
    /// connection be read again.
    pub fn answer_bump(
        &mut self,
        key: usize,
        result: &Result<Generation, BumpError>,
        cx: &mut Context<'_>,
    ) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.busy = false;
        let reply = requests::bump_reply(result);
        self.send_reply(key, reply, cx.watchers);
        self.schedule(key, cx.work);
    }

    /// Fan-out of a bump: one `Changed` to every watcher connection.
    pub fn on_bump_committed(&mut self, bumped: &Bumped) {
        let changed = Reply::Changed {
            generation: bumped.generation,
        }
        .encode();
        let keys: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.watcher.is_some())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            self.send_frame(key, &changed);
        }
    }

    /// Answers every pending wait whose barrier is no longer pending; each
    /// answered connection is queued to be read again.
    pub fn settle(&mut self, cx: &mut Context<'_>) {
        let conns = &self.conns;
        let watchers = &*cx.watchers;
        let done = self.waits.settle(|&key| {
            let Some(conn) = conns.get(key) else {
                return Some(None);
            };
            requests::wait_answer(watchers, conn.watcher).map(Some)
        });
        for (key, reply) in done {
            if let Some(reply) = reply {
                self.end_wait(key, reply, cx);
            }
        }
    }

    /// Ends waits whose deadline passed with `TimedOut`.
    pub fn expire(&mut self, now: Instant, cx: &mut Context<'_>) {
        for key in self.waits.expire(now) {
            let reply = requests::wait_timed_out(cx.watchers, cx.status);
            self.end_wait(key, reply, cx);
        }
        self.expire_silent_connections(now, cx.watchers.limits().hello_timeout);
    }

    /// Drops connections that did not send their `Hello` in time.
    fn expire_silent_connections(&mut self, now: Instant, hello_timeout: Duration) {
        while let Some(&(key, serial, deadline)) = self.ungreeted.front() {
            if deadline > now {
                break;
            }
            self.ungreeted.pop_front();
            let silent = self.conns.get(key).is_some_and(|c| {
                c.serial == serial && !c.greeted && !c.doomed && !c.close_after_flush
            });
            if silent {
                let ms = hello_timeout.as_millis();
                self.fatal(
                    key,
                    ErrorCode::ProtocolViolation,
                    format!("no Hello within {ms} ms of connecting"),
                );
            }
        }
    }

    /// Answers a wait and queues its connection to be read again (requests
    /// that arrived during the wait are still in its socket).
    fn end_wait(&mut self, key: usize, reply: Reply, cx: &mut Context<'_>) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.busy = false;
            self.send_reply(key, reply, cx.watchers);
            self.schedule(key, cx.work);
        }
    }

    /// Clean exit: every pending wait gets `ShuttingDown`, the socket file
    /// is left to the caller.
    pub fn shutdown(&mut self, watchers: &Watchers) {
        let freezers: Vec<usize> = self.freezers.drain(..).map(|(_, key)| key).collect();
        for key in self.waits.drain().into_iter().chain(freezers) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.busy = false;
            }
            self.send_reply(
                key,
                error(
                    ErrorCode::ShuttingDown,
                    0,
                    "sysgenidd is shutting down; retry when it is back",
                ),
                watchers,
            );
        }
    }

    /// Sends a reply and, if the connection is a still-outdated watcher, the
    /// `Changed` frame that keeps its socket readable.
    fn send_reply(&mut self, key: usize, reply: Reply, watchers: &Watchers) {
        self.send_frame(key, &reply.encode());
        let Some(id) = self.conns.get(key).and_then(|c| c.watcher) else {
            return;
        };
        if let Ok(Some(generation)) = watchers.poll_read(id) {
            self.send_frame(key, &Reply::Changed { generation }.encode());
        }
    }

    /// Sends an error and closes the connection once it is flushed.
    fn fatal(&mut self, key: usize, code: ErrorCode, message: impl Into<String>) {
        let message = message.into();
        crate::log_limited!(
            crate::ratelimit::Kind::Protocol,
            info,
            conn = key,
            "closing connection: {message}"
        );
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
                self.doom(key);
            }
        }
    }

    /// Sends one frame now, or queues it (allocating only then) when the
    /// socket buffer is full. A client that would pass its outbox limit or
    /// the memory budget is dropped instead.
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
                    self.doom(key);
                    return;
                }
            }
        }
        let is_changed = |f: &[u8]| matches!(Reply::decode(f), Ok(Reply::Changed { .. }));
        if is_changed(frame) && conn.outbox.back().is_some_and(|f| is_changed(f)) {
            // Only the newest Changed matters (same size: the cost stays).
            *conn.outbox.back_mut().expect("checked non-empty") = frame.to_vec();
            return;
        }
        let cost = frame.len() + FRAME_OVERHEAD;
        let uid = conn.peer.uid;
        let refusal = if conn.outbox.len() >= MAX_OUTBOX {
            Some(format!(
                "it has {MAX_OUTBOX} unread replies, the per-connection limit"
            ))
        } else {
            self.queued.refusal(uid, cost)
        };
        if let Some(why) = refusal {
            crate::log_limited!(
                crate::ratelimit::Kind::Budget,
                warn,
                conn = key,
                uid,
                pid = conn.peer.pid,
                "dropping a client that does not read its replies: {why}"
            );
            self.doom(key);
            return;
        }
        conn.outbox.push_back(frame.to_vec());
        conn.queued += cost;
        self.queued.charge(uid, cost);
        if !conn.writable_interest {
            conn.writable_interest = true;
            let _ = self.registry.reregister(
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
                    let cost = frame.len() + FRAME_OVERHEAD;
                    conn.outbox.pop_front();
                    conn.queued -= cost;
                    self.queued.release(conn.peer.uid, cost);
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => {
                    self.doom(key);
                    return;
                }
            }
        }
        // Give the emptied outbox's buffer back.
        conn.outbox = VecDeque::new();
        if conn.close_after_flush {
            self.doom(key);
            return;
        }
        conn.writable_interest = false;
        let _ = self.registry.reregister(
            &mut SourceFd(&conn.fd.as_raw_fd()),
            Token(key),
            Interest::READABLE,
        );
    }

    /// Marks a connection for closing at the end of the turn and frees its
    /// outbox now: nothing more is sent to it.
    fn doom(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.doomed {
                conn.doomed = true;
                self.doomed.push(key);
            }
            if conn.queued > 0 {
                self.queued.release(conn.peer.uid, conn.queued);
                conn.queued = 0;
            }
            conn.outbox = VecDeque::new();
        }
    }

    /// Closes doomed connections, releasing their watchers (which queues a
    /// settle), then accepts what may have waited in the backlog.
    pub fn reap(&mut self, watchers: &mut Watchers, work: &mut WorkList) {
        if self.doomed.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.doomed) {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            let _ = self
                .registry
                .deregister(&mut SourceFd(&conn.fd.as_fd().as_raw_fd()));
            if let Some(n) = self.conns_per_uid.get_mut(&conn.peer.uid) {
                *n -= 1;
                if *n == 0 {
                    self.conns_per_uid.remove(&conn.peer.uid);
                }
            }
            if let Some(id) = conn.watcher {
                if watchers.release(id, conn.peer.uid) {
                    work.settle();
                }
            }
            if let Some(id) = conn.participant {
                work.transition(watchers.leave(id));
            }
            if let Some(i) = self.freezers.iter().position(|&(_, k)| k == key) {
                let (id, _) = self.freezers.remove(i);
                // Only the freeze in progress is aborted: an earlier one of
                // this orchestrator has ended already (its outcome is on
                // the work list).
                let counts = watchers.lifecycle_counts();
                if counts.state == sysgenid_core::lifecycle::State::Freezing && counts.freeze == id
                {
                    tracing::warn!(
                        pid = conn.peer.pid,
                        "the orchestrator of the freeze in progress went away: aborting the freeze"
                    );
                    work.transition(watchers.freeze_requester_gone());
                }
            }
            self.waits.remove_where(|&k| k == key);
        }
        if self.queued.freed_since_trim >= TRIM_AFTER {
            self.queued.freed_since_trim = 0;
            return_free_memory();
        }
        // Descriptors were freed: accept, next turn, what may have waited
        // in the backlog since an accept failed with EMFILE (the listener
        // is edge-triggered and would not report those connections again).
        if std::mem::take(&mut self.accept_starved) {
            work.accept_again();
        }
    }
}
