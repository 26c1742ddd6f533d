//! The watcher for tokio programs (feature `tokio`): the same socket,
//! driven by tokio's reactor instead of `poll(2)`.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use sysgenid_proto::{Reply, Request, SOCKET_NAME};

use crate::conn::{Conn, Try};
use crate::lifecycle::Freezes;
use crate::{expect_done, Error, Event, WatcherBuilder};

/// An async [`Watcher`](crate::Watcher). `read().await` completes when the
/// watcher is outdated; reconnects when the daemon restarts (if the builder
/// asked for it, the default).
///
/// Cancellation: dropping an `ack` or `wait_watchers` future after its
/// request was sent leaves the reply on its way; the next call first reads
/// and discards it (for a cancelled `wait_watchers`, that means waiting
/// until the daemon ends that wait), so replies are never mismatched.
/// `read` and `read_event` are cancel-safe.
pub struct AsyncWatcher {
    fd: AsyncFd<Conn>,
    opts: WatcherBuilder,
    acked: u32,
    /// A request was sent whose reply has not been read (its future was
    /// dropped).
    in_flight: bool,
    /// Lifecycle events read while waiting for a reply, oldest first.
    events: VecDeque<Event>,
    /// A generation not to report again ([`AsyncWatcher::skip`]).
    skipped: Option<u32>,
    /// The freezes told of, across reconnections.
    freezes: Freezes,
}

impl WatcherBuilder {
    /// Opens an [`AsyncWatcher`]; must be called inside a tokio runtime.
    pub async fn open_async(self) -> Result<AsyncWatcher, Error> {
        let (fd, acked) = connect(&self, None).await?;
        Ok(AsyncWatcher {
            fd,
            opts: self,
            acked,
            in_flight: false,
            events: VecDeque::new(),
            skipped: None,
            freezes: Freezes::default(),
        })
    }
}

async fn connect(opts: &WatcherBuilder, acked: Option<u32>) -> Result<(AsyncFd<Conn>, u32), Error> {
    let (role, version) = opts.hello(acked);
    let conn = Conn::connect(&opts.runtime_dir.join(SOCKET_NAME), role, version)?;
    // SAFETY: `Conn` owns its socket descriptor and returns that same
    // descriptor from `as_raw_fd` for as long as it lives; the `AsyncFd`
    // owns the `Conn`, so the descriptor stays open while registered.
    let fd = unsafe { AsyncFd::register_with_interest(conn, Interest::READABLE) }
        .map_err(|e| Error::Io(e.into()))?;
    match next_reply(&fd, &mut VecDeque::new()).await? {
        Reply::Welcome { generation, .. } => Ok((fd, generation)),
        Reply::Error(e) => Err(Error::from_reply(e)),
        other => Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
    }
}

/// The next reply, skipping `Changed` frames and keeping lifecycle events
/// in `events`.
async fn next_reply(fd: &AsyncFd<Conn>, events: &mut VecDeque<Event>) -> Result<Reply, Error> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.get_inner().try_recv()? {
            Try::Ready(Reply::Changed { .. }) => continue,
            Try::Ready(reply) if reply.is_lifecycle_event() => {
                events.extend(Event::from_reply(&reply));
            }
            Try::Ready(reply) => return Ok(reply),
            Try::WouldBlock => guard.clear_ready(),
        }
    }
}

impl AsyncWatcher {
    /// Completes with the current generation once this watcher is outdated
    /// (immediately, until acknowledged).
    /// On a lifecycle participant, use [`read_event`](Self::read_event).
    pub async fn read(&mut self) -> Result<u32, Error> {
        if self.opts.lifecycle {
            return loop {
                if let Event::Change { generation } = self.read_event().await? {
                    break Ok(generation);
                }
            };
        }
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().try_changed() {
                Ok(Try::Ready(g)) => return Ok(g),
                Ok(Try::WouldBlock) => guard.clear_ready(),
                Err(Error::Disconnected) if self.opts.reconnect => {
                    drop(guard);
                    self.reconnect().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `request` and returns its reply, first discarding the reply of
    /// a request whose future was dropped.
    async fn request(&mut self, request: &Request) -> Result<Reply, Error> {
        if self.in_flight {
            next_reply(&self.fd, &mut self.events).await?;
            self.in_flight = false;
        }
        self.fd.get_ref().send(request)?;
        self.in_flight = true;
        let reply = next_reply(&self.fd, &mut self.events).await?;
        self.in_flight = false;
        Ok(reply)
    }

    /// Acknowledges `generation` (must be current).
    pub async fn ack(&mut self, generation: u32) -> Result<(), Error> {
        expect_done(self.request(&Request::Ack { generation }).await?)?;
        self.acked = generation;
        self.skipped = None;
        Ok(())
    }

    /// The next event of a lifecycle participant; see
    /// [`Watcher::read_event`](crate::Watcher::read_event).
    pub async fn read_event(&mut self) -> Result<Event, Error> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(self.freezes.note(event));
            }
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().try_event(self.skipped) {
                Ok(Try::Ready(event)) => {
                    drop(guard);
                    return Ok(self.freezes.note(event));
                }
                Ok(Try::WouldBlock) => guard.clear_ready(),
                Err(Error::Disconnected) if self.opts.reconnect => {
                    drop(guard);
                    self.reconnect().await?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Confirms freeze `freeze`; see [`Watcher::confirm`](crate::Watcher::confirm).
    pub async fn confirm(&mut self, freeze: u32) -> Result<(), Error> {
        if self.freezes.told_before_reconnecting(freeze) {
            return Ok(());
        }
        expect_done(self.request(&Request::Confirm { freeze }).await?).map(drop)
    }

    /// See [`Watcher::skip`](crate::Watcher::skip).
    pub fn skip(&mut self, generation: u32) {
        self.skipped = Some(generation);
    }

    /// Barrier wait; see [`Watcher::wait_watchers`](crate::Watcher::wait_watchers).
    pub async fn wait_watchers(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        let request = Request::WaitWatchers {
            timeout_ms: crate::timeout_ms(timeout),
        };
        expect_done(self.request(&request).await?).map(drop)
    }

    async fn reconnect(&mut self) -> Result<(), Error> {
        let mut delay = Duration::from_millis(10);
        loop {
            match connect(&self.opts, Some(self.acked)).await {
                Ok((fd, generation)) => {
                    self.fd = fd;
                    self.in_flight = false;
                    let conn = self.fd.get_ref();
                    let thaw = self.freezes.reconnected(generation, || {
                        matches!(conn.try_peek(), Ok(Try::Ready(Reply::Freeze { .. })))
                    });
                    self.events.extend(thaw);
                    return Ok(());
                }
                Err(Error::NotRunning { .. } | Error::Disconnected) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }
}
