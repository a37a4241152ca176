# Inside the lab: a command typed on lguest's stdin (a pipe, as a script would) runs in the
# guest's shell and its output comes back. We wait for the shell before typing, as a person
# would. Every wait is bounded, and the guest's console is printed whatever happens.
mkfifo /tmp/console-in
timeout 180 lguest run --kernel /guest/bzImage --initrd /guest/initramfs.cpio.gz --memory 256M \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet" </tmp/console-in >/tmp/console-out 2>&1 &
pid=$!
exec 3>/tmp/console-in
tries=0
until grep -q LGUEST-SHELL-READY /tmp/console-out || ! kill -0 $pid 2>/dev/null || [ $tries -ge 600 ]; do
    sleep 0.2
    tries=$((tries + 1))
done
echo 'echo hello-$((6*7))' >&3
echo 'poweroff -f' >&3
wait $pid
status=$?
cat /tmp/console-out
echo "CASE console status=$status"
