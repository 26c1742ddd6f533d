//! `sysgenidctl` as a library: its command line ([`cli`]), shared by the
//! binary and the man page and completion generator, and the pure part of
//! the CRIU action script ([`criu`]).

pub mod cli;
pub mod criu;
