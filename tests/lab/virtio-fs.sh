# Inside the lab: virtio-fs (--share), in one lguest boot run as nobody (guest side:
# guest/init's fs scenario, which runs /mnt/fs/guest.sh, tests/lab/virtio-fs-guest.sh, put in
# the share here). Two shares: /tmp/share (read-write, tag lguest-fs) and /tmp/ro (readonly,
# tag lguest-ro). The guest creates, reads, truncates, renames, links, chmods, touches,
# unlinks, runs a program from the share, writes a 16 MiB file and 1000 small ones and a
# 30-deep tree, tries to escape through symlinks and .., and to change the readonly share.
# Here we then check what the host sees: the guest's files, owned by nobody (who ran
# lguest), with the modes, times, links and contents it gave them; the readonly share and
# the secret outside untouched. Each check prints "CASE NAME status=0" (or 1 and "FAIL").
set -o pipefail
. /tests/lib.sh
cd /tmp
share=/tmp/share ro=/tmp/ro
mkdir -p $share $ro
cp /tests/virtio-fs-guest.sh $share/guest.sh
echo lab-secret >/tmp/lab-secret
ln -s /tmp/lab-secret $share/abs-link
ln -s ../../../../../../tmp/lab-secret $share/rel-link
echo kept >$ro/kept
chown -R 65534:65534 $share
ro_before=$(ls -lR $ro | md5)

cat >/tmp/run-lguest.sh <<EOS
exec timeout 400 lguest run --kernel /guest/vmlinux --initrd /guest/initramfs.cpio.gz --memory 256M \
    --share $share:lguest-fs --share $ro:lguest-ro,readonly \
    --cmdline "console=ttyS0 reboot=k panic=-1 quiet lguest.scenario=fs"
EOS
chmod 755 /tmp/run-lguest.sh
echo "== fs: lguest run --share $share:lguest-fs --share $ro:lguest-ro,readonly (as nobody)"
start=$(date +%s)
as_nobody /tmp/run-lguest.sh </dev/null >fs.out 2>&1
status=$?
echo "== fs: lguest exited with status $status after $(($(date +%s) - start)) s"
tr -d '\r' <fs.out
check fs-exit "lguest exited with $status (124: timed out after 400 s)" [ "$status" = 0 ]
check fs-done "the guest did not finish its scenario" grep -q '^LGUEST-SCENARIO-DONE' fs.out
check fs-guest-done "the guest's side did not run to its end" grep -q '^LGUEST-FS-GUEST-DONE' fs.out
for name in create truncate mkdir rename symlink link chmod utimes unlink rmdir mmap-exec owner-seen-by-guest \
    many-files deep-tree rm-r escape-absolute-symlink escape-relative-symlink escape-dotdot \
    readonly-read readonly-create readonly-append readonly-rm readonly-mkdir readonly-chmod; do
    check "fs-guest-$name" "the guest says: $(tr -d '\r' <fs.out | grep "^FSCASE $name " | head -n1)" \
        grep -q "^FSCASE $name ok" fs.out
done

file=$share/dir/renamed.txt
check fs-host-owner "the guest's file is $(stat -c %u:%g $file 2>&1), not nobody's (65534:65534)" \
    [ "$(stat -c %u:%g $file)" = 65534:65534 ]
check fs-host-content "the host reads '$(cat $file 2>&1)', not hello" [ "$(cat $file)" = hello ]
check fs-host-mode "mode $(stat -c %a $file 2>&1), not 640" [ "$(stat -c %a $file)" = 640 ]
check fs-host-mtime "mtime $(stat -c %Y $file 2>&1), not 981173106" [ "$(stat -c %Y $file)" = 981173106 ]
check fs-host-links "link count $(stat -c %h $file 2>&1), not 2" [ "$(stat -c %h $file)" = 2 ]
check fs-host-symlink "sym points at '$(readlink $share/sym 2>&1)'" [ "$(readlink $share/sym)" = dir/renamed.txt ]
big=$(said fs.out LGUEST-FS-BIG) reread=$(said fs.out LGUEST-FS-BIG-REREAD)
check fs-host-big "the host's big.bin: $(stat -c %s $share/big.bin 2>&1) bytes md5 $(md5 <$share/big.bin); the guest wrote ${big:-?}, reread ${reread:-?}" \
    [ "$(stat -c %s $share/big.bin)/$(md5 <$share/big.bin)/$reread" = "16777216/$big/$big" ]
check fs-host-many "the host sees $(ls $share/many | wc -l) small files, not 998" [ "$(ls $share/many | wc -l)" = 998 ]
check fs-host-deep "the deep tree's file: '$(cat $share/deep/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/d13/d14/d15/d16/d17/d18/d19/d20/d21/d22/d23/d24/d25/d26/d27/d28/d29/d30/file 2>&1)'" \
    [ -f $share/deep/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/d13/d14/d15/d16/d17/d18/d19/d20/d21/d22/d23/d24/d25/d26/d27/d28/d29/d30/file ]
check fs-host-readonly "the readonly share changed" [ "$(ls -lR $ro | md5)" = "$ro_before" ]
check fs-host-secret "the secret outside the share changed" [ "$(cat /tmp/lab-secret)" = lab-secret ]
check fs-no-leftovers "files the guest removed are still there" [ ! -e $share/gone.txt -a ! -e $share/empty ]
