//! The API's HTTP server: a Unix socket, one thread, hyper on a single-threaded tokio runtime.
//!
//! Why hyper: it is the best-kept HTTP implementation in Rust, and HTTP parsing is exactly what
//! we must not write ourselves. Firecracker's own `micro_http` is not published on crates.io
//! (the crate of that name is an unrelated async server), and `tiny_http` gives every
//! connection a thread of its own (with a default 2 MiB stack), so a client that opens
//! connections and never sends grows lguest by threads. With hyper, connections are tasks on
//! one thread: a client that never sends costs a few KiB until its header timeout, and
//! several at once are served side by side. The runtime is built only with `rt`, `net` and
//! `time`: no worker pool, no extra threads. Measured numbers are in the README.
//!
//! The socket is bound (mode 0600) by the main thread before anything else runs
//! ([`bind`]); a live socket already at the path is an error, a stale one (nobody listening,
//! left by a killed process) is replaced. The path is removed again when the
//! [`SocketFile`] is dropped, at the process's end.
//!
//! Limits, so that no client can take the API or the guest down: a body is at most
//! `--http-api-max-payload-size` bytes (Firecracker's 51200 by default), headers must arrive
//! within [`HEADER_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections are open at once
//! (more are closed at once). Every request is answered; an error is a 400 with a
//! `fault_message`, as Firecracker answers.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::instance::{Instance, Reply};
use super::types::Fault;
use super::{request, ApiError};
use crate::bus::lock;
use crate::seccomp::{self, Role};

/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; Firecracker's clients use one.
pub const MAX_CONNECTIONS: usize = 32;
/// How often metrics are written without a `FlushMetrics`.
const METRICS_INTERVAL: Duration = Duration::from_secs(60);

/// Why the API's socket can't be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another process is serving an API on '{}': stop it or choose another --api-sock", path.display())]
    Live { path: PathBuf },
    #[error("'{}' exists and is not a socket: choose another --api-sock", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot serve the API on '{}': {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
}

/// The socket's path, removed when dropped.
pub struct SocketFile {
    path: PathBuf,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the API's socket at `path`, mode 0600.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    remove_stale(path)?;
    // The mode is set by the umask at bind time, so the socket is never reachable by others,
    // not even for an instant; called before the API thread exists, and no other thread of
    // ours creates files.
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| SocketError::Bind { path: path.into(), source })?;
    Ok((listener, SocketFile { path: path.into() }))
}

/// A socket nobody listens on is left by a process that died: it goes. A live one, or a file
/// that is not a socket, stays and is an error.
fn remove_stale(path: &Path) -> Result<(), SocketError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else { return Ok(()) };
    if !meta.file_type().is_socket() {
        return Err(SocketError::NotASocket { path: path.into() });
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(SocketError::Live { path: path.into() }),
        Err(_) => std::fs::remove_file(path).map_err(|source| SocketError::Bind { path: path.into(), source }),
    }
}

/// Serves the API on its own thread until the process ends.
pub fn spawn(listener: UnixListener, instance: Arc<Mutex<Instance>>, max_payload: usize) -> Result<JoinHandle<()>, SocketError> {
    listener.set_nonblocking(true).map_err(SocketError::Thread)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(SocketError::Thread)?;
    crate::threads::spawn("api", move || {
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::from_std(listener)
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(e) => return tracing::error!("the API socket can't be served: {e}"),
        };
        if let Err(e) = seccomp::confine(Role::Api) {
            return tracing::error!("the API is not served: {e}");
        }
        runtime.block_on(serve(listener, instance, max_payload));
    })
    .map_err(SocketError::Thread)
}

async fn serve(listener: tokio::net::UnixListener, instance: Arc<Mutex<Instance>>, max_payload: usize) {
    tokio::spawn(flush_metrics_every_minute(instance.clone()));
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of fds, most likely: wait a little rather than spin.
                tracing::warn!("the API could not accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::warn!("the API has {MAX_CONNECTIONS} connections open: closed a new one");
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (instance, open) = (instance.clone(), open.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, instance.clone(), max_payload));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                tracing::debug!("an API connection ended: {e}");
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn flush_metrics_every_minute(instance: Arc<Mutex<Instance>>) {
    let mut ticks = tokio::time::interval(METRICS_INTERVAL);
    ticks.tick().await; // the first tick is immediate
    loop {
        ticks.tick().await;
        let mut instance = lock(&instance);
        if instance.metrics.is_open() {
            if let Err(e) = instance.flush_metrics() {
                tracing::warn!("{e}");
            }
        }
    }
}

/// One request, one answer.
async fn answer(request: hyper::Request<Incoming>, instance: Arc<Mutex<Instance>>, max_payload: usize) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let body = match Limited::new(request.into_body(), max_payload).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(respond(Err(ApiError::TooBig { limit: max_payload }))),
    };
    let result = request::parse(&method, &path, &body).and_then(|parsed| lock(&instance).handle(parsed));
    if let Err(error) = &result {
        tracing::info!("API {method} {path}: {error}");
    }
    Ok(respond(result))
}

fn respond(result: Result<Reply, ApiError>) -> Response<Full<Bytes>> {
    let (status, body) = match result {
        Ok(Reply::NoContent) => (StatusCode::NO_CONTENT, None),
        Ok(Reply::Json(value)) => (StatusCode::OK, Some(value.to_string())),
        Err(error) => {
            let fault = Fault { fault_message: error.to_string() };
            (StatusCode::BAD_REQUEST, Some(serde_json::to_string(&fault).unwrap_or_else(|_| "{}".into())))
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body.unwrap_or_default())));
    *response.status_mut() = status;
    // On a 204 too: the spec says the API produces application/json, and checkers hold every
    // answer to it.
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_socket_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let (live, file) = bind(&path).expect("bind");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(bind(&path), Err(SocketError::Live { .. })));
        drop(live);
        std::mem::forget(file); // the path stays, as a killed process leaves it
        let (_listener, _file) = bind(&path).expect("a stale socket is replaced");
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "data").expect("write");
        assert!(matches!(bind(&plain), Err(SocketError::NotASocket { .. })));
        assert_eq!(std::fs::read_to_string(&plain).ok().as_deref(), Some("data"), "a user's file is never removed");
    }

    #[test]
    fn the_socket_goes_with_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("api.sock");
        let (_listener, file) = bind(&path).expect("bind");
        drop(file);
        assert!(!path.exists());
    }

    #[test]
    fn errors_are_400_with_a_fault_message() {
        let response = respond(Err(ApiError::EmptyBody));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers().get(CONTENT_TYPE).map(|v| v.as_bytes()), Some(&b"application/json"[..]));
        assert_eq!(respond(Ok(Reply::NoContent)).status(), StatusCode::NO_CONTENT);
    }
}
