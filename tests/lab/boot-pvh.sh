# Inside the lab: the same kernel as an ELF vmlinux, booted through its PVH entry.
timeout 180 lguest run --boot-timeline --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M \
    --cmdline "console=ttyS0 reboot=k panic=-1 lguest.scenario=poweroff" </dev/null
echo "CASE pvh status=$?"
