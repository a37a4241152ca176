//! The fs device's tests: a real shared directory under a temporary folder.
