//! How lguest starts its threads: named (so `top -H`, `/proc/PID/task/*/comm` and the
//! SIGSYS report say which is which), with a small stack, and, for device workers, never from
//! a vCPU.
//!
//! The stack size is a memory matter. Rust's default is 2 MiB, and on a host whose
//! transparent huge pages are `always` a 2 MiB stack that happens to be 2 MiB-aligned is
//! backed by one huge page as soon as it is touched: 2 MiB of RSS for a thread that uses a
//! few KiB (seen in the lab: the VMM's own overhead went from 3.3 to 5.3 MiB when thread
//! start-up order changed). No lguest thread recurses or keeps big buffers on its stack;
//! 256 KiB leaves them a wide margin and can never hold a huge page.
//!
//! A device's worker thread is wanted when the guest activates the device, which happens on
//! a vCPU thread (its write of DRIVER_OK). A thread inherits its creator's seccomp filter, so
//! a worker started by a vCPU could do only what a vCPU may, and a vCPU would have to be
//! allowed to create threads. Instead, [`spawn_worker`] hands the start to the *spawner*, a
//! thread the main thread starts ([`start_spawner`]) whose filter allows creating threads
//! and what the workers need (each worker then narrows itself further): a vCPU can create
//! neither threads nor processes.

use std::io;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{Builder, JoinHandle};

use crate::seccomp::{self, Role};

/// Every lguest thread's stack.
pub const STACK_BYTES: usize = 256 << 10;

/// Starts `body` on a thread called `name`.
pub fn spawn<T: Send + 'static>(name: impl Into<String>, body: impl FnOnce() -> T + Send + 'static) -> io::Result<JoinHandle<T>> {
    Builder::new().name(name.into()).stack_size(STACK_BYTES).spawn(body)
}

/// A start the spawner makes for someone else.
type Job = Box<dyn FnOnce() + Send>;

/// Where jobs reach the spawner, once it runs.
static SPAWNER: OnceLock<Mutex<SyncSender<Job>>> = OnceLock::new();
/// The process has a spawner (or is about to): workers must come from it.
static SPAWNER_EXPECTED: AtomicBool = AtomicBool::new(false);

/// Says, before any vCPU runs, that the spawner is coming ([`start_spawner`]): from now on a
/// worker is started by it, waiting for it if need be. Without this (unit tests, fuzz
/// targets, which build devices without a VM) [`spawn_worker`] starts threads directly.
pub fn expect_spawner() {
    SPAWNER_EXPECTED.store(true, Ordering::Release);
}

/// Starts the spawner thread; called once per process by the main thread. It confines
/// itself to [`Role::Spawner`] before taking any job.
pub fn start_spawner() -> io::Result<()> {
    let (jobs, incoming) = mpsc::sync_channel::<Job>(0);
    spawn("spawner", move || serve_jobs(incoming))?;
    let _ = SPAWNER.set(Mutex::new(jobs));
    Ok(())
}

fn serve_jobs(incoming: Receiver<Job>) {
    if let Err(e) = seccomp::confine(Role::Spawner) {
        // Without its filter the spawner would pass an unconfined parent to every worker:
        // refuse the jobs instead (each start then fails, and its device needs a reset).
        tracing::warn!("the worker spawner could not confine itself: {e}");
        return;
    }
    for job in incoming {
        job();
    }
}

/// Starts a device worker called `name`: on the spawner when the process has one, else
/// directly. Blocks until the thread exists.
pub fn spawn_worker<T: Send + 'static>(name: &str, body: impl FnOnce() -> T + Send + 'static) -> io::Result<JoinHandle<T>> {
    if !SPAWNER_EXPECTED.load(Ordering::Acquire) {
        return spawn(name, body);
    }
    let (reply, started) = mpsc::sync_channel(1);
    let name = name.to_string();
    let job: Job = Box::new(move || {
        let _ = reply.send(spawn(name, body));
    });
    let spawner_gone = || io::Error::other("the worker spawner thread is gone");
    let jobs = SPAWNER.wait().lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    jobs.send(job).map_err(|_| spawner_gone())?;
    started.recv().map_err(|_| spawner_gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_get_their_name() {
        let name = spawn("lguest-test", || std::thread::current().name().map(str::to_string)).expect("spawn").join().ok();
        assert_eq!(name, Some(Some("lguest-test".to_string())));
    }

    #[test]
    fn without_a_spawner_workers_start_directly() {
        let got = spawn_worker("direct", || 42).expect("spawn").join().ok();
        assert_eq!(got, Some(42));
    }
}
