//! The PCI bus (placeholder while the root lands).
pub mod msix;
