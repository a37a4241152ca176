//! The `lguest exec` guest's init: lguest's own binary, run by the guest kernel as PID 1 from
//! the initramfs [`super::initramfs`] built. `main` comes here first when it is PID 1 and the
//! request file is there, before the command line is looked at.
//!
//! Its life: mount /dev, /proc and /sys; read and check the request; load the kernel
//! modules; mount the host's `/` (virtio-fs, read-only) under a tmpfs overlay as the new
//! root, with fresh /proc, /sys, /dev, /tmp inside and the shared directories on top;
//! connect the vsock streams to lguest; switch into the new root; run CMD as the caller
//! (groups, gid, uid, working directory, environment), its stdio being the streams (or a
//! pty, [`super::guest_tty`]); reap every process until CMD ends; report how it ended; and
//! wait for lguest to stop the VM (powering off itself if lguest never does).
//!
//! It trusts the request only after [`Request::decode`] has checked it. Anything that fails
//! is one line on the console (which lguest prints when CMD never ran) and, once the control
//! stream is up, a `failed` report.

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::control::{HostMessage, LineReader, Report};
use super::request::{Request, MODULES_DIR, PORT_CONTROL, PORT_STDERR, PORT_STDIN, PORT_STDOUT, PORT_TTY, REQUEST_PATH};

/// The host's vsock context ID.
const HOST_CID: u32 = 2;
/// How long the init tries to reach lguest (the vsock device appears with its module).
const CONNECT_TRIES: u32 = 200;
/// finit_module's flag for a .ko.xz or .ko.zst the kernel decompresses itself.
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// Why the init could not run CMD.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{what}: {source}")]
    Sys { what: String, source: io::Error },
    #[error(transparent)]
    Request(#[from] super::request::BadRequest),
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

/// True in the guest: we are PID 1 and the request is where lguest exec put it.
pub fn is_guest_init() -> bool {
    std::process::id() == 1 && Path::new(REQUEST_PATH).exists()
}

/// The init's whole life; never returns.
pub fn main() -> ! {
    let mut control: Option<std::fs::File> = None;
    if let Err(error) = run(&mut control) {
        eprintln!("lguest exec init: {error}");
        if let Some(stream) = control.as_mut() {
            let _ = stream.write_all(Report::Failed(1, error.to_string()).to_line().as_bytes());
        }
    }
    wait_to_be_stopped(control);
}

fn run(control: &mut Option<std::fs::File>) -> Result<(), InitError> {
    mount("devtmpfs", "/dev", "devtmpfs", 0, None)?;
    mount("proc", "/proc", "proc", 0, None)?;
    mount("sysfs", "/sys", "sysfs", 0, None)?;
    let bytes = std::fs::read(REQUEST_PATH).map_err(sys(format!("cannot read {REQUEST_PATH}")))?;
    let request = Request::decode(&bytes)?;
    load_modules(&request.modules)?;
    mount_root(&request)?;
    super::net::bring_up("lo").map_err(sys("cannot bring the loopback interface up"))?;
    if let Some(setup) = request.net {
        super::net::configure("eth0", setup).map_err(sys("cannot configure eth0 for --net user"))?;
    }
    let stream = connect(PORT_CONTROL)?;
    let control = control.insert(std::fs::File::from(stream));
    let stdio = match request.tty {
        Some(_) => Stdio3::Tty(connect(PORT_TTY)?),
        None => Stdio3::Pipes([connect(PORT_STDIN)?, connect(PORT_STDOUT)?, connect(PORT_STDERR)?]),
    };
    report(control, &Report::Init)?;
    switch_root()?;
    let ending = run_command(&request, stdio, control)?;
    report(control, &ending)
}

fn report(control: &mut std::fs::File, report: &Report) -> Result<(), InitError> {
    control.write_all(report.to_line().as_bytes()).map_err(sys("cannot write to lguest's control stream"))
}

/// CMD's stdio: three streams, or one carrying a terminal.
pub enum Stdio3 {
    Pipes([OwnedFd; 3]),
    Tty(OwnedFd),
}

/// Starts CMD, tells lguest, reaps until CMD ends, and says how it ended. Meanwhile lguest's
/// messages are followed ([`follow_host`]).
fn run_command(request: &Request, stdio: Stdio3, control: &mut std::fs::File) -> Result<Report, InitError> {
    let group = Arc::new(CmdGroup::default());
    match stdio {
        Stdio3::Pipes([stdin, stdout, stderr]) => {
            let keep = [stdout.try_clone(), stderr.try_clone()].map(|fd| fd.ok());
            follow_host(control, None, &group)?;
            let mut command = command_for(request, false);
            command.stdin(Stdio::from(stdin)).stdout(Stdio::from(stdout)).stderr(Stdio::from(stderr));
            let ending = spawn_and_reap(command, control, &group);
            // CMD is gone: what it wrote is queued before this end of file, and lguest waits
            // for both before stopping the VM (children it left behind can't hold it open).
            for fd in keep.iter().flatten() {
                // SAFETY: shutdown on a socket we own; no memory is involved.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
            }
            ending
        }
        Stdio3::Tty(stream) => super::guest_tty::run(request, stream, control, group),
    }
}

/// CMD's process group while CMD runs (0 before and after): where lguest's `kill` lines go.
/// CMD leads a group of its own (a session, with a terminal), so a signal reaches what it
/// started too, as Ctrl-C on a terminal does, and never the init.
#[derive(Default)]
pub(super) struct CmdGroup(AtomicI32);

impl CmdGroup {
    fn kill(&self, signal: libc::c_int) {
        let group = self.0.load(Ordering::SeqCst);
        if group > 1 {
            // SAFETY: kill takes no pointers; a negative pid names the process group.
            unsafe { libc::kill(-group, signal) };
        }
    }
}

/// Starts a thread that follows lguest's messages on the control stream ([`apply_messages`]).
pub(super) fn follow_host(control: &std::fs::File, pty: Option<OwnedFd>, group: &Arc<CmdGroup>) -> Result<(), InitError> {
    let messages = control.try_clone().map_err(sys("cannot share lguest's control stream"))?;
    let group = group.clone();
    std::thread::spawn(move || apply_messages(messages, pty, &group));
    Ok(())
}

/// lguest's messages, until the stream closes: `winsize` resizes CMD's pty (when it has one),
/// `kill` signals CMD's process group. [`HostMessage::parse`] has refused anything else, any
/// signal lguest does not forward included.
fn apply_messages(mut control: std::fs::File, pty: Option<OwnedFd>, group: &CmdGroup) {
    let (mut lines, mut buffer) = (LineReader::default(), [0u8; 256]);
    while let Ok(n @ 1..) = control.read(&mut buffer) {
        for message in lines.feed(&buffer[..n]).iter().filter_map(|line| HostMessage::parse(line)) {
            match (message, &pty) {
                (HostMessage::Resize(size), Some(master)) => super::guest_tty::set_size(master, size),
                (HostMessage::Resize(_), None) => {}
                (HostMessage::Kill(signal), _) => group.kill(signal),
            }
        }
    }
}

/// CMD as the request describes it: its program, arguments and environment; the caller's
/// groups, gid, uid and working directory are taken in the child just before the exec, in
/// that order (the directory after the uid: entered with the caller's rights, not root's).
/// CMD leads a process group of its own: with a terminal, the new session's; else a group
/// made for it.
pub(super) fn command_for(request: &Request, controlling_tty: bool) -> Command {
    let mut command = Command::new(&request.argv[0]);
    command.args(&request.argv[1..]).env_clear().envs(request.env.iter().map(|(k, v)| (k, v)));
    if !controlling_tty {
        command.process_group(0); // setsid below makes the group with a terminal
    }
    let (uid, gid, groups) = (request.uid, request.gid, request.groups.clone());
    let cwd = CString::new(request.cwd.as_bytes()).unwrap_or_default();
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (no allocation, no locks): setsid/ioctl, setgroups, setgid, setuid, chdir.
    unsafe {
        command.pre_exec(move || {
            if controlling_tty {
                check(libc::setsid())?;
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            check(libc::setgid(gid))?;
            check(libc::setuid(uid))?;
            check(libc::chdir(cwd.as_ptr()))?;
            Ok(())
        });
    }
    command
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Spawns CMD (a failure is reported as a shell would: 127 not found, 126 not runnable) and
/// reaps every child until CMD itself ends; `group` names CMD's process group meanwhile.
pub(super) fn spawn_and_reap(mut command: Command, control: &mut std::fs::File, group: &CmdGroup) -> Result<Report, InitError> {
    let spawned = command.spawn();
    let program = command.get_program().to_string_lossy().into_owned();
    drop(command); // our copies of CMD's stdio: its ends must close when it does
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound { 127 } else { 126 };
            return Ok(Report::Failed(code, format!("cannot run '{program}': {e}")));
        }
    };
    let pid = child.id() as libc::pid_t;
    // Set before `started` goes out: lguest forwards signals only after it, so each finds CMD.
    group.0.store(pid, Ordering::SeqCst);
    report(control, &Report::Started)?;
    let ending = reap_until(pid);
    group.0.store(0, Ordering::SeqCst);
    ending
}

/// Reaps every child (orphans are reparented to us) until `pid` ends, and says how it did.
fn reap_until(pid: libc::pid_t) -> Result<Report, InitError> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only `status`.
        let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
        if reaped < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(sys("waiting for CMD")(error));
        }
        if reaped != pid {
            continue; // an orphan that was reparented to us
        }
        if libc::WIFSIGNALED(status) {
            return Ok(Report::Signalled(libc::WTERMSIG(status) as u8));
        }
        return Ok(Report::Exited(libc::WEXITSTATUS(status) as u8));
    }
}

/// Waits for lguest to stop the VM (it does once CMD's output is out); powers off after a
/// while or when lguest has gone, so a lost host never leaves a guest spinning.
fn wait_to_be_stopped(control: Option<std::fs::File>) -> ! {
    if let Some(mut stream) = control {
        let mut sink = [0u8; 64];
        let timeout = libc::timeval { tv_sec: 30, tv_usec: 0 };
        // SAFETY: a socket option of the right size on a socket we own.
        unsafe {
            libc::setsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&timeout as *const libc::timeval).cast(), std::mem::size_of::<libc::timeval>() as u32)
        };
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    }
    // SAFETY: sync and reboot take no pointers; the guest is done.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Loads each module in order; one already loaded (or built in) is fine.
fn load_modules(modules: &[String]) -> Result<(), InitError> {
    for name in modules {
        let path = format!("{MODULES_DIR}/{name}");
        let file = std::fs::File::open(&path).map_err(sys(format!("cannot open the module {path}")))?;
        let compressed = name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz");
        let flags = if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 };
        // SAFETY: finit_module reads the open file and the empty parameter string.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), c"".as_ptr(), flags) };
        let error = io::Error::last_os_error();
        if rc != 0 && error.raw_os_error() != Some(libc::EEXIST) {
            return Err(sys(format!("cannot load the kernel module {name} (is it built for this kernel?)"))(error));
        }
    }
    Ok(())
}

/// The host's `/` read-only under a tmpfs overlay at /newroot, with the system's own
/// filesystems inside, then the shares on top (after /tmp, so a share under /tmp shows).
fn mount_root(request: &Request) -> Result<(), InitError> {
    let (root, shares) = request.mounts.split_first().ok_or(super::request::BadRequest::NoRoot)?;
    mount(&root.tag, "/lower", "virtiofs", libc::MS_RDONLY, None)?;
    mount("tmpfs", "/rw", "tmpfs", 0, Some("mode=0755"))?;
    for dir in ["/rw/upper", "/rw/work"] {
        std::fs::create_dir(dir).map_err(sys(format!("cannot make {dir}")))?;
    }
    mount("overlay", "/newroot", "overlay", 0, Some("lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"))?;
    let system: [(&str, &str, &str, Option<&str>); 6] = [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", None),
        ("devpts", "/dev/pts", "devpts", Some("newinstance,ptmxmode=0666,mode=0620")),
        ("tmpfs", "/dev/shm", "tmpfs", Some("mode=1777")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
    ];
    for (source, path, kind, data) in system {
        mount_at(source, path, kind, 0, data)?;
    }
    for share in shares {
        let flags = if share.readonly { libc::MS_RDONLY } else { 0 };
        mount_at(&share.tag, &share.path, "virtiofs", flags, None)?;
    }
    Ok(())
}

/// Mounts at `path` inside /newroot, making the mount point first if the host has none.
fn mount_at(source: &str, path: &str, kind: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<(), InitError> {
    let target = format!("/newroot{path}");
    std::fs::create_dir_all(&target).map_err(sys(format!("cannot make the mount point {path}")))?;
    mount(source, &target, kind, flags, data)
}

fn mount(source: &str, target: &str, kind: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<(), InitError> {
    let what = || format!("cannot mount {kind} '{source}' on {target}");
    let c = |text: &str| CString::new(text).map_err(|_| InitError::Sys { what: what(), source: io::ErrorKind::InvalidInput.into() });
    let (source_c, target_c, kind_c) = (c(source)?, c(target)?, c(kind)?);
    let data_c = data.map(c).transpose()?;
    let data_ptr = data_c.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(source_c.as_ptr(), target_c.as_ptr(), kind_c.as_ptr(), flags, data_ptr) };
    check(rc).map_err(sys(what()))
}

/// /newroot becomes `/` (as switch_root does: the initramfs can't be pivoted away from).
fn switch_root() -> Result<(), InitError> {
    std::env::set_current_dir("/newroot").map_err(sys("cannot enter /newroot"))?;
    // SAFETY: NUL-terminated constant strings.
    check(unsafe { libc::mount(c".".as_ptr(), c"/".as_ptr(), std::ptr::null(), libc::MS_MOVE, std::ptr::null()) })
        .map_err(sys("cannot move /newroot to /"))?;
    // SAFETY: a NUL-terminated constant string.
    check(unsafe { libc::chroot(c".".as_ptr()) }).map_err(sys("cannot chroot into the new root"))?;
    std::env::set_current_dir("/").map_err(sys("cannot enter the new root"))
}

/// A stream to lguest's vsock port `port`, retried while the vsock device is still coming.
fn connect(port: u32) -> Result<OwnedFd, InitError> {
    let mut last = io::Error::from(io::ErrorKind::NotConnected);
    for _ in 0..CONNECT_TRIES {
        match try_connect(port) {
            Ok(fd) => return Ok(fd),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err(sys(format!("cannot reach lguest on vsock port {port}"))(last))
}

fn try_connect(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd we then own.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; zero is a valid start.
    let mut address: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    address.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    address.svm_cid = HOST_CID;
    address.svm_port = port;
    let length = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `address` is a valid sockaddr_vm of `length` bytes.
    check(unsafe { libc::connect(socket.as_raw_fd(), (&address as *const libc::sockaddr_vm).cast(), length) })?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn kill_lines_reach_cmds_process_group_and_nothing_else_does() {
        // A CMD as the init starts one: leading its own group, with a child of its own.
        let mut cmd = Command::new("sh").args(["-c", "sleep 30 & wait"]).process_group(0).spawn().expect("sh");
        let group = CmdGroup(AtomicI32::new(cmd.id() as i32));
        let (mut host, init) = UnixStream::pair().expect("socket pair");
        host.write_all(b"kill 9\nkill 0\nkill -15\nwinsize 1 2\njunk\n\xff\nkill 15\n").expect("write");
        drop(host);
        apply_messages(std::fs::File::from(OwnedFd::from(init)), None, &group);
        let status = cmd.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGTERM), "only the forwardable signal arrived: {status:?}");
    }
}
