# Inside the lab: the stock Debian kernel as a bzImage (64-bit boot protocol) boots to the
# reference guest's /init, which powers off; then again, and it reboots instead.
guest="--kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz --memory 256M"
lguest run $guest --cmdline "console=ttyS0 reboot=k panic=-1 lguest.scenario=poweroff" </dev/null
echo "CASE poweroff status=$?"
lguest run $guest --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=reboot" </dev/null
echo "CASE reboot status=$?"
