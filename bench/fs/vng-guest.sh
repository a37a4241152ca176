# shellcheck shell=sh
# The fs row's command under virtme-ng: bench/scenarios/fs.sh runs
#   vng --run KERNEL --rwdir /fsbench=SHARE -- sh /bench/fs-vng-guest.sh ENTRIES MD5
# so this runs as root in vng's guest, whose root is the lab's / (read-only, over virtio-fs)
# and where /fsbench is the row's shared directory (vng's --rwdir, served by virtiofsd).
# Under lguest and QEMU the tar, busybox and the phases' script are in the guest's
# initramfs, in RAM, which dropping the page cache leaves alone: so here they are copied
# into a tmpfs first, or each phase would also time reading them again over the root's
# share. Then the same phases run (bench/fs/phases.sh).
ram=/fsbench-ram
mount -t tmpfs -o size=64m fsbench-ram $ram && mkdir $ram/bin && cp /bin/busybox $ram/bin/ &&
    $ram/bin/busybox --install -s $ram/bin && cp /bench/tree.tar /bench/fs-phases.sh $ram/ ||
    { echo "BENCH-ERROR cannot copy the tree's tar, busybox and the phases into a tmpfs"; exit 1; }
PATH=$ram/bin exec $ram/bin/sh $ram/fs-phases.sh /fsbench $ram/tree.tar "$1" "$2"
