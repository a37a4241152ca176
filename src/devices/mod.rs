//! The devices a guest can reach. Each serves a range on the port I/O or MMIO [`crate::bus`],
//! and trusts nothing the guest writes: offsets, sizes and values are all checked or ignored.
//!
//! - [`serial`]: the 8250 UART at COM1, the guest's console.
//! - [`i8042`]: just enough keyboard controller for the guest to reset the machine through it.
//! - [`power`]: the ACPI sleep/reset register a hardware-reduced ACPI guest powers off with.
//! - [`boot_timer`]: an MMIO byte a guest writes to say "booted", for `--boot-timeline`.
pub mod boot_timer;
pub mod i8042;
pub mod power;
pub mod serial;
