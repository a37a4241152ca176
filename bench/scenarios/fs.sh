# Lab side of bench/run.sh's fs row; bench/run.sh prepends RUNS=N ENTRIES=E MD5=M FS_VMMS=LIST
# (default "lguest qemu vng").
# lguest and QEMU boot Debian's generic kernel (/bench/bzImage-generic: the cloud kernel has no 9p)
# with bench/fs/init (/bench/initrd-fs.img), 512 MiB, 1 vCPU, and one host directory, empty
# at each boot: lguest --share DIR:fsbench (virtio-fs, served in lguest) against QEMU's
# built-in 9p (-fsdev local,security_model=none + virtio-9p-pci; the guest mounts it
# trans=virtio,version=9p2000.L with $NINEP_OPTS, below). The guest times untar, find, read
# and rm -rf of the same ~5 000-file tree, each checked (bench/fs/phases.sh). RUNS boots
# each, alternating; a run whose guest died is noted and retried once. Afterwards the
# directory must be empty again.
# The third VMM, virtme-ng (vng; bench/vng/build.sh put it at /usr), boots the same generic
# kernel (/bench/k-generic, laid out as vng finds a kernel, with its modules), 512 MiB, 1 vCPU,
# over the lab's / as its root, with the same directory shared read-write by `--rwdir` (vng
# serves it with virtiofsd, cache=auto) at the guest's /fsbench, and runs the same phases
# (bench/fs/phases.sh, through bench/fs/vng-guest.sh).
# The directory is on ext4 (an image in the lab's RAM, loop-mounted), as a user's work tree
# would be: the lab's own tmpfs is Linux 6.1's, whose directory offsets are positions, and
# how each VMM copes with that is a correctness matter (src/virtio/fs/listing.rs), not this
# row's.
. /bench/lib.sh
# lguest holds one host fd per file the guest's kernel keeps an inode of, and raises its own
# limit to the hard one: the lab's init leaves the kernel's 4096, under this tree's 5 051
# entries (the untar then fails with EMFILE at ~4 070). Distributions' logins give 524288.
ulimit -n 1048576 || note fs "cannot raise the open-file limit: $(ulimit -Hn)"
KERNEL=/bench/bzImage-generic
share=/tmp/fsbench
mkdir -p $share
truncate -s 256M /tmp/fsbench.img && mkfs.ext4 -q -F /tmp/fsbench.img && mount -o loop /tmp/fsbench.img $share ||
    { note fs "cannot make the ext4 share (mkfs.ext4, loop): $(dmesg | tail -2 | printable)"; exit 1; }
vmms=${FS_VMMS:-lguest qemu vng}
# QEMU 9p's mount options beyond trans=virtio,version=9p2000.L: Linux 6.1's default msize,
# written out, and its default cache=none (README.md's row-11 section has the comparison:
# msize=512000 made the untar 3.2x slower; cache=loose is faster but gives up coherence).
NINEP_OPTS=${NINEP_OPTS:-msize=131072}
mkdir -p /fsbench /fsbench-ram   # vng's guest mounts its share and a tmpfs there
skip=""

# vng_cmd: CMD for virtme-ng's boot (its guest's command's stdout is vng's, the console's
# BENCH lines with it). Its stderr goes to a file of its own: vng's QEMU reopens
# /proc/self/fd/1 and /proc/self/fd/2 for the guest's stdout and stderr ports, each open
# truncating the file and writing from its start, so with one file for both the guest's
# stderr (or QEMU's own) would overwrite the BENCH lines. --verbose sends the guest's console
# there too (without it vng sends it to /dev/null): when a boot dies, the note shows how
# (vng's 255 stands for a panic, a reset, a dead QEMU and a killed script alike). Nothing
# timed is on that console: the phases time themselves inside the guest.
vng_cmd() {
    _k=/bench/k-generic
    CMD="vng --run $_k/boot/vmlinuz-$(ls $_k/lib/modules) --memory 512M --cpus 1 --rwdir /fsbench=$share --verbose"
    CMD="$CMD -- sh /bench/fs-vng-guest.sh $ENTRIES $MD5 2>/tmp/fs-vng.err"
}

# fs_once VMM: one boot, the four phases. Fails (for a retry) only when the guest died.
fs_once() {
    rm -rf $share/* $share/lost+found
    # (A 9p share's mount options ride along on the guest's command line.)
    case $1 in lguest) _fs=virtiofs ;; *) _fs="9p fsbench.9p=$NINEP_OPTS" ;; esac
    if [ "$1" = vng ]; then
        vng_cmd
    else
        vmm_cmd "$1" 512 1 /bench/initrd-fs.img "$CMDLINE fsbench.fs=$_fs fsbench.entries=$ENTRIES fsbench.md5=$MD5" share=$share:fsbench
    fi
    _began=$(date +%s)
    io_boot fs "$1" 900 "cannot mount"
    _status=$?
    # Out of time is not a death: another boot would take as long again (io_boot noted it).
    # (Told by the clock: the lab's busybox timeout returns the VMM's own status, and QEMU
    # exits 0 on its SIGTERM.)
    [ $(($(date +%s) - _began)) -lt 890 ] || _status=0
    if [ "$1" = vng ]; then
        # A vng that ran out of time leaves its QEMU and virtiofsd behind (python alone got the signal).
        killall -9 qemu-system-x86_64 virtiofsd 2>/dev/null
        [ $_status = 0 ] || note fs "vng's stderr and its guest's console: $(tail -c 600 /tmp/fs-vng.err | printable)"
    fi
    [ -z "$(ls -A $share)" ] || note fs "$1: the host's directory is not empty after the guest's rm -rf: $(ls -A $share | head -3 | printable)"
    return $_status
}

alternate fs_once $vmms
drain
