//! `sysgenidd`, the System Generation ID daemon, as a library so its parts
//! can be tested on their own. The binary (`main.rs`) only parses flags.
//!
//! Layout, from the inside out:
//! * [`cli`]: the command line, shared with the man page and completions;
//! * [`service`]: the pure `sysgenid-core` state machine plus the saved
//!   state ([`state`]) and the published page, in crash-safe order;
//! * [`server`]: the socket frontend and the single-threaded event loop;
//! * [`runtime_dir`]: where the socket, page, state and lock live, created
//!   without following anyone's symlinks;
//! * [`device`]: `/dev/sysgenid`, the seed's device ABI served through
//!   FUSE, its handles watchers in the same core;
//! * [`peer`]: who is on the other end, and whether they may bump;
//! * [`supervisor`]: readiness and the watchdog for systemd;
//! * restore-signal sources come from the `sysgenid-sources` crate and run
//!   in their own threads, feeding the loop through a channel.
//!
//! May depend on: `sysgenid-core`, `sysgenid-proto`, `sysgenid-page`,
//! `sysgenid-sources`. Nothing depends on it but its binary.

pub mod cli;
pub mod device;
pub mod peer;
pub mod runtime_dir;
pub mod server;
pub mod service;
pub mod state;
pub mod supervisor;
