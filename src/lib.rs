//! lguest: a small, fast, readable hypervisor launcher for KVM.
//!
//! The modules below are laid out in the order a guest lives through them; `docs/journey.md`
//! walks the same path function by function:
//!
//! 1. [`config`]: what the user asked for, validated once, with errors a user can act on.
//! 2. [`memory`]: the guest-physical map (RAM, the hole below 4 GiB, the e820 table).
//! 3. [`arch::x86_64`]: putting a kernel into that memory (bzImage or PVH vmlinux), the tables it
//!    reads (boot_params, start_info, ACPI) and the register state it wakes up in.
//! 4. [`vm`]: the KVM VM itself: memory slots, the in-kernel irqchip and PIT, the devices, the
//!    vCPU threads, the wait for the guest to stop, and the teardown; [`session`] runs it again
//!    when a guest reboots with `--reboot restart`.
//! 5. [`vcpu`]: the world switch (`KVM_RUN`) and one handler per exit reason.
//! 6. [`bus`] and [`devices`]: where port I/O and MMIO exits land; absent devices read as ones.
//! 7. [`pci`] and [`virtio`]: the PCI bus a stock kernel finds its devices on, the virtio
//!    transport, and the devices (console, disk, network, entropy) serving their queues on
//!    threads of their own; [`passt`] is the user-mode network (`--net user`) at the other end
//!    of a network card.
//! 8. [`terminal`]: the user's terminal and signals, wired to the guest's serial port or
//!    virtio console.
//! 9. [`fault`]: what we say when a guest dies, so that only the guest dies.
//! 10. [`stop`]: how a VM ends: whoever learns first that the guest is done records why, and
//!     the main thread turns it into our exit status.
//! 11. [`timeline`]: when each of the above happened, for `--boot-timeline`.
//! 12. [`seccomp`]: the system calls each of the threads above may make; [`threads`]: how
//!     they are started.
//! 13. [`error`]: what stops us before a guest runs, each a line that says what to change,
//!     and [`docs`]: the completions and man pages generated from the command line.
//! 14. [`api`] and [`firecracker`]: Firecracker's REST API and command line, for the programs
//!     that drive microVMs: a plan of the machine before the start, the same `VmConfig` at
//!     it, and [`control`] (pause, resume, Ctrl-Alt-Del, a new drive image) while it runs.
//! 15. [`snapshot`]: a paused guest saved to a file and its memory, and restored from them in
//!     another process (`lguest restore`, `PUT /snapshot/load`).
//! 16. [`exec`]: `lguest exec -- CMD`, one command in a throwaway guest over this host's files,
//!     whose init is lguest itself ([`exec::guest`]).

pub mod api;
pub mod arch;
pub mod bus;
pub mod config;
pub mod control;
pub mod devices;
pub mod docs;
pub mod error;
pub mod exec;
pub mod fault;
pub mod firecracker;
pub mod memory;
pub mod passt;
pub mod pci;
pub mod rate_limiter;
pub mod seccomp;
pub mod session;
pub mod snapshot;
pub mod stop;
pub mod terminal;
pub mod threads;
pub mod timeline;
pub mod vcpu;
pub mod virtio;
pub mod vm;
