//! `sysgenidctl` as a library: its command line ([`cli`]), shared by the
//! binary and the man page and completion generator, and the `hooks`
//! subcommand's file work ([`hooks`]), kept apart from the daemon client.

#![forbid(unsafe_code)]

pub mod cli;
pub mod hooks;
