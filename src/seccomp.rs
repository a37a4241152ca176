//! Seccomp: each thread that handles guest-controlled data may make only the system calls
//! its job needs.
//!
//! A guest that found a bug in a device or in our exit handling would run code as the VMM.
//! Seccomp narrows what that code could do: no opening files, no sockets, no exec, no ptrace.
//! The filters are per thread ([`Role`]) and installed by each thread on itself as it starts
//! ([`confine`]): the vCPU threads, the device workers and the spawner that starts them, the
//! console's stdin pump, the signal watcher and the API server. The main thread builds the VM (opening files, /dev/kvm, taps) and afterwards only
//! waits; it touches no guest data and keeps no filter, so that `--reboot restart` can build
//! the VM again.
//!
//! Filters stack: a thread started by another inherits its filter, and the strictest answer
//! of all its filters wins. Device workers are wanted when the guest activates a device, on a
//! vCPU thread, but they are started by the spawner ([`crate::threads::spawn_worker`]), whose
//! filter allows what the workers need and creating threads; each worker then narrows itself
//! further. So a vCPU can create neither threads nor processes, and the spawner only threads:
//! `clone` only with `CLONE_THREAD` in its flags, and `clone3` (whose flags sit in memory, out
//! of a filter's sight) answers ENOSYS, which makes the C library fall back to `clone`.
//!
//! Opening files is refused on every thread but two: the API thread (the files a client
//! names) and the virtio-fs worker ([`Role::FsWorker`]), which opens what the guest looks up
//! in its shared directory, always relative to a directory fd inside it. Because that worker
//! inherits the spawner's filters, the spawner does not refuse opening itself; each other
//! worker it starts does, as its own filter goes on.
//!
//! `--seccomp enforce` (the default) kills the process on a forbidden call, after saying which
//! one on stderr; `log` lets it through but has the kernel log it (audit); `off` installs nothing.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// What a user can ask for with `--seccomp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Mode {
    /// End lguest, with a line naming the call, on any call a thread's filter doesn't allow.
    Enforce,
    /// Let it through and have the kernel log it (audit).
    Log,
    /// Install no filters.
    Off,
}

/// The kinds of thread that get a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Vcpu,
    DeviceWorker,
    /// Starts device workers for the vCPUs ([`crate::threads::start_spawner`]).
    Spawner,
    VsockWorker,
    /// A disk's worker on the io_uring engine: a device worker that may enter its ring.
    UringWorker,
    /// The virtio-fs worker: the one that opens files, relative to its shared directory.
    FsWorker,
    /// The worker of a multi-queue network card's first queue pair and its control queue: a
    /// device worker that may attach and detach its tap's queues (`ioctl(TUNSETQUEUE)` only).
    NetControl,
    StdinPump,
    SignalWatcher,
    /// The API server (`--api-sock`): client connections, and the files a client names
    /// (metrics, logs, a kernel to check), as Firecracker's own VMM thread opens them.
    Api,
}

static MODE: OnceLock<Mode> = OnceLock::new();

thread_local! {
    /// This thread's role, for the SIGSYS report (a const-initialised Cell: safe to read from
    /// a signal handler).
    static ROLE_NAME: std::cell::Cell<&'static [u8; 7]> = const { std::cell::Cell::new(b"main   ") };
}

impl Role {
    /// Seven bytes, padded, for the async-signal-safe report.
    fn label(self) -> &'static [u8; 7] {
        match self {
            Role::Vcpu => b"vcpu   ",
            Role::DeviceWorker => b"device ",
            Role::Spawner => b"spawner",
            Role::VsockWorker => b"vsock  ",
            Role::UringWorker => b"uring  ",
            Role::FsWorker => b"fs     ",
            Role::NetControl => b"net-ctl",
            Role::StdinPump => b"stdin  ",
            Role::SignalWatcher => b"signals",
            Role::Api => b"api    ",
        }
    }
}

/// Sets the mode for the whole process; called once by `main` before any thread starts.
pub fn set_mode(mode: Mode) {
    let _ = MODE.set(mode);
    if mode == Mode::Enforce {
        install_sigsys_reporter();
    }
}

/// Installs `role`'s filter on the calling thread. Without a [`set_mode`] (unit tests of other
/// modules) nothing is installed.
pub fn confine(role: Role) -> std::io::Result<()> {
    let action = match MODE.get() {
        Some(Mode::Enforce) => SeccompAction::Trap,
        Some(Mode::Log) => SeccompAction::Log,
        Some(Mode::Off) | None => return Ok(()),
    };
    apply(role, action)
}

/// Builds `role`'s filter with `mismatch` as the action for any other call, and installs it
/// (for the spawner, after the filter that turns `clone3` away; for all but the API thread,
/// after the one that refuses opening files).
pub(crate) fn apply(role: Role, mismatch: SeccompAction) -> std::io::Result<()> {
    if role == Role::Spawner {
        install(&no_clone3()?)?;
    }
    // The API thread opens the files a client names (a drive's new image), and the fs worker
    // those the guest looks up in its shared directory; nothing else may. The spawner opens
    // none either, but the fs worker inherits its filters, so each other worker refuses
    // opening for itself.
    if !matches!(role, Role::Api | Role::FsWorker | Role::Spawner) {
        install(&no_open()?)?;
    }
    let program = filter(role, mismatch)?;
    ROLE_NAME.with(|name| name.set(role.label()));
    install(&program)
}

/// Installs `role`'s filter on the calling thread with `mismatch` for other calls, for a
/// module's tests to run its real work under its thread's real filter.
#[cfg(test)]
pub(crate) fn apply_for_test(role: Role, mismatch: SeccompAction) {
    apply(role, mismatch).expect("the filter installs");
}

fn install(program: &BpfProgram) -> std::io::Result<()> {
    seccompiler::apply_filter(program).map_err(|e| std::io::Error::other(format!("cannot install the seccomp filter: {e}")))
}

fn filter(role: Role, mismatch: SeccompAction) -> std::io::Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed(role).iter().map(|&call| (call, Vec::new())).collect();
    if role == Role::Spawner {
        rules.insert(libc::SYS_clone, vec![threads_only()?]);
    }
    if matches!(role, Role::VsockWorker | Role::Spawner) {
        rules.insert(libc::SYS_socket, vec![unix_sockets_only()?]);
    }
    if matches!(role, Role::NetControl | Role::Spawner) {
        rules.insert(libc::SYS_ioctl, vec![tun_set_queue_only()?]);
    }
    compile(rules, mismatch, SeccompAction::Allow)
}

/// `clone` whose flags include `CLONE_THREAD`: a thread of this process, never a new process.
fn threads_only() -> std::io::Result<SeccompRule> {
    let thread = libc::CLONE_THREAD as u64;
    let condition = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(thread), thread)
        .map_err(|e| invalid_filter(&e))?;
    SeccompRule::new(vec![condition]).map_err(|e| invalid_filter(&e))
}

/// `socket(AF_UNIX, ...)`: vsock's worker reaches host programs, never the network.
fn unix_sockets_only() -> std::io::Result<SeccompRule> {
    let condition = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::AF_UNIX as u64)
        .map_err(|e| invalid_filter(&e))?;
    SeccompRule::new(vec![condition]).map_err(|e| invalid_filter(&e))
}

/// `ioctl(fd, TUNSETQUEUE, ...)`: a network card's control queue attaches and detaches its
/// tap's queues, and reaches no other ioctl.
fn tun_set_queue_only() -> std::io::Result<SeccompRule> {
    let condition = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::TUNSETQUEUE)
        .map_err(|e| invalid_filter(&e))?;
    SeccompRule::new(vec![condition]).map_err(|e| invalid_filter(&e))
}

/// A filter that only answers `clone3` with ENOSYS. Stacked under a role's filter, which
/// allows `clone3`, the ENOSYS wins (the kernel takes the strictest answer of all filters).
fn no_clone3() -> std::io::Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32))
}

/// A filter that answers every attempt to open a file with EACCES. glibc opens files on its
/// own from any thread: freeing memory can make malloc read /proc/sys/vm/overcommit_memory
/// (seen in the lab, on the vsock worker, mid-transfer). A refusal it takes in its stride; a
/// trap would end lguest. So the roles' filters allow `open`/`openat`, and this one, stacked
/// under each, makes them fail: no thread opens a file, and none dies trying.
fn no_open() -> std::io::Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_open, Vec::new()), (libc::SYS_openat, Vec::new())]);
    compile(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EACCES as u32))
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch: SeccompAction, matched: SeccompAction) -> std::io::Result<BpfProgram> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(|e| invalid_filter(&e))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| invalid_filter(&e))
}

fn invalid_filter(e: &dyn std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("bad seccomp filter: {e}"))
}

/// Every thread: memory for the allocator, locks, logging to stderr, sleeping, and dying.
const COMMON: &[i64] = &[
    // Answered with EACCES by `no_open`: glibc's own opens fail instead of ending lguest.
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_futex,
    libc::SYS_write,
    libc::SYS_close,
    // Checked on every fd a thread drops, in debug builds (std's I/O-safety assertion).
    libc::SYS_fcntl,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// A device worker: its kick eventfds and epoll set, its backend (an image file, a tap, our
/// stdout), and getrandom for the entropy device.
const DEVICE_WORKER: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_getrandom,
    // A rate limiter arms its timerfd when a queue is over its budget.
    libc::SYS_timerfd_settime,
];

/// The vsock device's worker, on top of [`DEVICE_WORKER`]: host programs' connections to its
/// Unix socket, and its own to theirs (no files are opened: `socket` takes no path).
/// (std reads and writes a socket with `recv` and `send`, that is `recvfrom` and `sendto`.)
const VSOCK_WORKER: &[i64] =
    &[libc::SYS_accept4, libc::SYS_socket, libc::SYS_connect, libc::SYS_recvfrom, libc::SYS_sendto, libc::SYS_shutdown];

/// A disk's worker on the io_uring engine, on top of [`DEVICE_WORKER`]: submitting to and
/// waiting on its ring. The ring was set up (and restricted to a disk's operations) on the
/// main thread, so neither `io_uring_setup` nor `io_uring_register` is needed here.
const URING_WORKER: &[i64] = &[libc::SYS_io_uring_enter];
/// The virtio-fs worker, on top of [`DEVICE_WORKER`]: fuse-backend-rs's passthrough file
/// system. It opens by name relative to a directory fd (`openat`, `O_NOFOLLOW`), reopens
/// through /proc/self/fd, and makes, renames, links and removes entries, all with `*at` calls
/// relative to fds inside the share. No `open_by_handle_at` (file handles are off), no
/// credential changes (every request runs as lguest's user), no sockets, no exec.
const FS_WORKER: &[i64] = &[
    libc::SYS_openat,
    // Only beneath the share's root, for hard links (virtio::fs::beneath).
    libc::SYS_openat2,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_lseek,
    libc::SYS_getdents64,
    libc::SYS_readlinkat,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchownat,
    libc::SYS_ftruncate,
    libc::SYS_utimensat,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    // Around each create, mkdir and mknod, so that the guest's own umask alone applies.
    libc::SYS_umask,
];

/// A vCPU: KVM_RUN and the ioctls of MSI-X routing and fault reports, eventfd reads of queue
/// resets, and a device's activation (its kick and stop eventfds, its worker's epoll set; the
/// thread itself comes from the spawner).
const VCPU: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_read,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_eventfd2,
    libc::SYS_tgkill,
];

/// The spawner: creating threads (`clone` is narrowed to threads in [`filter`]), what a new
/// thread does to itself as it starts, and the worker's own, narrower filter on top.
const SPAWNER: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_seccomp,
];

/// The stdin pump: reading the terminal or pipe, and waiting for the guest to drain the UART.
const STDIN_PUMP: &[i64] = &[libc::SYS_read, libc::SYS_poll, libc::SYS_ppoll];

/// The signal watcher: waiting for signals, and restoring the terminal if the VM is killed.
const SIGNAL_WATCHER: &[i64] = &[libc::SYS_rt_sigtimedwait, libc::SYS_ioctl, libc::SYS_tgkill];

/// The API thread: its epoll loop and connections, opening the files a client names (checking
/// a kernel or disk image, a metrics or log file), kicking vCPUs to pause them. No socket of
/// its own making, no exec, no KVM.
const API: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    // A new image for a drive (PATCH /drives): opened, locked, measured and probed as the
    // first one was when the VM was built (hole punching, and reads and writes of its first
    // sector with RWF_NOWAIT).
    libc::SYS_flock,
    libc::SYS_lseek,
    libc::SYS_fallocate,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    // PATCH /vm Resumed restarts the device workers that a pause stopped: each worker's stop
    // eventfd and epoll set are made here (the thread itself comes from the spawner).
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
];

fn allowed(role: Role) -> Vec<i64> {
    let own: &[&[i64]] = match role {
        Role::Vcpu => &[VCPU],
        Role::DeviceWorker => &[DEVICE_WORKER],
        // Every worker starts with the spawner's filter: it holds what each of them needs.
        Role::Spawner => &[SPAWNER, DEVICE_WORKER, VSOCK_WORKER, URING_WORKER, FS_WORKER],
        Role::VsockWorker => &[DEVICE_WORKER, VSOCK_WORKER],
        Role::UringWorker => &[DEVICE_WORKER, URING_WORKER],
        Role::FsWorker => &[DEVICE_WORKER, FS_WORKER],
        Role::NetControl => &[DEVICE_WORKER],
        Role::StdinPump => &[STDIN_PUMP],
        Role::SignalWatcher => &[SIGNAL_WATCHER],
        Role::Api => &[API],
    };
    let mut calls: Vec<i64> = COMMON.iter().chain(own.iter().flat_map(|set| set.iter())).copied().collect();
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// With `enforce`, a forbidden call raises SIGSYS; this handler names the call before the
/// process ends, so a missing entry in a list above is a one-line bug report, not a mystery.
fn install_sigsys_reporter() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set a
    // handler that only calls async-signal-safe functions (write, _exit).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

/// Offset of `si_syscall` in a SIGSYS siginfo on x86_64 (after signo, errno, code, padding
/// and the 8-byte call address).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; si_syscall is an int at a fixed
    // offset in it on x86_64.
    let number = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() };
    let mut message =
        *b"lguest: seccomp refused system call       on a ....... thread; this is a bug in lguest (--seccomp log lets it run)\n";
    write_decimal(&mut message[36..41], number);
    message[47..54].copy_from_slice(ROLE_NAME.with(|name| name.get()));
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(libc::STDERR_FILENO, message.as_ptr().cast(), message.len());
        libc::_exit(1);
    }
}

/// Right-aligns `value` (at most five digits) in `out`, without allocating.
fn write_decimal(out: &mut [u8], value: i32) {
    let mut value = value.clamp(0, 99_999) as u32;
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Installs `role`'s filter on a fresh thread, failing other calls with EPERM instead of
    /// killing the test process, and reports whether `call` was allowed.
    fn allowed_on_thread(role: Role, call: impl FnOnce() -> i64 + Send + 'static) -> bool {
        std::thread::spawn(move || {
            apply(role, SeccompAction::Errno(libc::EPERM as u32)).expect("filter installs");
            let result = call();
            !(result < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
        })
        .join()
        .expect("thread")
    }

    /// Whether `call` fails on a thread with `role`'s filter (with any error).
    fn fails_on_thread(role: Role, call: impl FnOnce() -> i64 + Send + 'static) -> bool {
        std::thread::spawn(move || {
            apply(role, SeccompAction::Errno(libc::EPERM as u32)).expect("filter installs");
            call() < 0
        })
        .join()
        .expect("thread")
    }

    #[test]
    fn opening_a_file_fails_with_eacces_on_every_role_and_kills_nothing() {
        for role in [Role::Vcpu, Role::DeviceWorker, Role::VsockWorker, Role::UringWorker, Role::StdinPump, Role::SignalWatcher] {
            let errno = std::thread::spawn(move || {
                // Trap, as `--seccomp enforce` does: a trapped open would kill the test process.
                apply(role, SeccompAction::Trap).expect("filter installs");
                // SAFETY: a NUL-terminated path; no fd is returned to close.
                let fd = unsafe { libc::open(c"/proc/sys/vm/overcommit_memory".as_ptr(), libc::O_RDONLY) };
                (fd < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten()
            })
            .join()
            .expect("thread");
            assert_eq!(errno, Some(libc::EACCES), "{role:?}");
        }
    }

    fn open_a_file() -> i64 {
        // SAFETY: a NUL-terminated path; the fd, if any, is closed at once.
        let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: we own the fd we just opened.
            unsafe { libc::close(fd) };
        }
        i64::from(fd)
    }

    /// `open_by_handle_at` with a forged handle: it opens by inode number, past any
    /// directory (the passthrough's file handles are off; the filter refuses it anyway).
    fn open_by_a_file_handle() -> i64 {
        let mut handle = [0u8; 16];
        handle[..4].copy_from_slice(&8u32.to_le_bytes()); // handle_bytes
        // SAFETY: a valid `struct file_handle` of 8 payload bytes; a returned fd is closed at once.
        let fd = unsafe { libc::syscall(libc::SYS_open_by_handle_at, libc::AT_FDCWD, handle.as_mut_ptr(), libc::O_RDONLY) };
        if fd >= 0 {
            // SAFETY: we own the fd we just opened.
            unsafe { libc::close(fd as i32) };
        }
        fd
    }

    fn make_a_socket() -> i64 {
        // SAFETY: socket takes integers; a returned fd is closed at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: we own the fd we just made.
            unsafe { libc::close(fd) };
        }
        i64::from(fd)
    }

    fn make_a_unix_socket() -> i64 {
        // SAFETY: socket takes integers; a returned fd is closed at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: we own the fd we just made.
            unsafe { libc::close(fd) };
        }
        i64::from(fd)
    }

    fn enter_a_ring() -> i64 {
        // SAFETY: io_uring_enter on fd -1 touches no memory; it fails with EBADF when allowed.
        unsafe { libc::syscall(libc::SYS_io_uring_enter, -1, 0, 0, 0, 0usize, 0usize) }
    }

    #[test]
    fn only_an_io_uring_disk_worker_may_enter_a_ring() {
        assert!(allowed_on_thread(Role::UringWorker, enter_a_ring));
        assert!(allowed_on_thread(Role::Spawner, enter_a_ring), "workers started by the spawner inherit its filter");
        for role in [Role::DeviceWorker, Role::VsockWorker, Role::Vcpu] {
            assert!(!allowed_on_thread(role, enter_a_ring), "{role:?}");
        }
    }

    /// PATCH /drives on the API thread: the new image is opened, locked, measured and probed
    /// (hole punching, RWF_NOWAIT transfers) under the API's filter. Trap, as `enforce` does: a
    /// call missing from the list would end the test process.
    #[test]
    fn the_api_thread_can_put_a_new_image_in_a_drive() {
        use crate::config::DiskConfig;
        use crate::virtio::{BackendUpdate, VirtioDevice};
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, second) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&first, [1u8; 4096]).expect("first image");
        std::fs::write(&second, [2u8; 8192]).expect("second image");
        let mut block = crate::virtio::block::Block::new(&DiskConfig::new(&first)).expect("disk");
        let changed = std::thread::spawn(move || {
            apply(Role::Api, SeccompAction::Trap).expect("filter installs");
            block.update_backend(BackendUpdate::Medium(DiskConfig::new(second))).map_err(|e| e.to_string())
        })
        .join()
        .expect("thread");
        assert_eq!(changed, Ok(()));
    }

    /// An ioctl on fd 0 with `request`: only the filter's answer (EPERM) matters, not the fd's.
    fn ioctl_on_stdin(request: libc::c_ulong) -> i64 {
        let mut request_arg = [0u8; 64];
        // SAFETY: the argument points at a buffer of ours larger than any ifreq; the fd's own
        // answer (ENOTTY, EBADFD, ...) is all the kernel can do with it.
        i64::from(unsafe { libc::ioctl(0, request, request_arg.as_mut_ptr()) })
    }

    #[test]
    fn the_net_control_worker_may_set_tap_queues_and_no_other_ioctl() {
        assert!(allowed_on_thread(Role::NetControl, || ioctl_on_stdin(libc::TUNSETQUEUE as _)));
        assert!(allowed_on_thread(Role::Spawner, || ioctl_on_stdin(libc::TUNSETQUEUE as _)), "workers started by the spawner inherit its filter");
        assert!(!allowed_on_thread(Role::NetControl, || ioctl_on_stdin(libc::TUNSETIFF as _)));
        assert!(!allowed_on_thread(Role::DeviceWorker, || ioctl_on_stdin(libc::TUNSETQUEUE as _)));
    }

    #[test]
    fn the_vsock_worker_may_make_unix_sockets_only() {
        assert!(allowed_on_thread(Role::VsockWorker, make_a_unix_socket));
        assert!(allowed_on_thread(Role::Spawner, make_a_unix_socket), "workers started by the spawner inherit its filter");
        assert!(!allowed_on_thread(Role::DeviceWorker, make_a_unix_socket));
    }

    /// The muxer's whole life under the vsock worker's filter (other calls fail with EPERM,
    /// which the muxer turns into refused connections): a guest connection to a host program,
    /// data both ways, its end; a host program's CONNECT. Every call the worker makes, made.
    #[test]
    fn the_vsock_muxer_works_under_its_workers_filter() {
        use crate::virtio::vsock::muxer::Muxer;
        use crate::virtio::vsock::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
        use std::io::{Read, Write};
        use std::os::unix::net::{UnixListener, UnixStream};

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.sock");
        let mut muxer = Muxer::new(3, &path).expect("muxer");
        let listener = UnixListener::bind(dir.path().join("v.sock_52")).expect("host program");
        let (to_host, host_turn) = std::sync::mpsc::channel::<()>();
        let (to_worker, worker_turn) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            apply(Role::VsockWorker, SeccompAction::Errno(libc::EPERM as u32)).expect("filter installs");
            let header = |op: Op, len: u32, flags: u32| Header {
                src_cid: 3, dst_cid: HOST_CID, src_port: 1000, dst_port: 52, len, kind: TYPE_STREAM,
                op: op as u16, flags, buf_alloc: 1 << 20, ..Header::default()
            };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            let _ = muxer.from_guest(&header(Op::Request, 0, 0), b"");
            seen.extend(muxer.next_for_guest(&mut buf).map(|(h, _)| h.op));
            let _ = muxer.from_guest(&header(Op::Rw, 4, 0), b"ping");
            let _ = to_host.send(());
            let _ = worker_turn.recv();
            for _ in 0..100 {
                muxer.process_host_events();
                while let Some((h, len)) = muxer.next_for_guest(&mut buf) {
                    seen.push(h.op);
                    if h.op == Op::Rw as u16 {
                        seen.extend(buf[..len].iter().map(|&b| u16::from(b)));
                    }
                }
                if seen.contains(&(Op::Request as u16)) && seen.contains(&(Op::Shutdown as u16)) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = muxer.from_guest(&header(Op::Shutdown, 0, SHUTDOWN_RCV | SHUTDOWN_SEND), b"");
            seen.extend(muxer.next_for_guest(&mut buf).map(|(h, _)| h.op));
            seen
        });
        host_turn.recv().expect("the worker's turn ended");
        let (mut host, _) = listener.accept().expect("the guest's connection");
        let mut ping = [0u8; 4];
        host.read_exact(&mut ping).expect("ping");
        host.write_all(b"po").expect("pong");
        drop(host);
        let mut program = UnixStream::connect(&path).expect("connect");
        program.write_all(b"CONNECT 7\n").expect("CONNECT");
        to_worker.send(()).expect("the worker's turn");
        let seen = worker.join().expect("worker");
        assert_eq!(&ping, b"ping");
        let (rw, shutdown, request, rst) = (Op::Rw as u16, Op::Shutdown as u16, Op::Request as u16, Op::Rst as u16);
        assert_eq!(seen[..4], [Op::Response as u16, rw, u16::from(b'p'), u16::from(b'o')], "{seen:?}");
        assert!(seen.contains(&shutdown) && seen.contains(&request), "{seen:?}");
        assert_eq!(seen.last(), Some(&rst), "{seen:?}");
    }

    fn get_random() -> i64 {
        let mut buf = [0u8; 8];
        // SAFETY: the kernel writes at most 8 bytes into our buffer.
        unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) as i64 }
    }

    #[test]
    fn every_role_refuses_opening_files_and_sockets() {
        for role in [Role::Vcpu, Role::DeviceWorker, Role::VsockWorker, Role::UringWorker, Role::StdinPump, Role::SignalWatcher] {
            assert!(fails_on_thread(role, open_a_file), "{role:?} may open files");
            assert!(!allowed_on_thread(role, make_a_socket), "{role:?} may make sockets");
        }
        assert!(!allowed_on_thread(Role::Api, make_a_socket), "the API thread may make sockets");
    }

    #[test]
    fn only_the_fs_worker_opens_files_and_it_makes_no_sockets() {
        assert!(allowed_on_thread(Role::FsWorker, open_a_file));
        assert!(!allowed_on_thread(Role::FsWorker, open_by_a_file_handle), "file handles reach past any directory");
        assert!(!allowed_on_thread(Role::FsWorker, make_a_socket));
        assert!(!allowed_on_thread(Role::FsWorker, make_a_unix_socket));
        // The spawner lets opens through for the fs worker it starts; every other worker it
        // starts refuses them for itself.
        let opened_by_a_device_worker = std::thread::spawn(|| {
            apply(Role::Spawner, SeccompAction::Errno(libc::EPERM as u32)).expect("spawner filter");
            std::thread::spawn(|| {
                apply(Role::DeviceWorker, SeccompAction::Errno(libc::EPERM as u32)).expect("worker filter");
                open_a_file() >= 0
            })
            .join()
            .expect("worker thread")
        })
        .join()
        .expect("spawner thread");
        assert!(!opened_by_a_device_worker);
    }

    #[test]
    fn roles_keep_what_they_need() {
        assert!(allowed_on_thread(Role::DeviceWorker, get_random));
        assert!(allowed_on_thread(Role::Spawner, get_random), "workers started by the spawner inherit its filter");
        assert!(!allowed_on_thread(Role::Vcpu, get_random), "a vCPU does no device work");
        assert!(!allowed_on_thread(Role::StdinPump, get_random));
    }

    #[test]
    fn a_worker_started_by_a_confined_spawner_can_confine_itself() {
        let worker_confined = std::thread::spawn(|| {
            apply(Role::Spawner, SeccompAction::Errno(libc::EPERM as u32)).expect("spawner filter");
            std::thread::spawn(|| apply(Role::DeviceWorker, SeccompAction::Errno(libc::EPERM as u32)).is_ok())
                .join()
                .expect("worker thread")
        })
        .join()
        .expect("spawner thread");
        assert!(worker_confined);
    }

    /// What `fork` returns on a thread with `role`'s filter; a child that does get made exits
    /// at once.
    fn fork_on_thread(role: Role) -> bool {
        allowed_on_thread(role, || {
            // SAFETY: the child, if any, only calls _exit, which is async-signal-safe.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: ends the child at once, running nothing of the parent's.
                unsafe { libc::_exit(0) };
            }
            if pid > 0 {
                // SAFETY: reaps the child we made; a null status pointer is allowed.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            }
            i64::from(pid)
        })
    }

    /// Whether a thread with `role`'s filter can start a thread.
    fn thread_on_thread(role: Role) -> bool {
        std::thread::spawn(move || {
            apply(role, SeccompAction::Errno(libc::EPERM as u32)).expect("filter installs");
            std::thread::Builder::new().spawn(|| 7).ok().and_then(|thread| thread.join().ok()) == Some(7)
        })
        .join()
        .expect("thread")
    }

    #[test]
    fn the_spawner_can_start_threads_but_not_processes() {
        assert!(!fork_on_thread(Role::Spawner), "the spawner forked a process");
        assert!(thread_on_thread(Role::Spawner), "the spawner could not start a worker thread");
    }

    #[test]
    fn a_vcpu_can_start_neither_threads_nor_processes() {
        assert!(!fork_on_thread(Role::Vcpu), "a vCPU thread forked a process");
        assert!(!thread_on_thread(Role::Vcpu), "a vCPU thread started a thread");
    }

    #[test]
    fn clone3_answers_enosys_on_the_spawner() {
        let errno = std::thread::spawn(|| {
            apply(Role::Spawner, SeccompAction::Errno(libc::EPERM as u32)).expect("spawner filter");
            // SAFETY: clone3 with a null argument would fail with EFAULT if it ran at all.
            let result = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
            (result < 0).then(|| std::io::Error::last_os_error().raw_os_error()).flatten()
        })
        .join()
        .expect("spawner thread");
        assert_eq!(errno, Some(libc::ENOSYS));
    }

    #[test]
    fn the_sigsys_message_names_the_call() {
        let mut digits = *b"     ";
        write_decimal(&mut digits, 41);
        assert_eq!(&digits, b"   41");
        write_decimal(&mut digits, 123_456);
        assert_eq!(&digits, b"99999");
    }
}
