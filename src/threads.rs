//! How lguest starts its threads: named (so `top -H`, `/proc/PID/task/*/comm` and the
//! SIGSYS report say which is which) and with a small stack.
//!
//! The stack size is a memory matter. Rust's default is 2 MiB, and on a host whose
//! transparent huge pages are `always` a 2 MiB stack that happens to be 2 MiB-aligned is
//! backed by one huge page as soon as it is touched: 2 MiB of RSS for a thread that uses a
//! few KiB (seen in the lab: the VMM's own overhead went from 3.3 to 5.3 MiB when thread
//! start-up order changed). No lguest thread recurses or keeps big buffers on its stack;
//! 256 KiB leaves them a wide margin and can never hold a huge page.

use std::io;
use std::thread::{Builder, JoinHandle};

/// Every lguest thread's stack.
pub const STACK_BYTES: usize = 256 << 10;

/// Starts `body` on a thread called `name`.
pub fn spawn<T: Send + 'static>(name: impl Into<String>, body: impl FnOnce() -> T + Send + 'static) -> io::Result<JoinHandle<T>> {
    Builder::new().name(name.into()).stack_size(STACK_BYTES).spawn(body)
}
