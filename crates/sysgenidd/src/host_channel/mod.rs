//! The host channel: the daemon's third frontend, for the hypervisor host
//! (`--host-channel vsock:PORT`, off by default). Firecracker, Cloud
//! Hypervisor, Kata and QEMU's vhost-vsock reach their guests over vsock;
//! through this frontend the host may do what a privileged local
//! orchestrator may: report a restore or clone (with entropy), freeze,
//! thaw, wait for the watchers, read status and the generation.
//!
//! # Trust
//! Only the host is served: a vsock peer whose CID is not 2
//! (`VMADDR_CID_HOST`), such as a local process coming through vsock
//! loopback (CID 1), gets one `PermissionDenied` line and is closed, and
//! the refusal is logged (rate-limited with the daemon's other peer-caused
//! lines, `crate::ratelimit`). Being the host is the privilege: there
//! is no further check. `test-unix:PATH` serves the same protocol on a
//! Unix socket for tests only (see [`listen::Listen::TestUnix`]).
//!
//! # Protocol and bounds
//! One JSON object per line each way (`sysgenid_proto::host`,
//! `docs/protocol.md`), one request at a time per connection. Bounded like
//! the socket: at most [`MAX_CONNECTIONS`] connections (further ones get a
//! `TooManyWatchers` line and are closed), lines of at most
//! `HOST_MAX_LINE` bytes (a longer one is refused and its connection
//! closed: the framing is lost), an idle timeout (`--host-channel-idle-ms`)
//! after which a connection without a request in progress is closed, and
//! at most [`MAX_OUTBOX`] bytes of unread replies: a client that stops
//! reading stops being served until it reads, and is closed at its idle
//! timeout. A malformed line, an unknown operation or bad fields get an
//! error line and change nothing; the connection stays usable.
//!
//! # Who decides what
//! Like the socket, this module changes watchers only through
//! [`Watchers`] and leaves consequences to the loop through the
//! [`crate::work::WorkList`]: a `restored` becomes a [`PrivilegedBump`] from
//! [`Requester::Host`], whose [`BumpRequest`] carries the kind, entropy and
//! host name; the loop makes it a restore signal of source `host` (the
//! kernel RNG renewed before the change is published, coalesced with a
//! kernel signal for the same restore); a freeze's
//! outcome and a barrier wait's end come back from the loop. Freeze, thaw,
//! waits and the replies are decided in [`crate::requests`], shared with
//! the socket; this module is the transport (lines, the CID check, the
//! per-connection bounds) and converts each reply to a JSON line.

pub mod listen;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use slab::Slab;
use sysgenid_core::lifecycle::FreezeId;
use sysgenid_proto::host::{
    HostReply, HostRequest, RestoredReport, HOST_MAX_LINE, VMADDR_CID_HOST,
};
use sysgenid_proto::{ErrorCode, Reply};

use crate::ratelimit::Kind;
use crate::requests::{self, FreezeOutcome, Started};
use crate::socket::Context;
use crate::work::{BumpRequest, Pending, PrivilegedBump, Requester};
pub use listen::{Listen, PeerAddr};

/// The listener's token.
pub const LISTENER: Token = Token(usize::MAX - 5);
/// Connection `k` (fewer than `MAX_CONNECTIONS + MAX_REFUSING`) has token
/// `CONN_BASE - k`.
const CONN_BASE: usize = usize::MAX - 32;

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// Refused connections kept open at once, each until it has sent its
/// first line (so the refusal is read before the close, not lost to a
/// reset); further ones are closed right after the refusal line.
const MAX_REFUSING: usize = 8;

/// Bytes of replies a connection may leave unread before it is no longer
/// served (until it reads).
pub const MAX_OUTBOX: usize = 4 * HOST_MAX_LINE;

/// Lines handled per connection per loop turn before the others get theirs.
const LINES_PER_TURN: usize = 16;

/// Connections accepted per loop turn at most (the rest wait a turn).
const ACCEPTS_PER_TURN: usize = 64;

/// The default `--host-channel-idle-ms`.
pub const DEFAULT_IDLE_MS: u64 = 60_000;

struct Conn {
    fd: OwnedFd,
    /// Not served: it got its refusal line; closed once it has sent a
    /// line (or hung up, or idled out).
    refused: bool,
    peer: PeerAddr,
    /// Bytes read and not yet handled (at most `HOST_MAX_LINE`).
    inbuf: Vec<u8>,
    /// Reply bytes the socket did not take yet.
    outbox: Vec<u8>,
    /// A freeze, wait or restore is in the loop's hands: handle no more
    /// lines until it is answered.
    busy: bool,
    /// The peer will send nothing more: close once answered and flushed.
    eof: bool,
    /// Queued to be pumped again next turn.
    ready: bool,
    writable_interest: bool,
    close_after_flush: bool,
    doomed: bool,
    /// Closed if idle (not busy) past this.
    idle_deadline: Instant,
}

/// The host channel frontend.
pub struct HostChannel {
    registry: Registry,
    listener: OwnedFd,
    listen: Listen,
    conns: Slab<Conn>,
    /// Pending `wait-watchers`, by connection key.
    waits: Pending<usize>,
    /// Connections waiting for their freeze's outcome.
    freezers: Vec<(FreezeId, usize)>,
    ready: VecDeque<usize>,
    doomed: Vec<usize>,
    idle: Duration,
    /// The accept budget ran out: accept again next turn.
    accept_more: bool,
}

fn from_reply(reply: Reply) -> HostReply {
    match reply {
        Reply::Done { generation } => HostReply::done(generation),
        Reply::Error(e) => HostReply::error(e.code, e.value, e.message),
        other => HostReply::error(
            ErrorCode::Internal,
            0,
            format!("unexpected reply {other:?}"),
        ),
    }
}

impl HostChannel {
    /// Binds `listen` and serves it, registering with `registry`.
    pub fn new(listen: Listen, idle: Duration, registry: Registry) -> std::io::Result<HostChannel> {
        let listener = listen::bind(&listen)?;
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        Ok(HostChannel {
            registry,
            listener,
            listen,
            conns: Slab::with_capacity(MAX_CONNECTIONS + MAX_REFUSING),
            waits: Pending::default(),
            freezers: Vec::new(),
            ready: VecDeque::new(),
            doomed: Vec::new(),
            idle,
            accept_more: false,
        })
    }

    /// What it listens on, for status and the start-up line.
    pub fn describe(&self) -> String {
        match &self.listen {
            Listen::Vsock { port } => format!("vsock port {port}, host (CID 2) only"),
            Listen::TestUnix(path) => format!("TEST-ONLY unix socket {}", path.display()),
        }
    }

    /// The connection key of `token`, if it is one of ours.
    pub fn key_of(token: Token) -> Option<usize> {
        let k = CONN_BASE.checked_sub(token.0)?;
        (token.0 <= CONN_BASE && k < MAX_CONNECTIONS + MAX_REFUSING).then_some(k)
    }

    /// Whether connections are queued to be pumped again.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty() || self.accept_more
    }

    /// The earliest deadline: a wait's or an idle connection's.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.busy && !c.doomed)
            .map(|(_, c)| c.idle_deadline)
            .chain(self.waits.next_deadline())
            .min()
    }

    /// Accepts up to [`ACCEPTS_PER_TURN`] queued connections, refusing
    /// non-host peers and those past the connection limit.
    pub fn accept_all(&mut self) {
        self.accept_more = false;
        for _ in 0..ACCEPTS_PER_TURN {
            let (fd, peer) = match listen::accept(&self.listener, &self.listen) {
                Ok(x) => x,
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    crate::log_limited!(Kind::Connection, warn, "host channel: accept failed: {e}");
                    return;
                }
            };
            let now = Instant::now();
            let served = self.conns.iter().filter(|(_, c)| !c.refused).count();
            let refusal = match peer {
                PeerAddr::Vsock { cid, port } if cid != VMADDR_CID_HOST => {
                    crate::log_limited!(
                        Kind::Connection,
                        warn,
                        cid,
                        port,
                        "host channel: refused a connection from CID {cid}: only the host (CID {VMADDR_CID_HOST}) is served"
                    );
                    Some(HostReply::error(
                        ErrorCode::PermissionDenied,
                        0,
                        format!("the host channel serves only the host (CID {VMADDR_CID_HOST}); CID {cid} was refused"),
                    ))
                }
                _ if served >= MAX_CONNECTIONS => {
                    crate::log_limited!(
                        Kind::Connection,
                        warn,
                        "host channel: refused a connection from {peer}: {MAX_CONNECTIONS} connections are open, the limit"
                    );
                    Some(HostReply::error(
                        ErrorCode::TooManyWatchers,
                        MAX_CONNECTIONS as u32,
                        format!("the host channel has {MAX_CONNECTIONS} connections open, its limit; try again later"),
                    ))
                }
                _ => None,
            };
            if let Some(reply) = &refusal {
                if self.conns.len() - served >= MAX_REFUSING {
                    refuse(&fd, reply);
                    continue;
                }
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.registry.register(
                &mut SourceFd(&fd.as_raw_fd()),
                Token(CONN_BASE - key),
                Interest::READABLE,
            ) {
                tracing::warn!("host channel: cannot watch a new connection: {e}");
                continue;
            }
            tracing::debug!(conn = key, "host channel: {peer} connected");
            entry.insert(Conn {
                fd,
                refused: refusal.is_some(),
                peer,
                inbuf: Vec::new(),
                outbox: Vec::new(),
                busy: false,
                eof: false,
                ready: false,
                writable_interest: false,
                close_after_flush: false,
                doomed: false,
                idle_deadline: now + self.idle,
            });
            if let Some(reply) = refusal {
                self.send(key, &reply);
                self.pump_refused(key);
            }
        }
        // Budget spent: the listener is edge-triggered, so come back.
        self.accept_more = true;
    }

    /// A refused connection: discards what it sends; closes it after its
    /// first line or its hang-up.
    fn pump_refused(&mut self, key: usize) {
        let mut buf = [0u8; 512];
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        loop {
            match rustix::io::read(&conn.fd, &mut buf) {
                Ok(0) => break,
                Ok(n) if buf[..n].contains(&b'\n') => break,
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return,
                Err(_) => break,
            }
        }
        if conn.outbox.is_empty() {
            self.doom(key);
        } else {
            conn.close_after_flush = true;
        }
    }

    /// A readiness event for connection `key`. `hung_up`: the peer closed
    /// both directions (a half-close only ends its requests).
    pub fn on_event(&mut self, key: usize, writable: bool, hung_up: bool, cx: &mut Context<'_>) {
        if writable {
            self.flush(key);
        }
        if hung_up && self.conns.get(key).is_some_and(|c| c.busy) {
            // The host gave up on its freeze or wait: end it with it.
            self.doom(key);
            return;
        }
        self.pump(key, cx);
    }

    /// Pumps the connections queued last turn.
    pub fn run_ready(&mut self, cx: &mut Context<'_>) {
        if self.accept_more {
            self.accept_all();
        }
        for key in std::mem::take(&mut self.ready) {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.ready = false;
            }
            self.pump(key, cx);
        }
    }

    fn schedule(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.ready {
                conn.ready = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Handles complete lines and reads more, up to [`LINES_PER_TURN`].
    fn pump(&mut self, key: usize, cx: &mut Context<'_>) {
        if self.conns.get(key).is_some_and(|c| c.refused) {
            self.pump_refused(key);
            return;
        }
        let mut buf = [0u8; HOST_MAX_LINE];
        for _ in 0..LINES_PER_TURN {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.doomed || conn.close_after_flush || conn.busy || conn.outbox.len() > MAX_OUTBOX
            {
                return;
            }
            if let Some(end) = conn.inbuf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = conn.inbuf.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                conn.idle_deadline = Instant::now() + self.idle;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                self.on_line(key, &line, cx);
                continue;
            }
            if conn.inbuf.len() >= HOST_MAX_LINE {
                self.fatal(
                    key,
                    ErrorCode::ProtocolViolation,
                    format!(
                        "request line longer than {HOST_MAX_LINE} bytes: closing the connection"
                    ),
                );
                return;
            }
            if conn.eof {
                if conn.outbox.is_empty() {
                    self.doom(key);
                } else {
                    conn.close_after_flush = true;
                }
                return;
            }
            let room = HOST_MAX_LINE - conn.inbuf.len();
            match rustix::io::read(&conn.fd, &mut buf[..room]) {
                Ok(0) => conn.eof = true,
                Ok(n) => conn.inbuf.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => {
                    self.doom(key);
                    return;
                }
            }
        }
        self.schedule(key);
    }

    fn on_line(&mut self, key: usize, line: &[u8], cx: &mut Context<'_>) {
        let request = match HostRequest::decode(line) {
            Ok(r) => r,
            Err(e) => {
                crate::log_limited!(
                    Kind::Protocol,
                    info,
                    conn = key,
                    "host channel: refused a request: {e}"
                );
                self.send(
                    key,
                    &HostReply::error(ErrorCode::ProtocolViolation, 0, e.to_string()),
                );
                return;
            }
        };
        match request {
            HostRequest::Get {} => {
                let generation = cx.watchers.generation();
                self.send(key, &HostReply::done(generation));
            }
            HostRequest::Status {} => {
                let report = (cx.status)(cx.watchers);
                let reply = HostReply {
                    status: Some(Box::new(report)),
                    ..HostReply::done(cx.watchers.generation())
                };
                self.send(key, &reply);
            }
            HostRequest::Thaw {} => {
                let reply = requests::thaw(cx.watchers, cx.work);
                self.send(key, &from_reply(reply));
            }
            HostRequest::Freeze { timeout_ms } => self.on_freeze(key, timeout_ms, cx),
            HostRequest::WaitWatchers { timeout_ms } => self.on_wait(key, timeout_ms, cx),
            request @ HostRequest::Restored { .. } => {
                // Checked by `decode`; checked again rather than assumed.
                let details = match request.details() {
                    Ok(details) => details,
                    Err(e) => {
                        let reply =
                            HostReply::error(ErrorCode::ProtocolViolation, 0, e.to_string());
                        self.send(key, &reply);
                        return;
                    }
                };
                self.conns[key].busy = true;
                cx.work.bump(PrivilegedBump {
                    request: BumpRequest {
                        details,
                        ..BumpRequest::default()
                    },
                    requester: Requester::Host(key),
                });
            }
        }
    }

    fn on_freeze(&mut self, key: usize, timeout_ms: u32, cx: &mut Context<'_>) {
        match requests::freeze(cx.watchers, cx.work, timeout_ms) {
            Started::Freezing(id) => {
                self.conns[key].busy = true;
                self.freezers.push((id, key));
            }
            Started::Answer(reply) => self.send(key, &from_reply(reply)),
            Started::Waiting { .. } => unreachable!("a freeze is never a barrier wait"),
        }
    }

    fn on_wait(&mut self, key: usize, timeout_ms: u32, cx: &mut Context<'_>) {
        // The host has no watcher of its own: it waits for everyone.
        match requests::wait(cx.watchers, None, timeout_ms) {
            Started::Waiting { deadline } => {
                self.conns[key].busy = true;
                self.waits.add(key, deadline);
            }
            Started::Answer(reply) => self.send(key, &from_reply(reply)),
            Started::Freezing(_) => unreachable!("a wait never freezes"),
        }
    }

    /// Answers a `restored` the loop carried out (or refused).
    pub fn answer_restored(&mut self, key: usize, reply: HostReply) {
        self.unbusy(key, &reply);
    }

    /// Converts and answers a bump's result.
    pub fn bump_reply(
        result: &Result<sysgenid_core::Generation, crate::service::BumpError>,
        report: RestoredReport,
    ) -> HostReply {
        let mut reply = from_reply(requests::bump_reply(result));
        if reply.ok {
            reply.restored = Some(report);
        }
        reply
    }

    /// Answers the connection that asked for freeze `id`.
    pub fn answer_freeze(&mut self, id: FreezeId, outcome: FreezeOutcome, cx: &mut Context<'_>) {
        let Some(i) = self.freezers.iter().position(|&(f, _)| f == id) else {
            return;
        };
        let (_, key) = self.freezers.remove(i);
        let reply = from_reply(requests::freeze_outcome_reply(
            outcome,
            cx.watchers.generation(),
        ));
        self.unbusy(key, &reply);
    }

    /// Answers every wait whose barrier is no longer pending.
    pub fn settle(&mut self, cx: &mut Context<'_>) {
        let watchers = &*cx.watchers;
        let done = self.waits.settle(|_| requests::wait_answer(watchers, None));
        for (key, reply) in done {
            self.unbusy(key, &from_reply(reply));
        }
    }

    /// Ends waits past their deadline, and closes idle connections.
    pub fn expire(&mut self, now: Instant, cx: &mut Context<'_>) {
        for key in self.waits.expire(now) {
            let reply = requests::wait_timed_out(cx.watchers, cx.status);
            self.unbusy(key, &from_reply(reply));
        }
        let idle: Vec<(usize, bool, bool)> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.busy && !c.doomed && c.idle_deadline <= now)
            .map(|(k, c)| (k, c.refused, c.outbox.is_empty()))
            .collect();
        for (key, refused, flushed) in idle {
            if refused {
                self.doom(key);
            } else if flushed {
                let ms = self.idle.as_millis();
                self.fatal(
                    key,
                    ErrorCode::TimedOut,
                    format!(
                        "no request for {ms} ms (--host-channel-idle-ms): closing the connection"
                    ),
                );
            } else {
                crate::log_limited!(
                    Kind::Budget,
                    info,
                    conn = key,
                    "host channel: closing a connection that does not read its replies"
                );
                self.doom(key);
            }
        }
    }

    fn unbusy(&mut self, key: usize, reply: &HostReply) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.busy = false;
            conn.idle_deadline = Instant::now() + self.idle;
            self.send(key, reply);
            self.schedule(key);
        }
    }

    /// Every pending request gets `ShuttingDown`.
    pub fn shutdown(&mut self) {
        let freezers: Vec<usize> = self.freezers.drain(..).map(|(_, k)| k).collect();
        let busy: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| c.busy)
            .map(|(k, _)| k)
            .chain(freezers)
            .collect();
        for key in busy {
            self.unbusy(
                key,
                &HostReply::error(
                    ErrorCode::ShuttingDown,
                    0,
                    "sysgenidd is shutting down; retry when it is back",
                ),
            );
        }
    }

    fn fatal(&mut self, key: usize, code: ErrorCode, message: String) {
        crate::log_limited!(Kind::Protocol, info, conn = key, "host channel: {message}");
        self.send(key, &HostReply::error(code, 0, message));
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.outbox.is_empty() {
                self.doom(key);
            } else {
                conn.close_after_flush = true;
            }
        }
    }

    /// Writes a reply line now, keeping what the socket does not take.
    fn send(&mut self, key: usize, reply: &HostReply) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.doomed {
            return;
        }
        conn.outbox.extend_from_slice(&reply.encode());
        self.flush(key);
    }

    fn flush(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let was_held = conn.outbox.len() > MAX_OUTBOX;
        while !conn.outbox.is_empty() {
            match rustix::net::send(
                &conn.fd,
                &conn.outbox,
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(n) => {
                    conn.outbox.drain(..n);
                    conn.idle_deadline = Instant::now() + self.idle;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => break,
                Err(_) => {
                    self.doom(key);
                    return;
                }
            }
        }
        let want_writable = !conn.outbox.is_empty();
        if conn.outbox.is_empty() {
            conn.outbox = Vec::new();
            if conn.close_after_flush {
                self.doom(key);
                return;
            }
        }
        if was_held && conn.outbox.len() <= MAX_OUTBOX {
            // It reads again: serve it again (see `pump`).
            self.schedule(key);
        }
        let conn = &mut self.conns[key];
        if want_writable != conn.writable_interest {
            conn.writable_interest = want_writable;
            let interest = if want_writable {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            let _ = self.registry.reregister(
                &mut SourceFd(&conn.fd.as_raw_fd()),
                Token(CONN_BASE - key),
                interest,
            );
        }
    }

    fn doom(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            if !conn.doomed {
                conn.doomed = true;
                self.doomed.push(key);
            }
        }
    }

    /// Closes doomed connections; a freeze whose host went away is
    /// aborted, as on the socket.
    pub fn reap(
        &mut self,
        watchers: &mut crate::watchers::Watchers,
        work: &mut crate::work::WorkList,
    ) {
        if self.doomed.is_empty() {
            return;
        }
        for key in std::mem::take(&mut self.doomed) {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            let _ = self
                .registry
                .deregister(&mut SourceFd(&conn.fd.as_raw_fd()));
            tracing::debug!(conn = key, "host channel: {} closed", conn.peer);
            self.waits.remove_where(|&k| k == key);
            if let Some(i) = self.freezers.iter().position(|&(_, k)| k == key) {
                let (id, _) = self.freezers.remove(i);
                let counts = watchers.lifecycle_counts();
                if counts.state == sysgenid_core::lifecycle::State::Freezing && counts.freeze == id
                {
                    tracing::warn!("host channel: the host that asked for the freeze in progress went away: aborting the freeze");
                    work.transition(watchers.freeze_requester_gone());
                }
            }
        }
        // Freed slots: take what waited in the backlog.
        self.accept_all();
    }
}

/// Sends one refusal line to a connection that is not served, then lets
/// it go (reading what it sent first, so the close is not a reset that
/// could overtake the line).
fn refuse(fd: &OwnedFd, reply: &HostReply) {
    let _ = rustix::net::send(
        fd,
        &reply.encode(),
        rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
    );
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Write);
    let mut sink = [0u8; 512];
    while rustix::io::read(fd, &mut sink).is_ok_and(|n| n > 0) {}
}
