# Inside the lab: the stock Debian kernel as a bzImage (64-bit boot protocol) boots to the
# reference guest's /init, which powers off (ACPI S5); then again, and it reboots instead.
guest="--kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz --memory 256M"
timeout 180 lguest run $guest --cmdline "console=ttyS0 reboot=k panic=-1 lguest.scenario=poweroff" </dev/null
echo "CASE poweroff status=$?"
# No reboot= option: Linux picks its default way (for this kernel, through the "BIOS").
timeout 180 lguest run $guest --cmdline "console=ttyS0 panic=-1 quiet lguest.scenario=reboot" </dev/null
echo "CASE reboot status=$?"
