# shellcheck shell=sh
# The fs row's command under virtme-ng: bench/scenarios/fs.sh runs
#   vng --run KERNEL --rwdir /fsbench=SHARE -- sh /bench/fs-vng-guest.sh ENTRIES MD5
# so this runs as root in vng's guest, whose root is the lab's / (read-only, over virtio-fs)
# and where /fsbench is the row's shared directory (vng's --rwdir, served by virtiofsd).
# It copies the tree's tar from the lab's /bench into a tmpfs first (under lguest and QEMU
# the tar is in the guest's initramfs, in RAM: untar must not time reading it over the
# root's share), then runs the same phases as they do (bench/fs/phases.sh).
mount -t tmpfs -o size=64m fsbench-ram /fsbench-ram &&
    cp /bench/tree.tar /fsbench-ram/tree.tar || { echo "BENCH-ERROR cannot copy the tree's tar into a tmpfs"; exit 1; }
sh /bench/fs-phases.sh /fsbench /fsbench-ram/tree.tar "$1" "$2"
