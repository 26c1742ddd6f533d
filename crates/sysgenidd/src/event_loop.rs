//! The event loop: one thread, one `epoll` (via mio), and everything that
//! happens in the daemon happens here, in turns.
//!
//! Everything that changes the generation or a watcher runs on this thread,
//! so the core needs no locks. Threaded sources (and the device's reader
//! thread in page-cache mode) hand their events over a channel plus a
//! [`mio::Waker`] ([`LoopHandle`], [`Command`]); the kernel log and, with
//! FUSE passthrough, `/dev/fuse` are read from the loop's own poll set.
//!
//! The loop owns the [`Watchers`] and both frontends ([`SocketFrontend`],
//! [`Device`]) and is the only code that calls both: the frontends know
//! only `watchers` and `work`, never each other or the loop.
//!
//! # A turn
//! 1. Wait for readiness, a command or the earliest deadline (without
//!    blocking when connections are queued to be read again).
//! 2. Dispatch: read each ready connection (a bounded number of frames
//!    each), drain the command channel.
//! 3. Read the connections the work list names again, once each, then
//!    accept a bounded number of new connections if the listener was
//!    ready or is queued on the work list (its budget ran out last turn).
//! 4. Process the work list until it is empty: each privileged bump is made
//!    durable and then fanned out (`EventLoop::bump`: one `Changed` per
//!    socket watcher first, then the device mirror and readers), then pending
//!    barrier waits on both frontends are settled. Nothing here calls back
//!    into frame reading: a connection whose wait ends is queued for step 3
//!    of the next turn.
//!    Sources that can be served from the poll set ([`PollSource`]: the
//!    kernel log) are read here too, with no thread in between: a restore
//!    signal is one wake-up away from the published page.
//! 5. Expire deadlines (barrier waits, `Hello` timeouts, the lifecycle's
//!    freeze deadline and freeze bound), process the work list again, close
//!    connections marked for closing (their watchers' release queues a
//!    settle) and process it once more.
//!
//! # The lifecycle
//! Lifecycle transitions (`sysgenid_core::lifecycle`) are queued on the work
//! list by whoever caused them and announced here, in order
//! (`EventLoop::announce`): `Freeze`/`Thaw` to the socket's participants,
//! a job to the hooks runner, the outcome to the orchestrator waiting for
//! its freeze. The hooks directory counts as one participant for a freeze
//! (confirmed when every hook exited) and as one tracked watcher per hook
//! for a change (released when the change's hooks exited; a hook that
//! failed keeps its own until the next change's run). The device's
//! watchers are plain watchers: they count for the thaw after a restore,
//! never for a freeze.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use sysgenid_core::lifecycle::{self, AbortReason, ParticipantId, ThawReason, Transition};
use sysgenid_core::{Generation, Tracking, WatcherId};
use sysgenid_proto::{LifecycleState, Reply, SourceStatus, StatusReport, TrustStatus};
use sysgenid_sources::{PollSource, Readiness};

use crate::device::{Device, DeviceRequest, Forward, Readiness as DeviceReadiness};
use crate::hooks::{Finished, HookEvent, Hooks, Job};
use crate::host_channel::{self, HostChannel};
use crate::service::{BumpError, Service};
use crate::socket::{self, Context, FreezeOutcome, SocketFrontend};
use crate::state::epoch_hex;
use crate::watchers::{BumpCause, Limits, Watchers};
use crate::work::{BumpRequest, PrivilegedBump, Requester, WorkList};

const WAKER: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);
/// `/dev/fuse`, when the loop serves the device itself.
const DEVICE: Token = Token(usize::MAX - 4);
/// Poll sources use the tokens below this one, counting down.
const POLL_SOURCES: usize = usize::MAX - 8;
/// At most this many poll sources (there is one today: the kernel log).
const MAX_POLL_SOURCES: usize = 8;

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
    Device(DeviceRequest),
    /// The hooks runner finished a job (see `hooks`).
    Hooks(Finished),
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

    /// The device reader thread's way in.
    pub fn device_forward(&self) -> Forward {
        let handle = self.clone();
        Box::new(move |request| handle.send(Command::Device(request)))
    }
}

/// The event loop and everything it owns.
pub struct EventLoop {
    poll: Poll,
    /// Kept open: the signal handler writes to its other end.
    _signals: mio::unix::pipe::Receiver,
    commands: Receiver<Command>,
    handle: LoopHandle,
    watchers: Watchers,
    socket: SocketFrontend,
    /// The FUSE device frontend, when serving one.
    device: Option<Device>,
    /// The host channel frontend, when `--host-channel` is on.
    host: Option<HostChannel>,
    work: WorkList,
    /// Status lines of the restore-signal sources (the `manual` one is
    /// kept by [`Watchers`]).
    sources: Vec<SourceStatus>,
    coalescer: sysgenid_sources::Coalescer,
    /// Record timestamp → page, of the last bump by a timestamped kernel
    /// signal (status `last_kernel_lag_us`).
    last_kernel_lag_us: Option<u64>,
    /// Sources served from the poll set (slot `i` has token
    /// `POLL_SOURCES - i`); `None` once ended.
    poll_sources: Vec<Option<Box<dyn PollSource>>>,
    /// Poll sources that used up their read budget: read again next turn.
    poll_sources_more: Vec<usize>,
    /// The device used up its read budget: read it again next turn.
    device_more: bool,
    shutting_down: bool,
    /// The hooks directory's runner, when hooks are on.
    hooks: Option<HooksState>,
    /// systemd's watchdog, pinged by this loop as one of its timers.
    watchdog: crate::supervisor::Watchdog,
}

/// The hooks runner and what the loop tracks for it.
struct HooksState {
    runner: Hooks,
    /// The hooks' lifecycle participant (confirmed when a freeze's hooks
    /// have all exited).
    participant: ParticipantId,
    /// The tracked watchers each change job holds, by ticket.
    watchers: HashMap<u64, Vec<WatcherId>>,
    /// One watcher per hook whose latest change run failed: the change
    /// stays unacknowledged until the next change's run finishes.
    failed: Vec<WatcherId>,
    next_ticket: u64,
}

/// `CLOCK_MONOTONIC` in microseconds: the scale of a kernel log record's
/// timestamp (the printk clock counts from boot like it, unslewed).
fn monotonic_us() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

/// The status report, from what the loop owns.
fn status_report(
    watchers: &Watchers,
    sources: &[SourceStatus],
    device: Option<&Device>,
    last_kernel_lag_us: Option<u64>,
    hooks: Option<&Hooks>,
) -> StatusReport {
    let lifecycle = watchers.lifecycle_counts();
    let counts = watchers.counts();
    let service = watchers.service();
    let record = service.record();
    StatusReport {
        generation: counts.generation,
        epoch: epoch_hex(&record.epoch),
        watchers: counts.watchers,
        tracked: counts.tracked,
        outdated: counts.outdated,
        outdated_untracked: counts.outdated_untracked,
        uptime_ms: service.uptime().as_millis() as u64,
        last_change_unix_ms: (record.changed_unix_ns > 0)
            .then_some(record.changed_unix_ns / 1_000_000),
        last_change_sources: service.last_change_sources().to_vec(),
        last_kernel_lag_us,
        last_change_kind: service.last_change().map(|c| c.kind).unwrap_or_default(),
        last_change_rng: service.last_change().map(|c| c.rng.clone()),
        sources: std::iter::once(watchers.manual_status().clone())
            .chain(sources.iter().cloned())
            .collect(),
        runtime_dir: service.dir().path().display().to_string(),
        device: device.map(|d| d.describe()),
        daemon_version: env!("CARGO_PKG_VERSION").to_string(),
        state: match lifecycle.state {
            lifecycle::State::Running => LifecycleState::Running,
            lifecycle::State::Freezing => LifecycleState::Freezing,
            lifecycle::State::Frozen => LifecycleState::Frozen,
        },
        pending: lifecycle.pending,
        frozen_ms: lifecycle.frozen_ms,
        participants: lifecycle.participants,
        freeze: lifecycle.freeze,
        thaw_after_acks: lifecycle.thaw_after_acks,
        hooks: hooks.map(|h| Box::new(h.status())),
        trust: Some({
            let t = watchers.trust_counts();
            TrustStatus {
                participants_trusted: t.participants_trusted,
                participants_untrusted: t.participants_untrusted,
                tracked_trusted: t.tracked_trusted,
                tracked_untrusted: t.tracked_untrusted,
            }
        }),
    }
}

impl EventLoop {
    /// Sets up the loop around a started service and a bound listener.
    pub fn new(
        service: Service,
        listener: OwnedFd,
        limits: Limits,
        coalescer: sysgenid_sources::Coalescer,
    ) -> io::Result<EventLoop> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, commands) = std::sync::mpsc::channel();
        let socket = SocketFrontend::new(listener, poll.registry().try_clone()?, &limits)?;
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
        Ok(EventLoop {
            poll,
            _signals: signals,
            commands,
            handle: LoopHandle { tx, waker },
            watchers: Watchers::new(service, limits),
            socket,
            device: None,
            host: None,
            work: WorkList::default(),
            sources: Vec::new(),
            coalescer,
            last_kernel_lag_us: None,
            poll_sources: Vec::new(),
            poll_sources_more: Vec::new(),
            device_more: false,
            shutting_down: false,
            hooks: None,
            watchdog: crate::supervisor::Watchdog::from_env(),
        })
    }

    /// Sets the lifecycle's settings (before `run`).
    pub fn configure_lifecycle(&mut self, config: lifecycle::Config) {
        self.watchers.configure_lifecycle(config);
    }

    /// Sets who is trusted with the lifecycle (before `run`).
    pub fn configure_trust(&mut self, rule: crate::trust::TrustRule) {
        self.watchers.configure_trust(rule);
    }

    /// Runs the hooks directory from now on (see `hooks`); its runner
    /// reports through [`Command::Hooks`].
    pub fn attach_hooks(&mut self, runner: Hooks) {
        let participant = self.watchers.join(Tracking::Tracked, true).id;
        self.hooks = Some(HooksState {
            runner,
            participant,
            watchers: HashMap::new(),
            failed: Vec::new(),
            next_ticket: 0,
        });
    }

    /// A handle for source threads and the device.
    pub fn handle(&self) -> LoopHandle {
        self.handle.clone()
    }

    /// Registers a source for status reporting.
    pub fn add_source_status(&mut self, status: SourceStatus) {
        self.sources.push(status);
    }

    /// Serves `source` from the loop's own poll set from now on.
    pub fn add_poll_source(&mut self, source: Box<dyn PollSource>) -> io::Result<()> {
        let i = self.poll_sources.len();
        if i >= MAX_POLL_SOURCES {
            return Err(io::Error::other("too many poll sources"));
        }
        // Registering reports what is already readable; a FIFO no writer
        // has opened yet is not (reading it now would see its end).
        self.register_poll_source(i, source.as_ref())?;
        self.poll_sources.push(Some(source));
        Ok(())
    }

    fn register_poll_source(&self, i: usize, source: &dyn PollSource) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        self.poll.registry().register(
            &mut mio::unix::SourceFd(&source.fd().as_raw_fd()),
            Token(POLL_SOURCES - i),
            Interest::READABLE,
        )
    }

    /// Reads poll source `i` and acts on its signals at once.
    fn on_poll_source(&mut self, i: usize) {
        let Some(mut source) = self.poll_sources.get_mut(i).and_then(Option::take) else {
            return;
        };
        let result = source.on_readable(&mut |ev| self.on_source_event(ev));
        let name = source.name();
        let result = match result {
            // Registering the new descriptor reports it if it is readable.
            Ok(Readiness::Reopened) => self
                .register_poll_source(i, source.as_ref())
                .map(|()| Readiness::Drained)
                .map_err(|e| format!("registering its new descriptor: {e}")),
            other => other.map_err(|e| e.to_string()),
        };
        match result {
            Ok(Readiness::Drained) => {}
            Ok(_) => self.poll_sources_more.push(i),
            Err(error) => {
                // Dropping the source closes its descriptor, which takes it
                // out of the poll set.
                self.source_stopped(name, error);
                return;
            }
        }
        self.poll_sources[i] = Some(source);
    }

    fn source_stopped(&mut self, name: &'static str, error: String) {
        tracing::error!(source = name, "source stopped: {error}");
        if let Some(s) = self.sources.iter_mut().find(|s| s.name == name) {
            s.active = false;
            s.detail = format!("stopped: {error}");
        }
    }

    /// Serves the device's requests from now on (see `device`): from the
    /// poll set when the device allows it, else as [`Command::Device`]s
    /// from its reader thread.
    pub fn attach_device(&mut self, device: Device) -> io::Result<()> {
        if let Some(fd) = device.poll_fd() {
            use std::os::fd::AsRawFd;
            // Registering reports requests already queued.
            self.poll.registry().register(
                &mut mio::unix::SourceFd(&fd.as_raw_fd()),
                DEVICE,
                Interest::READABLE,
            )?;
        }
        self.device = Some(device);
        Ok(())
    }

    /// Serves the host channel from now on (see `host_channel`); its
    /// restores count as the `host` source in status.
    pub fn attach_host_channel(
        &mut self,
        listen: host_channel::Listen,
        idle: Duration,
    ) -> io::Result<()> {
        let host = HostChannel::new(listen, idle, self.poll.registry().try_clone()?)?;
        tracing::info!("host channel: listening on {}", host.describe());
        self.sources.push(SourceStatus {
            name: "host".into(),
            active: true,
            detail: format!("host channel on {}", host.describe()),
            events: 0,
            last_event_unix_ms: None,
        });
        self.host = Some(host);
        Ok(())
    }

    /// Reads and answers the device's queued requests.
    fn on_device_readable(&mut self) {
        let Some(device) = &mut self.device else {
            return;
        };
        match device.on_readable(&mut self.watchers, &mut self.work) {
            DeviceReadiness::Drained => {}
            DeviceReadiness::More => self.device_more = true,
            // The descriptor stays open (replies to parked requests fail
            // quietly); nothing more will be read from it.
            DeviceReadiness::Gone => tracing::warn!("device: the kernel ended the FUSE connection"),
        }
    }

    /// The service (for the startup line).
    pub fn service(&self) -> &Service {
        self.watchers.service()
    }

    /// Runs until SIGTERM/SIGINT.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        while !self.shutting_down {
            let timeout = if self.work.has_resumed()
                || !self.poll_sources_more.is_empty()
                || self.device_more
                || self.host.as_ref().is_some_and(HostChannel::has_ready)
            {
                Some(Duration::ZERO)
            } else {
                self.next_deadline()
                    .map(|d| d.saturating_duration_since(Instant::now()))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let resumed = self.work.take_resumed();
            let mut accept = self.work.take_accept();
            for i in std::mem::take(&mut self.poll_sources_more) {
                self.on_poll_source(i);
            }
            if std::mem::take(&mut self.device_more) {
                self.on_device_readable();
            }
            for event in events.iter() {
                match event.token() {
                    socket::LISTENER => accept = true,
                    WAKER => self.drain_commands(),
                    SIGNALS => self.shutting_down = true,
                    DEVICE => self.on_device_readable(),
                    host_channel::LISTENER => {
                        if let Some(host) = &mut self.host {
                            host.accept_all();
                        }
                    }
                    token if HostChannel::key_of(token).is_some() => {
                        let key = HostChannel::key_of(token).expect("checked");
                        let writable = event.is_writable();
                        let hung_up = event.is_write_closed() || event.is_error();
                        self.with_host(|host, cx| host.on_event(key, writable, hung_up, cx));
                    }
                    Token(t) if t <= POLL_SOURCES && POLL_SOURCES - t < MAX_POLL_SOURCES => {
                        self.on_poll_source(POLL_SOURCES - t)
                    }
                    Token(key) => {
                        let closed = event.is_read_closed() || event.is_error();
                        let readable = event.is_readable() || closed;
                        let writable = event.is_writable();
                        self.with_socket(|socket, cx| {
                            socket.on_event(key, writable, readable, closed, cx)
                        });
                    }
                }
            }
            for key in resumed {
                self.with_socket(|socket, cx| socket.resume(key, cx));
            }
            if accept {
                // Once per turn, a bounded number (`socket::ACCEPTS_PER_TURN`).
                self.socket.accept_all(&self.watchers, &mut self.work);
            }
            self.with_host(|host, cx| host.run_ready(cx));
            self.process_work();
            let now = Instant::now();
            if let Some(device) = &mut self.device {
                device.expire(now);
            }
            self.with_socket(|socket, cx| socket.expire(now, cx));
            self.with_host(|host, cx| host.expire(now, cx));
            let transition = self.watchers.lifecycle_tick(now);
            self.work.transition(transition);
            self.watchdog.tick(now);
            crate::ratelimit::flush();
            self.process_work();
            self.socket.reap(&mut self.watchers, &mut self.work);
            if let Some(host) = &mut self.host {
                host.reap(&mut self.watchers, &mut self.work);
            }
            self.process_work();
        }
        self.shutdown();
        Ok(())
    }

    /// Runs `f` on the socket frontend with the context it may touch.
    fn with_socket(&mut self, f: impl FnOnce(&mut SocketFrontend, &mut Context<'_>)) {
        let sources = &self.sources;
        let device = self.device.as_ref();
        let lag = self.last_kernel_lag_us;
        let hooks = self.hooks.as_ref().map(|h| &h.runner);
        let status = |w: &Watchers| status_report(w, sources, device, lag, hooks);
        let mut cx = Context {
            watchers: &mut self.watchers,
            work: &mut self.work,
            status: &status,
        };
        f(&mut self.socket, &mut cx);
    }

    /// Runs `f` on the host channel, if on, with the context it may touch.
    fn with_host(&mut self, f: impl FnOnce(&mut HostChannel, &mut Context<'_>)) {
        let Some(host) = &mut self.host else {
            return;
        };
        let sources = &self.sources;
        let device = self.device.as_ref();
        let lag = self.last_kernel_lag_us;
        let hooks = self.hooks.as_ref().map(|h| &h.runner);
        let status = |w: &Watchers| status_report(w, sources, device, lag, hooks);
        let mut cx = Context {
            watchers: &mut self.watchers,
            work: &mut self.work,
            status: &status,
        };
        f(host, &mut cx);
    }

    /// Processes queued bumps and settles until nothing is left. Each step
    /// may queue more (a bump queues a settle), never recurse.
    fn process_work(&mut self) {
        loop {
            if let Some(request) = self.work.next_bump() {
                self.privileged_bump(request);
                continue;
            }
            if self.work.take_settle() {
                if let Some(device) = &mut self.device {
                    device.settle(&self.watchers);
                }
                self.with_socket(|socket, cx| socket.settle(cx));
                self.with_host(|host, cx| host.settle(cx));
                let transition = self.watchers.caught_up();
                self.work.transition(transition);
                continue;
            }
            if let Some(transition) = self.work.next_transition() {
                self.announce(transition);
                continue;
            }
            return;
        }
    }

    fn shutdown(&mut self) {
        tracing::info!(
            generation = self.watchers.generation(),
            "shutting down; the saved generation is kept for the next start"
        );
        self.socket.shutdown(&self.watchers);
        if let Some(host) = &mut self.host {
            host.shutdown();
        }
        self.watchers.stopping();
        self.watchers.service().dir().remove_socket();
        if let Some(device) = &mut self.device {
            device.shutdown();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.socket
            .next_deadline()
            .into_iter()
            .chain(self.device.as_ref().and_then(|d| d.next_deadline()))
            .chain(self.watchers.lifecycle_deadline())
            .chain(self.watchdog.deadline())
            .chain(self.host.as_ref().and_then(HostChannel::next_deadline))
            .min()
    }

    fn drain_commands(&mut self) {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::SourceEvent(ev) => self.on_source_event(ev),
                Command::Device(request) => {
                    if let Some(device) = &mut self.device {
                        device.handle(request, &mut self.watchers, &mut self.work);
                    }
                }
                Command::Hooks(finished) => self.on_hooks_finished(finished),
                Command::SourceStopped { name, error } => self.source_stopped(name, error),
            }
        }
    }

    fn on_source_event(&mut self, ev: sysgenid_sources::SourceEvent) {
        // Failures are logged where they happen.
        let _ = self.restore_signal(ev, BumpRequest::default());
    }

    /// A restore signal, with what its sender said of the change (kernel
    /// sources say nothing: [`BumpRequest::default`]). The first signal of
    /// a restore bumps; another source's signal within the coalescing
    /// window is the same restore: its entropy is still mixed in (and the
    /// RNG reseeded again), and a kind the change did not have yet is
    /// taken (the hooks then run again, with it), so a vmgenid-caused
    /// change that the host then calls a clone is a clone. Returns the
    /// generation and whether the signal was coalesced.
    pub fn restore_signal(
        &mut self,
        ev: sysgenid_sources::SourceEvent,
        request: BumpRequest,
    ) -> Result<(Generation, bool), BumpError> {
        let result = self.offer_signal(&ev, &request);
        // The source's statistics after the bump: nothing but the bump
        // comes between the signal and the page.
        if let Some(s) = self.sources.iter_mut().find(|s| s.name == ev.source) {
            s.events += 1;
            s.last_event_unix_ms = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or(0),
            );
        }
        result
    }

    /// Bumps for a restore signal, or merges it into the change just made;
    /// the generation and whether it was merged.
    fn offer_signal(
        &mut self,
        ev: &sysgenid_sources::SourceEvent,
        request: &BumpRequest,
    ) -> Result<(Generation, bool), BumpError> {
        match self.coalescer.offer(ev.source, Instant::now()) {
            sysgenid_sources::Offer::Bump => {
                // No log line before the bump: until the page shows it,
                // every program on this machine still believes it is
                // unique. The bump's one line names the signal.
                let result = self.change(request, BumpCause::Source(ev.source), Some(ev));
                if let Err(e) = &result {
                    tracing::error!(source = ev.source, "restore signal: {}", ev.detail);
                    tracing::error!(source = ev.source, "could not bump: {e}");
                }
                result.map(|generation| (generation, false))
            }
            sysgenid_sources::Offer::Merged => {
                tracing::info!(
                    source = ev.source,
                    kind = request.details.kind.name(),
                    "restore signal coalesced with the change just made: {}",
                    ev.detail
                );
                self.watchers.note_agreeing_source(ev.source);
                if self.watchers.refine_last_change(request) {
                    tracing::info!(
                        generation = self.watchers.generation(),
                        kind = request.details.kind.name(),
                        "the change is a {}: running the change hooks again with it",
                        request.details.kind.name()
                    );
                    let before = self.watchers.generation().wrapping_sub(1);
                    self.run_hooks(HookEvent::Change, Some(before));
                }
                Ok((self.watchers.generation(), true))
            }
        }
    }

    /// A privileged request checked by its frontend: bump (never coalesced:
    /// a manual bump is deliberate), then answer the requester.
    fn privileged_bump(&mut self, bump: PrivilegedBump) {
        let PrivilegedBump { request, requester } = bump;
        if let Requester::Host(key) = requester {
            self.host_restored(key, request);
            return;
        }
        let result = match self
            .watchers
            .check_minimum(request.min, request.allow_exhaustion)
        {
            Ok(()) => self.change(&request, BumpCause::Manual, None),
            Err(e) => Err(e.into()),
        };
        match requester {
            Requester::Socket(key) => {
                self.with_socket(|socket, cx| socket.answer_bump(key, &result, cx))
            }
            // A restore signal, answered by `host_restored` (above).
            Requester::Host(_) => {}
            Requester::Device(unique) => {
                if let Err(e) = &result {
                    tracing::error!("forced update on the device failed: {e}");
                }
                if let Some(device) = &self.device {
                    device.answer_bump(unique, &result);
                }
            }
        }
    }

    /// The host's `restored`: a restore signal from source `host`
    /// carrying the kind, the host's entropy and the hostname. The kernel
    /// RNG is renewed with the entropy before anyone hears of the change
    /// (`change`), and a kernel signal for the same restore within the
    /// coalescing window is the same change (`restore_signal`). The host
    /// is answered with what was done.
    fn host_restored(&mut self, key: usize, request: BumpRequest) {
        let kind = request.details.kind;
        let ev = sysgenid_sources::SourceEvent {
            source: "host",
            detail: format!("the host reports a {} over the host channel", kind.name()),
            kernel_time_us: None,
        };
        let result = self.restore_signal(ev, request);
        let last = self.watchers.service().last_change();
        let rng = last.map(|c| c.rng.clone()).unwrap_or_default();
        let report = sysgenid_proto::host::RestoredReport {
            kind: sysgenid_proto::host::RestoreKind::from_change_kind(kind),
            coalesced: matches!(result, Ok((_, true))),
            entropy_bytes: rng.entropy_mixed as usize,
            kernel_reseeded: rng.reseeded,
            kernel_reseed_error: rng
                .not_reseeded_because
                .clone()
                .or(rng.entropy_error.clone()),
            hostname: last.and_then(|c| c.hostname.as_ref().map(|h| h.to_string())),
        };
        let reply = HostChannel::bump_reply(&result.map(|(generation, _)| generation), report);
        if let Some(host) = &mut self.host {
            host.answer_restored(key, reply);
        }
    }

    /// Makes a change and tells everyone: the kernel RNG is renewed, the
    /// epoch drawn, the state saved and the page published (all in
    /// `Service::bump`) before the first watcher is told (socket watchers
    /// right after publication, before the log line); barrier waits are
    /// settled next, from the work list. `signal` is the source's event, if
    /// a source caused it: when it carries the kernel's timestamp, the lag
    /// from it to publication is logged and kept for status. One log line
    /// (two if the kernel RNG could not be reseeded), written after
    /// publication; its fields name the kind and how the kernel RNG was
    /// renewed (`kernel_rng`). Every frontend's bump comes through here.
    pub fn change(
        &mut self,
        request: &BumpRequest,
        cause: BumpCause,
        signal: Option<&sysgenid_sources::SourceEvent>,
    ) -> Result<Generation, BumpError> {
        let before = self.watchers.generation();
        let bumped = self.watchers.bump(request, cause)?;
        // Clamped at 0: the printk clock and CLOCK_MONOTONIC may disagree
        // by a few microseconds.
        let lag_us = signal
            .and_then(|s| s.kernel_time_us)
            .map(|t| monotonic_us().saturating_sub(t));
        // (The lag is taken first: it ends at publication.)
        if signal.is_some() {
            // A restore: the page is published and durable. Give the CPU
            // away once before the bookkeeping (log line, fan-out), so a
            // program on this CPU that checks the page, the one that may
            // hold cloned state, sees the new generation first (measured:
            // ~3x a pipe wake without, ~2x with). Manual bumps do not yield.
            rustix::thread::sched_yield();
        }
        // The socket watchers first: nothing they can do with the frame is
        // read before this turn ends, and the log line below costs a few
        // microseconds that were on every watcher's path.
        self.socket.on_bump_committed(&bumped);

        let last = self.watchers.service().last_change().cloned();
        let kind = last.as_ref().map_or("unknown", |c| c.kind.name());
        let rng = last.as_ref().map(|c| c.rng.clone()).unwrap_or_default();
        let reseed = match (&rng.by, rng.entropy_mixed) {
            (Some(by), 0) => format!("reseeded by {by}"),
            (Some(by), n) => format!("reseeded by {by} with {n} bytes of host entropy"),
            (None, _) => "NOT reseeded".to_string(),
        };
        match (signal, lag_us) {
            (Some(signal), Some(lag_us)) => {
                self.last_kernel_lag_us = Some(lag_us);
                tracing::info!(
                    generation = bumped.generation,
                    source = cause.name(),
                    kernel_record_to_page_us = lag_us,
                    kind,
                    kernel_rng = %reseed,
                    "generation changed: restore signal: {}",
                    signal.detail
                );
            }
            (Some(signal), None) => tracing::info!(
                generation = bumped.generation,
                source = cause.name(),
                kind,
                kernel_rng = %reseed,
                "generation changed: restore signal: {}",
                signal.detail
            ),
            (None, _) => tracing::info!(
                generation = bumped.generation,
                source = cause.name(),
                kind,
                kernel_rng = %reseed,
                "generation changed"
            ),
        }
        if let Some(why) = &rng.not_reseeded_because {
            tracing::warn!(
                generation = bumped.generation,
                "the kernel RNG was not reseeded by sysgenidd before this change: {why}; \
                 clones of one snapshot may share a random stream until the kernel reseeds by itself"
            );
        }
        if let Some(why) = &rng.entropy_error {
            tracing::warn!(
                generation = bumped.generation,
                "the entropy that came with this change was not mixed in: {why}"
            );
        }
        crate::supervisor::status(&format!(
            "generation {}, last changed by {}",
            bumped.generation,
            cause.name()
        ));
        self.run_hooks(HookEvent::Change, Some(before));
        // After the hooks' watchers are counted: a thaw after a restore
        // waits for them too.
        let transition = self.watchers.restored();
        self.work.transition(transition);
        if let Some(device) = &mut self.device {
            device.on_bump(&self.watchers);
        }
        self.work.settle();
        Ok(bumped.generation)
    }

    /// Submits a hooks job. For a change (`acked_before` = the generation
    /// before it), one tracked, outdated watcher per hook is held until the
    /// job finishes, so `wait-watchers` waits for the hooks.
    fn run_hooks(&mut self, event: HookEvent, acked_before: Option<Generation>) {
        let Some(hooks) = &mut self.hooks else {
            return;
        };
        let ticket = hooks.next_ticket;
        hooks.next_ticket += 1;
        if let Some(before) = acked_before {
            let held: Vec<WatcherId> = (0..hooks.runner.rescan())
                .filter_map(|_| {
                    self.watchers
                        .admit(0, Tracking::Tracked, Some(before), true)
                        .ok()
                })
                .collect();
            hooks.watchers.insert(ticket, held);
        }
        let last = self.watchers.service().last_change();
        hooks.runner.submit(Job {
            ticket,
            event,
            generation: self.watchers.generation(),
            epoch: epoch_hex(&self.watchers.record().epoch),
            kind: last.map(|c| c.kind).unwrap_or_default(),
            hostname: last.and_then(|c| c.hostname.as_ref().map(|h| h.to_string())),
        });
    }

    /// A hooks job finished: a freeze's confirms the hooks' participant, a
    /// change's releases the watchers it held.
    fn on_hooks_finished(&mut self, finished: Finished) {
        let Some(hooks) = &mut self.hooks else {
            return;
        };
        hooks.runner.record(&finished);
        match finished.job.event {
            HookEvent::Freeze { freeze } => {
                let participant = hooks.participant;
                let transition = self.watchers.confirm(participant, freeze).ok().flatten();
                self.work.transition(transition);
            }
            HookEvent::Change => {
                // A failed hook did not renew what it should have: the
                // change stays unacknowledged (wait-watchers names it)
                // until the next change's run, which replaces this one's.
                let mut held = hooks
                    .watchers
                    .remove(&finished.job.ticket)
                    .unwrap_or_default();
                let keep = finished.failed().len().min(held.len());
                let released =
                    std::mem::replace(&mut hooks.failed, held.split_off(held.len() - keep));
                for id in released.into_iter().chain(held) {
                    self.watchers.release(id, 0);
                }
                self.work.settle();
            }
            HookEvent::Thaw => {}
        }
    }

    /// Tells everyone about a lifecycle transition: participants, hooks,
    /// and the orchestrator waiting for its freeze.
    fn announce(&mut self, transition: Transition) {
        let generation = self.watchers.generation();
        match transition {
            Transition::FreezeStarted { id } => {
                let counts = self.watchers.lifecycle_counts();
                tracing::info!(
                    freeze = id,
                    "freezing: asking {} participant(s) to quiesce ({} to wait for)",
                    counts.participants,
                    counts.pending
                );
                self.socket.on_lifecycle_event(
                    Reply::Freeze {
                        freeze: id,
                        generation,
                    },
                    &self.watchers,
                );
                self.run_hooks(HookEvent::Freeze { freeze: id }, None);
            }
            Transition::Frozen { id } => {
                tracing::info!(freeze = id, "frozen");
                self.with_socket(|socket, cx| socket.answer_freeze(id, FreezeOutcome::Frozen, cx));
                self.with_host(|host, cx| host.answer_freeze(id, FreezeOutcome::Frozen, cx));
            }
            Transition::Aborted {
                id,
                pending,
                reason,
            } => {
                let why = match reason {
                    AbortReason::TimedOut => "it timed out",
                    AbortReason::ThawRequested => "a thaw was asked for",
                    AbortReason::Restored => "the generation changed",
                    AbortReason::RequesterGone => "its orchestrator went away",
                };
                tracing::warn!(
                    freeze = id,
                    pending,
                    "freeze aborted because {why}, with {pending} participant(s) or hooks not confirmed; thawing everyone"
                );
                let outcome = FreezeOutcome::Aborted { pending, reason };
                self.with_socket(|socket, cx| socket.answer_freeze(id, outcome, cx));
                self.with_host(|host, cx| host.answer_freeze(id, outcome, cx));
                self.thaw_everyone(id, generation);
            }
            Transition::Thawed { id, reason } => {
                match reason {
                    ThawReason::Requested => tracing::info!(freeze = id, "thawed"),
                    ThawReason::Restored => tracing::info!(
                        freeze = id,
                        "restored while frozen and every tracked watcher acknowledged: thawed by itself"
                    ),
                    ThawReason::Bound => tracing::warn!(
                        freeze = id,
                        "frozen for the longest allowed (--max-frozen-ms): thawed by itself"
                    ),
                }
                self.thaw_everyone(id, generation);
            }
        }
    }

    fn thaw_everyone(&mut self, freeze: u32, generation: Generation) {
        self.socket
            .on_lifecycle_event(Reply::Thaw { freeze, generation }, &self.watchers);
        self.run_hooks(HookEvent::Thaw, None);
    }
}
