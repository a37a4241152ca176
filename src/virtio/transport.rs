//! The virtio 1.x PCI transport (being written).
