# Inside the lab: the guest brings up every vCPU it is given (MADT entries, INIT/SIPI through
# the in-kernel LAPIC) and reports how many it sees.
for cpus in 2 4; do
    timeout 180 lguest run --cpus $cpus --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz \
        --memory 256M --cmdline "console=ttyS0 panic=-1 quiet lguest.scenario=cpus" </dev/null
    echo "CASE cpus-$cpus status=$?"
done
