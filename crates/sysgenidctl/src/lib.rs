//! `sysgenidctl` as a library: only its command line ([`cli`]), shared by
//! the binary and the man page and completion generator.

pub mod cli;
