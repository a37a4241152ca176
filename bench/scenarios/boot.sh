# Lab side of bench/boot.sh: boots the reference guest (KERNEL, vmlinux through PVH or the
# bzImage, + busybox initramfs, CPUS vCPUs, 256 MiB) RUNS times with lguest and with QEMU
# microvm, alternating, each timed by stopwatch from process start to the guest's /init
# marker and to the process's exit after the guest's `reboot -f`. bench/boot.sh prepends
# RUNS=N CPUS=N KERNEL=NAME.
kernel=/guest/$KERNEL
initrd=/guest/initramfs.cpio.gz
cmdline="console=ttyS0 panic=-1 quiet lguest.scenario=reboot"
for run in $(seq 1 "$RUNS"); do
    timeout 300 stopwatch --label lguest --marker LGUEST-GUEST-INIT -- \
        lguest run --kernel $kernel --initrd $initrd --memory 256M --cpus "$CPUS" --cmdline "$cmdline" \
        </dev/null >/dev/null 2>>/tmp/stopwatch
    # microvm has no keyboard controller: its guests reboot by triple fault.
    timeout 300 stopwatch --label qemu --marker LGUEST-GUEST-INIT -- \
        qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 256 -smp "$CPUS" -nodefaults \
        -no-user-config -nographic -serial stdio -no-reboot -kernel $kernel -initrd $initrd \
        -append "$cmdline reboot=t" </dev/null >/dev/null 2>>/tmp/stopwatch
done
grep '^STOPWATCH' /tmp/stopwatch
