//! Well-formed requests: reads, writes, flushes, IDs, discards, the counters and the
//! interrupts a batch gets, on both engines.

use super::*;

fn a_read_returns_the_files_bytes() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let (status, len, data) = bench.read(2, 3);
    assert_eq!((status, len), (S_OK, 3 * 512 + 1));
    assert_eq!(data, file_bytes(&file)[2 * 512..5 * 512]);
}

fn a_read_scattered_over_many_descriptors_and_an_indirect_table() {
    let file = image();
    let expected = file_bytes(&file)[512..3 * 512].to_vec();
    let mut bench = Bench::new(disk(&file, false));
    let parts = [Part::Out(header(VIRTIO_BLK_T_IN, 1)), Part::In(100), Part::In(412), Part::In(512), Part::In(1)];
    let ((status, len), addrs) = bench.run(&parts);
    assert_eq!((status, len), (S_OK, 1025));
    let got = [bench.driver.bytes(addrs[1], 100), bench.driver.bytes(addrs[2], 412), bench.driver.bytes(addrs[3], 512)].concat();
    assert_eq!(got, expected);

    let addrs = bench.driver.submit_indirect(&[Part::Out(header(VIRTIO_BLK_T_IN, 1)), Part::In(1024), Part::In(1)]);
    assert_eq!(bench.serve_last(&addrs), (S_OK, 1025));
    assert_eq!(bench.driver.bytes(addrs[1], 1024), expected);
}

fn any_layout_split_header_and_status_sharing_the_data_buffer() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let head = header(VIRTIO_BLK_T_IN, 4);
    let ((_, len), addrs) = bench.run(&[Part::Out(head[..5].to_vec()), Part::Out(head[5..].to_vec()), Part::In(513)]);
    assert_eq!((bench.driver.byte(addrs[2] + 512), len), (S_OK, 513), "the status is the last byte");
    assert_eq!(bench.driver.bytes(addrs[2], 512), file_bytes(&file)[4 * 512..5 * 512]);
}

fn a_write_reaches_the_file() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let data: Vec<u8> = (0..1024).map(|i| (i % 13) as u8 + 100).collect();
    let ((status, len), _) = bench.run(&[
        Part::Out(header(VIRTIO_BLK_T_OUT, 3)),
        Part::Out(data[..300].to_vec()),
        Part::Out(data[300..].to_vec()),
        Part::In(1),
    ]);
    assert_eq!((status, len), (S_OK, 1));
    let mut expected = pattern(SECTORS as usize * 512);
    expected[3 * 512..5 * 512].copy_from_slice(&data);
    assert_eq!(file_bytes(&file), expected);
}

fn flush_succeeds() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    assert_eq!(bench.write(0, vec![1; 512]), (S_OK, 1));
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(file_bytes(&file)[..512], [1; 512]);
}

fn a_read_only_disk_refuses_every_change_and_leaves_the_file_alone() {
    let file = image();
    let block = Block::new(&config(&file, true)).expect("read-only disk");
    assert_ne!(block.features() & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(block.features() & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)), 0);
    let mut bench = Bench::new(lock(&block.medium).clone());
    assert_eq!(bench.write(0, vec![1; 512]), (S_IOERR, 1));
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, 0)), S_IOERR);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(0, 1, 0)), S_IOERR);
    assert_eq!(bench.read(0, 1).0, S_OK, "reads still work");
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(file_bytes(&file), pattern(SECTORS as usize * 512));
}

fn get_id_returns_the_configured_serial_zero_padded() {
    let file = image();
    let disk = Disk::open(&DiskConfig { id: Some("data-disk".into()), ..config(&file, false) }).expect("disk");
    let mut bench = Bench::new(Arc::new(disk));
    let ((status, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(20), Part::In(1)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut expected = b"data-disk".to_vec();
    expected.resize(20, 0);
    assert_eq!(bench.driver.bytes(addrs[1], 20), expected);

    let ((status, len), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(4), Part::In(1)]);
    assert_eq!((status, len), (S_OK, 5), "a smaller buffer gets what fits");
    assert_eq!(bench.driver.bytes(addrs[1], 4), b"data");
}

fn without_a_configured_serial_the_id_is_the_file_name() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    let ((status, _), addrs) = bench.run(&[Part::Out(header(VIRTIO_BLK_T_GET_ID, 0)), Part::In(20), Part::In(1)]);
    assert_eq!(status, S_OK);
    let name = file.path().file_name().expect("name").as_encoded_bytes();
    let mut expected = name[..name.len().min(20)].to_vec();
    expected.resize(20, 0);
    assert_eq!(bench.driver.bytes(addrs[1], 20), expected);
}

fn a_batch_gets_one_interrupt_and_event_idx_is_honoured() {
    let file = image();
    let mut bench = Bench::with(disk(&file, false), true);
    let mut statuses = Vec::new();
    for sector in 0..3 {
        statuses.push(*bench.driver.submit(&[Part::Out(header(VIRTIO_BLK_T_IN, sector)), Part::In(512), Part::In(1)]).last().expect("status"));
    }
    bench.serve();
    assert_eq!(bench.driver.used_idx(), 3);
    assert!(statuses.iter().all(|&s| bench.driver.byte(s) == S_OK));
    assert_eq!(bench.signals.take_queue_interrupts(0), 1, "three requests, one interrupt");
    assert_eq!(bench.driver.avail_event(), 3, "the driver is asked to kick for the next request");

    // The driver wants an interrupt only once the used index passes 10.
    bench.driver.set_used_event(10);
    bench.run(&[Part::Out(header(VIRTIO_BLK_T_FLUSH, 0)), Part::In(1)]);
    assert_eq!(bench.signals.take_queue_interrupts(0), 0);
}

fn without_event_idx_every_pass_interrupts() {
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    bench.read(0, 1);
    bench.read(1, 1);
    assert_eq!(bench.signals.take_queue_interrupts(0), 2);
}

fn discard_and_write_zeroes_when_the_file_system_can() {
    let file = image();
    let disk = disk(&file, false);
    let block_features = features(&disk, 1);
    let mut bench = Bench::new(Arc::clone(&disk));
    if !disk.can_punch_holes {
        assert_eq!(block_features & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)), 0);
        assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, 0)), S_UNSUPP);
        return;
    }
    assert_ne!(block_features & bit(VIRTIO_BLK_F_DISCARD), 0);
    let mut expected = pattern(SECTORS as usize * 512);
    let two_ranges = [range(1, 2, 0), range(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)].concat();
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, two_ranges), S_OK);
    expected[512..3 * 512].fill(0);
    expected[8 * 512..9 * 512].fill(0);
    assert_eq!(file_bytes(&file), expected);
    assert_eq!(bench.read(1, 2).2, vec![0; 1024]);

    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(4, 2, 0)), S_OK);
    expected[4 * 512..6 * 512].fill(0);
    assert_eq!(file_bytes(&file), expected, "a punched hole reads as zeros; the size is kept");

    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, range(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), S_UNSUPP);
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, range(0, 1, 4)), S_UNSUPP, "reserved flag");
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, vec![]), S_IOERR, "no range");
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, vec![0; 20]), S_IOERR, "a partial range");
    let too_many = (0..=MAX_DISCARD_SEGMENTS).flat_map(|_| range(0, 1, 0)).collect();
    assert_eq!(bench.simple(VIRTIO_BLK_T_DISCARD, too_many), S_IOERR);
    // One bad range spoils the request before anything is changed.
    let one_bad = [range(0, 1, 0), range(SECTORS, 1, 0)].concat();
    assert_eq!(bench.simple(VIRTIO_BLK_T_WRITE_ZEROES, one_bad), S_IOERR);
    assert_eq!(file_bytes(&file), expected);
}

#[test]
fn the_counters_see_reads_writes_flushes_and_bad_requests() {
    let file = image();
    let live = DiskHandle::default();
    let mut bench = Bench::limited(disk(&file, false), false, live.clone());
    assert_eq!(bench.read(0, 2).0, S_OK);
    assert_eq!(bench.write(4, vec![7; 512]).0, S_OK);
    assert_eq!(bench.simple(VIRTIO_BLK_T_FLUSH, vec![]), S_OK);
    assert_eq!(bench.read(1 << 40, 1).0, S_IOERR, "past the end");
    let taken: std::collections::HashMap<_, _> = live.metrics.take().into_iter().collect();
    assert_eq!((taken["read_count"], taken["read_bytes"]), (1, 1024), "the refused read is not counted as one");
    assert_eq!((taken["write_count"], taken["write_bytes"], taken["flush_count"]), (1, 512, 1));
    assert_eq!((taken["invalid_reqs_count"], taken["execute_fails"]), (1, 0));
}

// Every test here that serves requests runs on both engines.
on_both_engines!(
    a_read_returns_the_files_bytes,
    a_read_scattered_over_many_descriptors_and_an_indirect_table,
    any_layout_split_header_and_status_sharing_the_data_buffer,
    a_write_reaches_the_file,
    flush_succeeds,
    a_read_only_disk_refuses_every_change_and_leaves_the_file_alone,
    get_id_returns_the_configured_serial_zero_padded,
    without_a_configured_serial_the_id_is_the_file_name,
    a_batch_gets_one_interrupt_and_event_idx_is_honoured,
    without_event_idx_every_pass_interrupts,
    discard_and_write_zeroes_when_the_file_system_can,
    a_read_marks_its_buffers_pages_dirty_and_a_write_does_not,
);

/// The engines' preadv and io_uring reads fill guest memory behind vm-memory's back: the
/// buffers are marked dirty for a Diff snapshot; a write's buffers, only read, are not.
fn a_read_marks_its_buffers_pages_dirty_and_a_write_does_not() {
    use crate::snapshot::dirty::take_marked_pages;
    let file = image();
    let mut bench = Bench::new(disk(&file, false));
    // The data's first page is the header's (which is only read), so only the data marks it.
    let data_page = |addrs: &[u64]| addrs[1] / 4096;
    for (kind, data, marked) in [(VIRTIO_BLK_T_IN, Part::In(8 * 512), true), (VIRTIO_BLK_T_OUT, Part::Out(vec![1; 8 * 512]), false)] {
        let addrs = bench.driver.submit(&[Part::Out(header(kind, 0)), data, Part::In(1)]);
        take_marked_pages(&bench.driver.mem); // the driver's own writes
        assert_eq!(bench.serve_last(&addrs).0, S_OK);
        let pages = take_marked_pages(&bench.driver.mem);
        assert_eq!(pages.contains(&data_page(&addrs)), marked, "request {kind}: pages {pages:x?} marked, data at {:#x}", addrs[1]);
    }
}
