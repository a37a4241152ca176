//! MSI-X: how a PCI device interrupts the guest without sharing a line.
//!
//! The guest writes each vector's message (an address and a data word, which say which CPU and
//! which IDT vector) into a table in one of the device's BARs. We hand each message to KVM as an
//! MSI route for a GSI of the vector's own, and give that GSI an irqfd: a device's worker then
//! interrupts the guest with a plain eventfd write, and KVM injects the message without any
//! exit or ioctl. Masking is ours to honour: a masked vector's interrupt is remembered in the
//! pending bit and delivered when the guest unmasks it.
//!
//! The table's contents come from the guest. A message KVM rejects only breaks that vector.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;

/// "No vector": what a driver writes to leave a queue or the config space without interrupts.
pub const NO_VECTOR: u16 = 0xffff;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

/// The part of MSI-X that device workers touch: one eventfd per vector, and its mask and
/// pending bits. Lock-free, so a worker never waits for a vCPU writing the table.
pub struct MsixVectors {
    vectors: Vec<Vector>,
    function_masked: AtomicBool,
}

struct Vector {
    irq: EventFd,
    masked: AtomicBool,
    pending: AtomicBool,
}

impl MsixVectors {
    /// `count` vectors, masked as at reset. Eventfds are non-blocking; creating one fails only
    /// when the process is out of file descriptors.
    pub fn new(count: usize) -> std::io::Result<MsixVectors> {
        let vectors = (0..count)
            .map(|_| Ok(Vector { irq: EventFd::new(libc::EFD_NONBLOCK)?, masked: AtomicBool::new(true), pending: AtomicBool::new(false) }))
            .collect::<std::io::Result<_>>()?;
        Ok(MsixVectors { vectors, function_masked: AtomicBool::new(false) })
    }

    /// Vectors that fire at once, for testing devices without a guest driver.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn unmasked(count: usize) -> std::io::Result<MsixVectors> {
        let vectors = MsixVectors::new(count)?;
        for vector in &vectors.vectors {
            vector.masked.store(false, Ordering::SeqCst);
        }
        Ok(vectors)
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Interrupts the guest through `vector`, or marks it pending while masked.
    pub fn trigger(&self, vector: u16) {
        let Some(v) = self.vectors.get(usize::from(vector)) else { return };
        if !self.is_masked(v) {
            return fire(v);
        }
        v.pending.store(true, Ordering::SeqCst);
        // The guest may have unmasked between our check and the store: deliver it ourselves.
        if !self.is_masked(v) && v.pending.swap(false, Ordering::SeqCst) {
            fire(v);
        }
    }

    fn is_masked(&self, v: &Vector) -> bool {
        v.masked.load(Ordering::SeqCst) || self.function_masked.load(Ordering::SeqCst)
    }

    fn set_masked(&self, vector: usize, masked: bool) {
        if let Some(v) = self.vectors.get(vector) {
            v.masked.store(masked, Ordering::SeqCst);
            self.deliver_pending(v);
        }
    }

    fn set_function_masked(&self, masked: bool) {
        self.function_masked.store(masked, Ordering::SeqCst);
        for v in &self.vectors {
            self.deliver_pending(v);
        }
    }

    fn deliver_pending(&self, v: &Vector) {
        if !self.is_masked(v) && v.pending.swap(false, Ordering::SeqCst) {
            fire(v);
        }
    }

    fn is_pending(&self, vector: usize) -> bool {
        self.vectors.get(vector).is_some_and(|v| v.pending.load(Ordering::SeqCst))
    }

    /// The eventfd behind `vector` (KVM's irqfd for it, in a VM).
    pub fn eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irq)
    }

    /// Reads and clears a vector's eventfd count: how often it fired with no irqfd attached.
    pub fn take_count(&self, vector: u16) -> u64 {
        self.vectors.get(usize::from(vector)).and_then(|v| v.irq.read().ok()).unwrap_or(0)
    }
}

fn fire(v: &Vector) {
    // A full eventfd counter (2^64 - 2 unread interrupts) is the only failure, and then the
    // guest has an interrupt coming anyway.
    let _ = v.irq.write(1);
}

/// The guest-visible MSI-X table and PBA of one device, and the routes they turn into.
pub struct MsixTable {
    entries: Vec<[u32; 4]>,
    vectors: Arc<MsixVectors>,
    gsis: Vec<u32>,
    routes: Arc<MsiRoutes>,
}

impl MsixTable {
    /// A table for `vectors`, whose eventfds are wired to GSIs taken from `routes`.
    pub fn new(vectors: Arc<MsixVectors>, routes: Arc<MsiRoutes>) -> Result<MsixTable, kvm_ioctls::Error> {
        let mut gsis = Vec::with_capacity(vectors.len());
        for v in &vectors.vectors {
            gsis.push(routes.attach(&v.irq)?);
        }
        let entries = vec![[0, 0, 0, VECTOR_MASKED]; vectors.len()];
        Ok(MsixTable { entries, vectors, gsis, routes })
    }

    pub fn vectors(&self) -> &Arc<MsixVectors> {
        &self.vectors
    }

    /// The table as the guest wrote it: address low, address high, data, vector control.
    pub fn entries(&self) -> &[[u32; 4]] {
        &self.entries
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the pending-bit array occupies: one bit per vector, in 64-bit words.
    pub fn pba_len(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    /// The function-wide mask bit from the capability's message control word.
    pub fn set_function_masked(&mut self, masked: bool) {
        self.vectors.set_function_masked(masked);
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((entry, word)) = self.locate(offset, data.len()) else { return };
        let value = self.entries[entry][word];
        copy_out(value, offset, data);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((entry, word)) = self.locate(offset, data.len()) else { return };
        let old = self.entries[entry];
        let value = copy_in(old[word], offset, data);
        self.entries[entry][word] = value;
        let masked = self.entries[entry][3] & VECTOR_MASKED != 0;
        if word < 3 || (old[3] & VECTOR_MASKED != 0 && !masked) {
            self.update_route(entry);
        }
        if word == 3 {
            self.vectors.set_masked(entry, masked);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, byte) in data.iter_mut().enumerate() {
            // Bytes past the last vector read as zero, however far past: no index may wrap.
            let first_vector = offset.checked_add(i as u64).and_then(|b| b.checked_mul(8));
            let Some(first_vector) = first_vector.and_then(|v| usize::try_from(v).ok()) else { continue };
            for bit in 0..8 {
                if self.vectors.is_pending(first_vector.saturating_add(bit)) {
                    *byte |= 1 << bit;
                }
            }
        }
    }

    /// Which entry and 32-bit word an access falls in; accesses must be 4 or 8 bytes, aligned.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let aligned = matches!(len, 4 | 8) && offset.is_multiple_of(len as u64);
        let entry = usize::try_from(offset / ENTRY_SIZE).ok()?;
        (aligned && entry < self.entries.len()).then_some((entry, (offset % ENTRY_SIZE / 4) as usize))
    }

    fn update_route(&mut self, entry: usize) {
        let [lo, hi, data, _] = self.entries[entry];
        if let Err(e) = self.routes.set(self.gsis[entry], lo, hi, data) {
            tracing::warn!(vector = entry, "KVM refused an MSI-X message from the guest: {e}");
        }
    }
}

/// Accesses are at most 8 bytes; an 8-byte one spans two words, and only its first word is
/// kept (Linux writes the table 4 bytes at a time).
fn copy_out(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let start = (offset % 4) as usize;
    let n = data.len().min(4 - start);
    data[..n].copy_from_slice(&bytes[start..start + n]);
}

fn copy_in(old: u32, offset: u64, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    let start = (offset % 4) as usize;
    let n = data.len().min(4 - start);
    bytes[start..start + n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// The VM's interrupt routing table: the irqchip pins KVM sets up by default, plus one MSI
/// route per MSI-X vector. KVM only takes the table whole, so we keep the whole of it.
pub struct MsiRoutes {
    vm: Option<Arc<VmFd>>,
    table: Mutex<RoutingTable>,
}

struct RoutingTable {
    msi: Vec<(u32, [u32; 3])>,
    next_gsi: u32,
}

/// GSIs 0–23 are the IOAPIC's pins; ours start after them.
const FIRST_MSI_GSI: u32 = 24;
const IOAPIC_PINS: u32 = 24;

impl MsiRoutes {
    pub fn new(vm: Arc<VmFd>) -> MsiRoutes {
        MsiRoutes { vm: Some(vm), table: Mutex::new(RoutingTable { msi: Vec::new(), next_gsi: FIRST_MSI_GSI }) }
    }

    /// Routes that go nowhere, for tests of the table without KVM.
    pub fn detached() -> MsiRoutes {
        MsiRoutes { vm: None, table: Mutex::new(RoutingTable { msi: Vec::new(), next_gsi: FIRST_MSI_GSI }) }
    }

    /// Takes a fresh GSI for `irq` and attaches the eventfd to it with an irqfd.
    fn attach(&self, irq: &EventFd) -> Result<u32, kvm_ioctls::Error> {
        let mut table = lock(&self.table);
        let gsi = table.next_gsi;
        table.next_gsi += 1;
        table.msi.push((gsi, [0, 0, 0]));
        if let Some(vm) = &self.vm {
            vm.set_gsi_routing(&build_routing(&table.msi)?)?;
            vm.register_irqfd(irq, gsi)?;
        }
        Ok(gsi)
    }

    fn set(&self, gsi: u32, address_lo: u32, address_hi: u32, data: u32) -> Result<(), kvm_ioctls::Error> {
        let mut table = lock(&self.table);
        let Some(route) = table.msi.iter_mut().find(|(g, _)| *g == gsi) else { return Ok(()) };
        if route.1 == [address_lo, address_hi, data] {
            return Ok(());
        }
        route.1 = [address_lo, address_hi, data];
        match &self.vm {
            Some(vm) => vm.set_gsi_routing(&build_routing(&table.msi)?),
            None => Ok(()),
        }
    }
}

fn build_routing(msi: &[(u32, [u32; 3])]) -> Result<KvmIrqRouting, kvm_ioctls::Error> {
    let mut entries = Vec::with_capacity(IOAPIC_PINS as usize + 16 + msi.len());
    for pin in 0..IOAPIC_PINS {
        entries.push(irqchip_route(pin, KVM_IRQCHIP_IOAPIC, pin));
        if pin < 16 && pin != 2 {
            let chip = if pin < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            entries.push(irqchip_route(pin, chip, pin % 8));
        }
    }
    for &(gsi, [address_lo, address_hi, data]) in msi {
        let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
        entry.u.msi.address_lo = address_lo;
        entry.u.msi.address_hi = address_hi;
        entry.u.msi.data = data;
        entries.push(entry);
    }
    KvmIrqRouting::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
}

fn irqchip_route(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(count: usize) -> MsixTable {
        let vectors = Arc::new(MsixVectors::new(count).expect("eventfds"));
        MsixTable::new(vectors, Arc::new(MsiRoutes::detached())).expect("table")
    }

    fn write32(table: &mut MsixTable, offset: u64, value: u32) {
        table.write_table(offset, &value.to_le_bytes());
    }

    #[test]
    fn vectors_start_masked_and_remember_interrupts_until_unmasked() {
        let mut t = table(2);
        t.vectors().trigger(1);
        assert_eq!(t.vectors().take_count(1), 0);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        write32(&mut t, ENTRY_SIZE + 12, 0);
        assert_eq!(t.vectors().take_count(1), 1, "pending interrupt delivered on unmask");
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        t.vectors().trigger(1);
        assert_eq!(t.vectors().take_count(1), 1);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let mut t = table(2);
        write32(&mut t, 12, 0);
        t.set_function_masked(true);
        t.vectors().trigger(0);
        assert_eq!(t.vectors().take_count(0), 0);
        t.set_function_masked(false);
        assert_eq!(t.vectors().take_count(0), 1);
    }

    #[test]
    fn entries_read_back_and_odd_accesses_are_ignored() {
        let mut t = table(1);
        write32(&mut t, 0, 0xfee0_0000);
        write32(&mut t, 8, 0x4041);
        let mut word = [0u8; 4];
        t.read_table(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0xfee0_0000);
        t.read_table(12, &mut word);
        assert_eq!(u32::from_le_bytes(word), VECTOR_MASKED);
        t.write_table(2, &[1, 2, 3, 4]); // misaligned
        t.write_table(16, &[1, 2, 3, 4]); // past the table
        t.write_table(0, &[1]); // too small
        t.read_table(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0xfee0_0000);
        let mut far = [0xffu8; 4];
        t.read_table(u64::MAX - 3, &mut far);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn vectors_out_of_range_do_nothing() {
        let t = table(1);
        t.vectors().trigger(NO_VECTOR);
        t.vectors().trigger(1);
        assert_eq!(t.vectors().take_count(0), 0);
    }

    #[test]
    fn routing_keeps_the_irqchip_pins_and_adds_each_msi() {
        let routing = build_routing(&[(24, [0xfee0_0000, 0, 0x41])]).expect("routing");
        let entries = routing.as_slice();
        assert_eq!(entries.len(), 24 + 15 + 1);
        let msi = entries.last().expect("msi entry");
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: reading the union member this entry's type says was written.
        assert_eq!(unsafe { msi.u.msi.data }, 0x41);
    }
}
