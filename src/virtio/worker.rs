//! The thread a device serves its queues on, once the guest's driver has activated it.
//!
//! Each active device gets one thread and one epoll set: the queues' kick eventfds (which KVM
//! signals when the guest notifies, through ioeventfd, without waking a vCPU thread), whatever
//! the device's backend needs (a tap's fd, a pipe), and a stop eventfd of ours. A device that
//! blocks on its backend only delays its own queues.
//!
//! The device's handler returns an error when the device can't go on: the guest broke a queue
//! beyond one failed request, or the host failed it (a tap deleted under us). The worker then
//! marks the device NEEDS_RESET and stops serving it until the driver resets it. Stopping
//! returns the handler.
//!
//! By convention queue *i*'s kick is registered under token *i*, and a device's other fds
//! (its backend) under tokens after its queues', so that a handler driven by hand
//! (`HandDriven`, in tests and fuzz targets) is told "queue 1 was kicked" as `handle(1)`.

use std::io;
use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::Signals;
#[cfg(any(test, feature = "test-utils"))]
use super::{ActivateError, Activation, Device};
use crate::seccomp::{self, Role};

/// The token of our own stop eventfd; handlers use any other.
const STOP_TOKEN: u64 = u64::MAX;

/// What a device runs on its worker thread.
pub trait DeviceWorker: Send + 'static {
    /// Why the device can't go on; reported when it is marked NEEDS_RESET.
    type Error: std::error::Error + Send + 'static;

    /// The seccomp filter the worker thread confines itself with: the common one, unless the
    /// backend needs more (vsock's sockets, a disk's io_uring).
    fn role(&self) -> Role {
        Role::DeviceWorker
    }

    /// Adds the handler's fds to `epoll` (see [`watch`]), each with a token of its choosing.
    fn register(&mut self, epoll: &Epoll) -> io::Result<()>;

    /// Handles readiness of the fd registered as `token`. It may change registrations (to stop
    /// polling a tap while the guest has posted no buffers, say). An `Err` means the device is
    /// broken until the guest resets it.
    fn handle(&mut self, epoll: &Epoll, token: u64, events: EventSet) -> Result<(), Self::Error>;
}

/// Registers `fd` for readability under `token`.
pub fn watch(epoll: &Epoll, fd: &impl AsRawFd, token: u64) -> io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
}

/// A running worker thread; dropping it without [`Worker::stop`] leaves the thread running.
pub struct Worker<W> {
    stop: EventFd,
    thread: JoinHandle<W>,
    /// How the worker reaches the guest, kept to start another worker on the same handler.
    signals: Signals,
}

impl<W: DeviceWorker> Worker<W> {
    /// Starts `handler` on a thread called `name`; its errors are reported through `signals`.
    pub fn spawn(name: &str, mut handler: W, signals: Signals) -> io::Result<Worker<W>> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        watch(&epoll, &stop, STOP_TOKEN)?;
        handler.register(&epoll)?;
        let stop_seen = stop.try_clone()?;
        let worker_signals = signals.clone();
        let thread = crate::threads::spawn_worker(name, move || serve(epoll, handler, &worker_signals, stop_seen))?;
        Ok(Worker { stop, thread, signals })
    }

    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// Stops the thread and gives back its handler. `None` only if the thread panicked, which
    /// with `panic = "abort"` can't happen in a release build.
    pub fn stop(self) -> Option<W> {
        // Writing to our own fresh eventfd can't fail short of a 2^64 counter.
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

/// A handler served on the calling thread, one event at a time: how fuzz targets and property
/// tests drive a device synchronously, as its worker thread would.
#[cfg(any(test, feature = "test-utils"))]
pub struct HandDriven<W> {
    pub handler: W,
    epoll: Epoll,
}

#[cfg(any(test, feature = "test-utils"))]
impl<W: DeviceWorker> HandDriven<W> {
    /// Activates `device` as [`VirtioDevice::activate`] does, but with the handler kept here
    /// and registered on an epoll nobody waits on, instead of on a thread.
    ///
    /// [`VirtioDevice::activate`]: super::VirtioDevice::activate
    pub fn activate<D: Device<Handler = W>>(device: &D, activation: Activation) -> Result<HandDriven<W>, ActivateError> {
        HandDriven::on_epoll(device.handler(activation)?)
    }

    /// Every handler of an activation ([`Device::handlers`]: one per queue of a multiqueue
    /// disk), each driven by hand as its own worker would drive it.
    pub fn activate_each<D: Device<Handler = W>>(device: &D, activation: Activation) -> Result<Vec<HandDriven<W>>, ActivateError> {
        device.handlers(activation)?.into_iter().map(HandDriven::on_epoll).collect()
    }

    fn on_epoll(mut handler: W) -> Result<HandDriven<W>, ActivateError> {
        let epoll = Epoll::new().map_err(ActivateError::WorkerThread)?;
        handler.register(&epoll).map_err(ActivateError::WorkerThread)?;
        Ok(HandDriven { handler, epoll })
    }

    /// Tells the handler the fd registered as `token` is readable.
    pub fn handle(&mut self, token: u64) -> Result<(), W::Error> {
        self.handler.handle(&self.epoll, token, EventSet::IN)
    }
}

fn serve<W: DeviceWorker>(epoll: Epoll, mut handler: W, signals: &Signals, stop: EventFd) -> W {
    if let Err(e) = seccomp::confine(handler.role()) {
        signals.device_broken(&e);
        wait_for_stop(&stop);
        return handler;
    }
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                signals.device_broken(&format_args!("the worker's epoll failed: {e}"));
                return handler;
            }
        };
        for event in &events[..ready] {
            if event.data() == STOP_TOKEN {
                return handler;
            }
            if let Err(why) = handler.handle(&epoll, event.data(), event.event_set()) {
                signals.device_broken(&why);
                wait_for_stop(&stop);
                return handler;
            }
        }
    }
}

/// A broken device serves nothing until the driver resets it, which stops this thread. Only
/// the stop eventfd is watched now: the guest's kicks must not keep the thread spinning.
fn wait_for_stop(stop: &EventFd) {
    let Ok(epoll) = Epoll::new() else { return };
    if watch(&epoll, stop, STOP_TOKEN).is_err() {
        return;
    }
    let mut events = [EpollEvent::default()];
    while let Err(e) = epoll.wait(-1, &mut events) {
        if e.kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::wait_until;

    /// Counts kicks on one eventfd; fails on the third.
    struct Counter {
        kick: EventFd,
        seen: u64,
        shared: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("third kick")]
    struct ThirdKick;

    impl DeviceWorker for Counter {
        type Error = ThirdKick;

        fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
            watch(epoll, &self.kick, 0)
        }
        fn handle(&mut self, _: &Epoll, _: u64, _: EventSet) -> Result<(), ThirdKick> {
            self.seen += self.kick.read().unwrap_or(0);
            self.shared.store(self.seen, std::sync::atomic::Ordering::SeqCst);
            if self.seen >= 3 {
                return Err(ThirdKick);
            }
            Ok(())
        }
    }

    #[test]
    fn kicks_reach_the_handler_and_stop_returns_it() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let trigger = kick.try_clone().expect("clone");
        let shared = std::sync::Arc::default();
        let counter = Counter { kick, seen: 0, shared: std::sync::Arc::clone(&shared) };
        let worker = Worker::spawn("test", counter, Signals::standalone(1)).expect("spawn");
        trigger.write(2).expect("kick");
        wait_until(|| shared.load(std::sync::atomic::Ordering::SeqCst) == 2);
        let handler = worker.stop().expect("joined");
        assert_eq!(handler.seen, 2, "the kick was handled before the stop");
    }

    #[test]
    fn a_handler_error_marks_the_device_broken_and_the_worker_still_stops() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let trigger = kick.try_clone().expect("clone");
        let signals = Signals::standalone(1);
        let counter = Counter { kick, seen: 0, shared: std::sync::Arc::default() };
        let worker = Worker::spawn("test", counter, signals.clone()).expect("spawn");
        trigger.write(3).expect("kick");
        wait_until(|| signals.is_broken());
        assert_eq!(worker.stop().map(|h| h.seen), Some(3));
    }
}
