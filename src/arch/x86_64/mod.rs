//! x86-64: how a kernel is put into memory ([`boot`]), the tables it reads at start-up
//! ([`acpi`]), and the register state it wakes up in ([`cpu`]).
pub mod acpi;
pub mod boot;
pub mod cpu;
