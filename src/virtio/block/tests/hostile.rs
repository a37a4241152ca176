//! Hostile requests and rings: each bad chain fails alone (an error status, or handed back
//! untouched) and the next request is served; only a ring that can't be walked stops the queue.

use super::*;

fn sectors_past_the_end_fail_and_the_last_sector_does_not() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.read(SECTORS - 1, 1).0, S_OK);
    assert_eq!(bench.read(SECTORS - 1, 2).0, S_IOERR);
    assert_eq!(bench.read(SECTORS, 1).0, S_IOERR);
    assert_eq!(bench.read(u64::MAX, 1).0, S_IOERR, "sector + length overflows");
    assert_eq!(bench.read(u64::MAX >> 9, 1).0, S_IOERR);
    assert_eq!(bench.write(SECTORS, vec![0; 512]).0, S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(SECTORS - 1, 2, 0)), S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(u64::MAX, 1, 0)), S_IOERR);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn data_that_is_not_whole_sectors_fails() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, len), _) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(100), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(bench.write(0, vec![9; 700]).0, S_IOERR);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn a_short_header_fails() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, len), _) = bench.run(&[Part::Out(vec![0; 8]), Part::In(512), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
}

fn an_unknown_request_type_is_unsupported() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.simple(99, vec![]), S_UNSUPP);
    assert_eq!(bench.simple(2, vec![]), S_UNSUPP, "SCSI commands are legacy only");
}

fn a_chain_without_a_writable_status_byte_is_returned_untouched() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // No writable descriptor at all.
    let ((_, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Out(vec![0xee])]);
    assert_eq!(len, 0);
    assert_eq!(bench.driver.byte(addrs[1]), 0xee);
    // The status in a read-only descriptor after the data: readable after writable.
    let ((_, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::In(512), Part::Out(vec![0xee])]);
    assert_eq!(len, 0);
    assert_eq!(bench.driver.byte(addrs[2]), 0xee);
    assert_eq!(bench.driver.bytes(addrs[1], 512), vec![0xee; 512], "nothing was read");
    // The device keeps serving.
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn buffers_outside_guest_memory_fail_the_request_alone() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let outside = MEM_SIZE + 0x1000;
    let ((status, len), _) =
        bench.run(&[Part::Out(header(VIRTIO_BLK_T_IN, 0)), Part::Raw(outside, 512, NEXT | WRITE), Part::In(1)]);
    assert_eq!((status, len), (S_IOERR, 1));
    // Straddling the end of memory.
    let ((status, _), _) =
        bench.run(&[Part::Out(header(VIRTIO_BLK_T_OUT, 0)), Part::Raw(MEM_SIZE - 256, 512, NEXT), Part::In(1)]);
    assert_eq!(status, S_IOERR);
    let ((status, _), _) = bench.run(&[Part::Raw(u64::MAX - 4, 16, NEXT), Part::In(1)]);
    assert_eq!(status, S_IOERR, "a header at the top of the address space");
    // A status byte outside memory can't be written: the chain comes back with nothing in it.
    let addrs = bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Raw(outside, 1, WRITE)]);
    assert_eq!(bench.serve_last(&addrs[..0]).1, 0);
    let addrs = bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::Raw(u64::MAX, 2, WRITE)]);
    assert_eq!(bench.serve_last(&addrs[..0]).1, 0);
    assert_eq!(bench.read(0, 1).0, S_OK);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn a_looping_chain_is_dropped_and_the_next_request_served() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // Descriptor 1 leads back to descriptor 0.
    let status = bench.driver.alloc(1);
    let head = bench.driver.alloc(16);
    bench.driver.mem.write_slice(&header(VIRTIO_BLK_T_FLUSH, 0), GuestAddress(head)).expect("header");
    bench.driver.write_desc(bench.driver.desc_table, 0, head, 16, NEXT, 1);
    bench.driver.write_desc(bench.driver.desc_table, 1, status, 1, NEXT | WRITE, 0);
    bench.driver.next_desc = 2;
    bench.driver.make_available(0);
    assert_eq!(bench.serve_last(&[]).1, 0);
    // A next index past the table.
    bench.driver.write_desc(bench.driver.desc_table, 2, head, 16, NEXT, QUEUE_SIZE + 5);
    bench.driver.next_desc = 3;
    bench.driver.make_available(2);
    assert_eq!(bench.serve_last(&[]).1, 0);
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn an_over_long_indirect_chain_is_dropped() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let mut parts = vec![Part::Out(header(VIRTIO_BLK_T_IN, 0))];
    parts.extend((0..MAX_DESCRIPTORS).map(|_| Part::In(512)));
    parts.push(Part::In(1));
    let addrs = bench.driver.submit_indirect(&parts);
    assert_eq!(bench.serve_last(&[]).1, 0);
    assert_eq!(bench.driver.byte(addrs[addrs.len() - 1]), 0xee, "no status written");
    assert_eq!(bench.read(0, 1).0, S_OK);
}

fn an_available_index_running_ahead_of_the_ring_breaks_the_queue() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    bench.driver.set_avail_idx(QUEUE_SIZE + 1);
    assert!(bench.queue.serve().is_err());
}

fn an_image_truncated_under_us_gives_io_errors() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    file.as_file().set_len(512).expect("truncate");
    assert_eq!(bench.read(4, 1).0, S_IOERR);
    assert_eq!(bench.read(0, 1).0, S_OK);
}

// Every test here that serves requests runs on both engines.
on_both_engines!(
    sectors_past_the_end_fail_and_the_last_sector_does_not,
    data_that_is_not_whole_sectors_fails,
    a_short_header_fails,
    an_unknown_request_type_is_unsupported,
    a_chain_without_a_writable_status_byte_is_returned_untouched,
    buffers_outside_guest_memory_fail_the_request_alone,
    a_looping_chain_is_dropped_and_the_next_request_served,
    an_over_long_indirect_chain_is_dropped,
    an_available_index_running_ahead_of_the_ring_breaks_the_queue,
    an_image_truncated_under_us_gives_io_errors,
);
