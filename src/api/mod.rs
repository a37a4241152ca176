//! The control plane: Firecracker's REST API on a Unix socket, and its `--config-file`.
//!
//! The microVM world is driven by programs, and most of them speak Firecracker's API (its SDKs,
//! firecracker-containerd, Kata Containers, flintlock). Serving the same API makes lguest a
//! drop-in for them. The contract is Firecracker's OpenAPI spec, `firecracker.yaml`; the
//! contract test (`tests/api_contract.rs`) checks lguest against it with schemathesis.
//!
//! Where it sits in a guest's life: with `lguest firecracker` the process starts with no VM,
//! and the API thread ([`server`]) parses each call ([`request`]) and applies it to the
//! [`Instance`], which keeps a pre-boot [`plan::Plan`] of the machine. `InstanceStart` turns
//! the plan into a [`crate::config::VmConfig`] and hands it to the main thread, which builds
//! and starts the VM exactly as `lguest run` does and hands back the running VM's
//! [`crate::control::VmControls`]: from then on the API pauses, resumes and presses
//! Ctrl-Alt-Del through those. With `lguest run --api-sock`, the VM comes from the command line
//! and the API starts, after the guest, in the running state.
//!
//! What it trusts: nothing in a request. The client is the VM's owner (the socket is 0600), but
//! a buggy or hostile client must not crash lguest or stop the guest: every body is read by
//! serde into the spec's types, every value checked, bodies are bounded in size, connections
//! in number and time, and the API thread has its own seccomp filter.

pub mod instance;
pub mod limits;
pub mod logger;
pub mod metrics;
pub mod plan;
pub mod request;
pub mod server;
pub mod types;

pub use instance::Instance;

/// The Firecracker API version lguest implements, as clients parse it from `--version` and
/// `GET /version`: the spec the contract test runs against (fc-api 0.2.3 ships 1.15.0-dev).
pub const FIRECRACKER_VERSION: &str = "1.15.0";

/// Firecracker's default for `--http-api-max-payload-size`.
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// Why an API call was refused. Rendered as the `fault_message` of a 400 answer.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Invalid request method and/or path: {method} {path}.")]
    NoSuchEndpoint { method: String, path: String },

    #[error("{what} is not implemented by lguest")]
    NotImplemented { what: &'static str },

    #[error("the request needs a JSON body")]
    EmptyBody,

    #[error("the request body is not valid: {0}")]
    BadBody(#[from] serde_json::Error),

    #[error("the request body is larger than the limit of {limit} bytes (--http-api-max-payload-size)")]
    TooBig { limit: usize },

    #[error("invalid {field}: {why}")]
    BadValue { field: &'static str, why: String },

    #[error("in {section}: {source}")]
    InSection { section: &'static str, source: Box<ApiError> },

    #[error("{0}")]
    Config(#[from] crate::error::Error),

    #[error("cannot start the microVM without a boot source (PUT /boot-source first)")]
    NoBootSource,

    #[error("{what} is only possible before the microVM starts")]
    PreBootOnly { what: &'static str },

    #[error("{what} needs a running microVM (PUT /actions InstanceStart first)")]
    NotStarted { what: &'static str },

    #[error("no {what} with id '{id}' (PUT it before the start)")]
    NoSuchDevice { what: &'static str, id: String },

    #[error("the microVM could not be started: {0}")]
    StartFailed(crate::error::Error),

    #[error("the microVM is stopping")]
    Stopping,

    #[error("cannot change the drive's image: {0}")]
    Medium(crate::virtio::UpdateError),

    #[error("{0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),

    #[error("cannot pause the microVM: {0}")]
    Pause(#[from] crate::control::PauseError),

    #[error("the metrics system is not configured (PUT /metrics or --metrics-path first)")]
    NoMetrics,

    #[error("the metrics system is configured already")]
    MetricsAlreadySet,

    #[error("cannot open {what} '{path}': {source}")]
    Open { what: &'static str, path: String, source: std::io::Error },

    #[error("cannot write the metrics: {0}")]
    WriteMetrics(std::io::Error),
}
