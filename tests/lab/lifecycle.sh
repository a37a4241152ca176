# Inside the lab: how the reference guest's life ends, and begins again.
guest="--kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M"

# until_seen N MARKER FILE PID: waits until MARKER is in FILE N times, PID has exited, or 120 s.
until_seen() {
    tries=0
    until [ "$(grep -c "$2" "$3")" -ge "$1" ] || ! kill -0 "$4" 2>/dev/null || [ $tries -ge 600 ]; do
        sleep 0.2
        tries=$((tries + 1))
    done
}

# --reboot restart: the guest's `reboot -f` boots it again. On the second boot, SIGTERM: init
# is busy with the console's shell and doesn't act on Ctrl-Alt-Del, so after
# --shutdown-timeout lguest stops the VM (its vCPU idle in HLT) and exits 128+15.
mkfifo /tmp/restart-in
timeout 180 lguest run $guest --reboot restart --shutdown-timeout 3 \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet" </tmp/restart-in >/tmp/restart-out 2>&1 &
pid=$!
exec 3>/tmp/restart-in
until_seen 1 LGUEST-SHELL-READY /tmp/restart-out $pid
echo 'reboot -f' >&3
until_seen 2 LGUEST-SHELL-READY /tmp/restart-out $pid
kill -TERM $pid
wait $pid
status=$?
exec 3>&-
cat /tmp/restart-out
echo "LGUEST-BOOTS $(grep -c LGUEST-GUEST-INIT /tmp/restart-out)"
echo "CASE restart status=$status"

# SIGTERM to a guest whose init waits: Ctrl-Alt-Del reaches init as SIGINT, it powers off.
timeout 180 lguest run $guest --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=wait" \
    </dev/null >/tmp/sigterm-out 2>&1 &
pid=$!
until_seen 1 LGUEST-WAITING /tmp/sigterm-out $pid
kill -TERM $pid
wait $pid
status=$?
cat /tmp/sigterm-out
echo "CASE sigterm status=$status"

# A kernel panic (panic=-1 would reboot at once): pvpanic tells lguest, which exits 3.
timeout 180 lguest run $guest --reboot restart \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=panic" </dev/null
echo "CASE panic status=$?"
