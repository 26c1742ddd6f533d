//! `sysgenidd`, the System Generation ID daemon, as a library so its parts
//! can be tested on their own. The binary (`main.rs`) only parses flags.
//!
//! Layout, from the inside out:
//! * [`cli`]: the command line, shared with the man page and completions;
//! * [`service`]: the pure `sysgenid-core` state machine plus the saved
//!   state ([`state`]) and the published page, in crash-safe order;
//! * [`watchers`]: the one owner of the service, the watcher limits, the
//!   per-uid accounting and the `manual` source's statistics;
//! * [`work`]: the work list and the requests pending with a deadline,
//!   which the frontends fill and the loop drains;
//! * [`requests`]: the decisions every frontend shares (freeze, thaw,
//!   barrier waits, bump and freeze replies; the device answers with
//!   their errnos), so each frontend is its transport only;
//! * [`socket`]: the socket frontend (accept, frames, outboxes);
//! * [`device`]: `/dev/sysgenid`, the seed's device ABI served through
//!   FUSE, its handles watchers in the same core;
//! * [`event_loop`]: the single-threaded loop that owns the watchers and
//!   the frontends, drives them and fans a bump out to them;
//! * [`runtime_dir`]: where the socket, page, state and lock live, created
//!   without following anyone's symlinks;
//! * [`peer`]: who is on the other end, and whether they may bump;
//! * [`host_channel`]: the third frontend, for the hypervisor host over
//!   vsock (`--host-channel`), one JSON line per request;
//! * [`reseed`]: the kernel RNG renewed (host entropy, forced reseed)
//!   before a change is published;
//! * [`hooks`]: the hooks directory's runner, on a thread of its own;
//! * [`supervisor`]: readiness and the watchdog for systemd;
//! * [`sched`]: the loop thread's short scheduler slice (restore window);
//! * [`container`]: whether it runs in a container, where no kernel
//!   restore signal applies;
//! * [`ratelimit`]: rate-limited log lines for everything a peer can cause;
//! * [`trust`]: who holds the lifecycle (`--lifecycle-group`);
//! * restore-signal sources come from the `sysgenid-sources` crate and run
//!   in their own threads, feeding the loop through a channel.
//!
//! May depend on: `sysgenid-core`, `sysgenid-proto`, `sysgenid-page`,
//! `sysgenid-sources`. Nothing depends on it but its binary and the man
//! page generator (`sysgenid-packaging`, through [`cli`]). Inside, the
//! frontends (`socket`, `device`, `host_channel`) depend on `watchers`,
//! `work` and `requests` only (the host channel also on the socket's
//! `Context`); `event_loop` is the one module that uses every frontend.

pub mod cli;
pub mod container;
pub mod device;
pub mod event_loop;
pub mod hooks;
pub mod host_channel;
pub mod peer;
pub mod ratelimit;
pub mod requests;
pub mod reseed;
pub mod runtime_dir;
pub mod sched;
pub mod service;
pub mod socket;
pub mod state;
pub mod supervisor;
pub mod trust;
pub mod watchers;
pub mod work;
