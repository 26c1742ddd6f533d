//! One module per scenario; each measures its figure and its same-run
//! baseline and writes rows into the table.

pub(crate) mod barrier;
pub(crate) mod bump_path;
pub(crate) mod device;
pub(crate) mod fanout;
pub(crate) mod memory;
pub(crate) mod one_waiter;
pub(crate) mod probe;
pub(crate) mod window;
