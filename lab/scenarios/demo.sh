# The README's demo, inside the lab: lguest boots the reference guest (Debian's stock cloud
# kernel, busybox initramfs) to a shell on the lab's console, which is your terminal.
echo
echo "lguest demo: booting Debian's cloud kernel under lguest inside the nested lab."
echo "In the guest's shell, 'poweroff -f' ends the demo; Ctrl-A x quits the lab at any time."
echo
lguest run --kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz --cmdline "console=ttyS0 panic=-1 quiet"
