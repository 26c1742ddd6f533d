//! `sysgenidctl` as a library: its command line ([`cli`]), shared by the
//! binary and the man page and completion generator, the `hooks`
//! subcommand's file work ([`hooks`]), and the pure part of the CRIU action
//! script ([`criu`]), kept apart from the daemon client.

#![forbid(unsafe_code)]

pub mod cli;
pub mod criu;
pub mod hooks;
