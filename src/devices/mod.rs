//! The devices a guest can reach. Each serves a range on the port I/O or MMIO [`crate::bus`],
//! and trusts nothing the guest writes: offsets, sizes and values are all checked or ignored.
//!
//! - [`serial`]: the 8250 UART at COM1, the guest's console.
//! - [`i8042`]: the keyboard controller and keyboard: its reset line, and the Ctrl-Alt-Del we
//!   press to ask the guest to shut down.
//! - [`power`]: the ACPI sleep/reset register a hardware-reduced ACPI guest powers off with.
//! - [`pvpanic`]: the port a panicking guest kernel writes, so a crash ends us with status 3.
//! - [`boot_timer`]: an MMIO byte a guest writes to say "booted", for `--boot-timeline`.
pub mod boot_timer;
pub mod i8042;
pub mod power;
pub mod pvpanic;
pub mod serial;
