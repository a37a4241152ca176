# The guest's side of tests/lab/virtio-fs.sh (busybox sh), run by guest/init's fs scenario
# from the shared directory itself (/mnt/fs/guest.sh, cwd /mnt/fs). One "FSCASE NAME ok|fail"
# per check; the lab side then checks what the host sees. LGUEST-STEP before each part.
fscase() {
    name=$1
    shift
    if "$@" 2>/tmp/fscase.err; then echo "FSCASE $name ok"; else echo "FSCASE $name fail $(head -c 200 /tmp/fscase.err)"; fi
}
# fails CMD...: the command must fail (its error printed, for the log).
fails() { ! "$@"; }
MiB=1048576
# uptime_cs: the guest's uptime in hundredths of a second, for the timings printed (for the
# log, not checked: the lab is emulated and noisy).
uptime_cs() { sed 's/^\([0-9]*\)\.\([0-9]*\) .*/\1\2/' /proc/uptime; }

echo "LGUEST-STEP fs: create, read, truncate, rename, links, chmod, utimes"
echo "hello from the guest" >created.txt
fscase create [ "$(cat created.txt)" = "hello from the guest" ]
truncate -s 5 created.txt
fscase truncate [ "$(cat created.txt)" = hello ]
mkdir dir
fscase mkdir [ -d dir ]
mv created.txt dir/renamed.txt
fscase rename [ -f dir/renamed.txt -a ! -e created.txt ]
ln -s dir/renamed.txt sym
fscase symlink [ "$(cat sym)" = hello ]
ln dir/renamed.txt hard
fscase link [ "$(stat -c %h hard)" = 2 ]
chmod 640 hard
fscase chmod [ "$(stat -c %a dir/renamed.txt)" = 640 ]
touch -t 200102030405.06 hard
fscase utimes [ "$(stat -c %Y dir/renamed.txt)" = 981173106 ]
echo gone >gone.txt && rm gone.txt
fscase unlink [ ! -e gone.txt ]
mkdir empty && rmdir empty
fscase rmdir [ ! -e empty ]
# Running a program the guest wrote into the share maps it (mmap of a file read page by page).
# (Named busybox: it picks its applet by the name it runs as.)
cp /bin/busybox busybox
fscase mmap-exec ./busybox true
# The host gave guest.sh to nobody, who runs lguest: the guest's own files are nobody's too.
fscase owner-seen-by-guest [ "$(stat -c %u dir/renamed.txt)" = "$(stat -c %u guest.sh)" ]

echo "LGUEST-STEP fs: a large file"
dd if=/dev/urandom of=/tmp/big.bin bs=$MiB count=16 2>/dev/null
t0=$(uptime_cs)
cp /tmp/big.bin big.bin && sync
t1=$(uptime_cs)
echo "LGUEST-FS-BIG $(md5sum <big.bin | cut -d' ' -f1)"
echo 3 >/proc/sys/vm/drop_caches
t2=$(uptime_cs)
echo "LGUEST-FS-BIG-REREAD $(md5sum <big.bin | cut -d' ' -f1)"
t3=$(uptime_cs)
echo "LGUEST-FS-TIMING write-16MiB=$(((t1 - t0) * 10))ms read-16MiB=$(((t3 - t2) * 10))ms"

echo "LGUEST-STEP fs: many small files, a deep tree"
mkdir many
t0=$(uptime_cs)
i=0
while [ $i -lt 1000 ]; do
    echo "$i" >many/f$i
    i=$((i + 1))
done
t1=$(uptime_cs)
echo "LGUEST-FS-COUNT $(ls many | wc -l)"
fscase many-files [ "$(ls many | wc -l)" = 1000 ]
echo "LGUEST-FS-TIMING create-1000-files=$(((t1 - t0) * 10))ms"
d=deep
for i in $(seq 1 30); do d=$d/d$i; done
mkdir -p $d && echo bottom >$d/file
fscase deep-tree [ "$(cat $d/file)" = bottom ]
rm -r many/f1 many/f2
fscase rm-r [ "$(ls many | wc -l)" = 998 ]

echo "LGUEST-STEP fs: escapes"
# The host put these links in the share: they resolve in the guest's own tree, where the
# lab's /tmp/lab-secret does not exist.
fscase escape-absolute-symlink fails grep -q lab-secret abs-link
fscase escape-relative-symlink fails grep -q lab-secret rel-link
fscase escape-dotdot fails grep -q lab-secret ../../tmp/lab-secret

echo "LGUEST-STEP fs: a readonly share, mounted read-write by the guest"
mkdir -p /mnt/ro
if mount -t virtiofs lguest-ro /mnt/ro; then
    fscase readonly-read [ "$(cat /mnt/ro/kept)" = kept ]
    fscase readonly-create fails sh -c 'echo x >/mnt/ro/new'
    fscase readonly-append fails sh -c 'echo x >>/mnt/ro/kept'
    fscase readonly-rm fails rm /mnt/ro/kept
    fscase readonly-mkdir fails mkdir /mnt/ro/d
    fscase readonly-chmod fails chmod 777 /mnt/ro/kept
    umount /mnt/ro
else
    echo "FSCASE readonly-mount fail"
fi
echo LGUEST-FS-GUEST-DONE
