//! Speaking to a running `lguest`'s API: one call with curl, as Firecracker's guide does, and
//! the `lguest` process itself, its output collected as it comes.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{lguest, text, wait_with_deadline};

/// One call: the status and the body.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-s", "--max-time", "30", "-X", method, "--unix-socket"]).arg(socket);
    command.args(["-w", "\n%{http_code}", "-H", "Content-Type: application/json"]);
    if body.is_some() {
        command.args(["--data-binary", "@-"]);
    }
    command.arg(format!("http://localhost{path}")).stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut curl = command.spawn().expect("run curl");
    if let (Some(body), Some(mut stdin)) = (body, curl.stdin.take()) {
        use std::io::Write;
        // A server that refuses a huge body may close before reading it all.
        let _ = stdin.write_all(body.as_bytes());
    }
    let out = curl.wait_with_output().expect("curl");
    let text = text(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

pub fn wait_for(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running lguest whose stdout is collected as it comes.
pub struct Running {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Running {
    pub fn start(args: &[&str]) -> Running {
        let mut child = lguest()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lguest");
        let collect = |mut pipe: Box<dyn Read + Send>| {
            let buffer = Arc::new(Mutex::new(Vec::new()));
            let sink = buffer.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    sink.lock().expect("buffer").extend_from_slice(&chunk[..n]);
                }
            });
            buffer
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
        Running { child, stdout, stderr }
    }

    pub fn output(&self) -> String {
        text(&self.stdout.lock().expect("stdout"))
    }

    pub fn errors(&self) -> String {
        text(&self.stderr.lock().expect("stderr"))
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("status");
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).expect("a number")
    }

    pub fn wait(&mut self, limit: Duration) -> i32 {
        wait_with_deadline(&mut self.child, limit).code().unwrap_or(-1)
    }

    pub fn terminate(&mut self) -> i32 {
        // SAFETY: kill sends a signal to our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(30))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for_socket(socket: &Path, process: &Running) {
    wait_for("the API socket", Duration::from_secs(20), || UnixStream::connect(socket).is_ok() || !process.errors().is_empty());
}
