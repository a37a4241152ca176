# Inside the lab: `lguest exec`, run by root and by nobody, with the lab's own root (busybox)
# as the guest's `/`. Each lguest exec boots the reference kernel (/guest/vmlinux, its modules
# in /guest/modules beside it) and runs one command; here we check what came out: the exit
# statuses (0, 1, 42, 128+signal), SIGTERM and SIGINT sent to lguest handed on to CMD, stdout
# and stderr apart, stdin piped through, a file made in the shared working directory owned by
# the caller, writes under / kept in the overlay, escapes through .., symlinks and a readonly
# share kept from the host, a pty when the console is the terminal, make of a small C project,
# two execs at once, --net user.
# Each check prints "CASE NAME status=0" (or 1 and "FAIL").
set -o pipefail
. /tests/lib.sh
run() { timeout 180 lguest exec --kernel /guest/vmlinux --memory 256M "$@"; }

echo "== exec: statuses, stdout and stderr apart (as root)"
start=$(date +%s)
run --boot-timeline -- true 2>timeline.err
status=$?
check exec-true "lguest exec -- true exited with $status: $(cat timeline.err)" [ "$status" = 0 ]
cat timeline.err
check exec-timeline "no CMD milestones in --boot-timeline" grep -q "CMD exited" timeline.err
echo "== exec: the first run took $(($(date +%s) - start)) s"
run -- false
status=$?
check exec-false "lguest exec -- false exited with $status" [ "$status" = 1 ]
run -- sh -c 'echo to-stdout; echo to-stderr >&2; exit 42' >out.txt 2>err.txt
status=$?
check exec-42 "exited with $status" [ "$status" = 42 ]
check exec-stdout "stdout was: $(cat out.txt)" [ "$(cat out.txt)" = to-stdout ]
check exec-stderr "stderr was: $(cat err.txt)" [ "$(cat err.txt)" = to-stderr ]
run -- sh -c 'kill -TERM $$'
status=$?
check exec-signal "a CMD killed by SIGTERM made lguest exit $status, not 143" [ "$status" = 143 ]
run -- /no/such/program 2>missing.err
status=$?
check exec-not-found "exited $status, said: $(cat missing.err)" sh -c "[ $status = 127 ] && grep -q 'no/such/program' missing.err"
echo "== exec: signals sent to lguest go to CMD (not on a terminal: stdin is /dev/null)"
# CMD marks in the shared working directory that it runs (before that, a signal would stop
# the VM); then the signal comes from here, as from a supervisor.
signal_cmd() {  # signal_cmd SIGNAL OUT CMD...: runs lguest exec -- CMD..., signals it, its status
    local signal=$1 out=$2 n=0
    shift 2
    rm -f ready
    # Not through run(): a backgrounded function is a subshell, and $! would be its pid.
    timeout 180 lguest exec --kernel /guest/vmlinux --memory 256M -- "$@" </dev/null >"$out" 2>&1 &
    local pid=$!
    until [ -e ready ] || [ $n -ge 600 ]; do sleep 0.2; n=$((n + 1)); done
    kill -"$signal" $pid
    wait $pid
}
here=$PWD
mkdir -p /tmp/signals && cd /tmp/signals
signal_cmd TERM term.out sh -c 'trap "echo got-term; exit 7" TERM; touch ready; sleep 60 & wait'
status=$?
check exec-sigterm "SIGTERM to lguest exec: it exited $status (not 7), CMD said: $(cat term.out)" \
    sh -c "[ $status = 7 ] && grep -q '^got-term' term.out"
signal_cmd INT int.out sh -c 'touch ready; sleep 60'
status=$?
check exec-sigint "SIGINT to lguest exec: it exited $status, not 130: $(cat int.out)" [ "$status" = 130 ]
cd "$here"

echo "== exec: stdin"
got=$(echo hi | run -- cat)
check exec-stdin "echo hi | lguest exec -- cat gave '$got'" [ "$got" = hi ]
got=$(head -c 300000 /dev/zero | tr '\0' x | run -- wc -c)
check exec-stdin-bulk "300000 bytes through cat: wc said '$got'" [ "$got" = 300000 ]

echo "== exec: the overlay, the shared working directory, escapes"
mkdir -p /tmp/work /tmp/outside /tmp/ro
echo host-secret >/tmp/outside/secret
echo host-etc >/etc/exec-test
echo kept >/tmp/ro/kept
ln -sf /tmp/outside/secret /tmp/work/abs-link
ln -sf ../outside/secret /tmp/work/rel-link
chown -R 65534:65534 /tmp/work
cat >/tmp/work/guest.sh <<'EOS'
echo "id: $(id -u):$(id -g) cwd: $(pwd) home=$HOME user=$USER lang=$LANG extra=$EXTRA"
echo guest-data >made-in-guest
echo guest-root >/etc/exec-test 2>/dev/null && echo "etc-write: $(cat /etc/exec-test)"
echo escaped >abs-link 2>/dev/null; echo escaped >rel-link 2>/dev/null; echo escaped >../outside/secret 2>/dev/null
echo "secret-in-guest: $(cat /tmp/outside/secret)"
if { touch /tmp/ro/new || echo x >>/tmp/ro/kept; } 2>/dev/null; then echo ro-writable; else echo ro-refused; fi
EOS
chmod 755 /tmp/work/guest.sh
cat >/tmp/exec-nobody.sh <<'EOS'
cd /tmp/work && exec timeout 180 lguest exec --kernel /guest/vmlinux --memory 256M --share /tmp/ro:ro,readonly --env EXTRA=yes -- sh ./guest.sh
EOS
chmod 755 /tmp/exec-nobody.sh
as_nobody /tmp/exec-nobody.sh >nobody.out 2>&1
status=$?
cat nobody.out
check exec-nobody "lguest exec as nobody exited with $status" [ "$status" = 0 ]
check exec-caller "CMD did not run as nobody in /tmp/work with the environment" grep -q "^id: 65534:65534 cwd: /tmp/work .*extra=yes" nobody.out
check exec-owner "made-in-guest on the host: $(ls -ln /tmp/work/made-in-guest 2>&1)" \
    sh -c '[ "$(cat /tmp/work/made-in-guest)" = guest-data ] && [ "$(stat -c %u:%g /tmp/work/made-in-guest)" = 65534:65534 ]'
check exec-escape "the host's /tmp/outside/secret is now: $(cat /tmp/outside/secret)" [ "$(cat /tmp/outside/secret)" = host-secret ]
check exec-readonly "the readonly share took a write: $(ls /tmp/ro; cat /tmp/ro/kept)" \
    sh -c 'grep -q "ro-refused" nobody.out && [ "$(ls /tmp/ro)" = kept ] && [ "$(cat /tmp/ro/kept)" = kept ]'
cd /tmp/work
# The lab's console is a terminal: with stdin and stdout on it, CMD gets a pty of its own.
run -- sh -c 'tty >tty.txt; stty size >>tty.txt; exit 3'
status=$?
check exec-tty "on the console: exited $status; CMD's tty: $(cat tty.txt 2>&1)" \
    sh -c "[ $status = 3 ] && grep -q '^/dev/pts/' tty.txt"
run -- sh -c 'echo guest-root >/etc/exec-test && cat /etc/exec-test' >root.out 2>&1
check exec-overlay "as root, the guest's write to /etc: $(cat root.out)" grep -q "^guest-root" root.out
check exec-host-untouched "the host's /etc/exec-test is now: $(cat /etc/exec-test)" [ "$(cat /etc/exec-test)" = host-etc ]
cd /

echo "== exec: make of a small C project in the shared directory (make and tcc from the lab's root)"
mkdir -p /tmp/cproj && cd /tmp/cproj
printf 'int puts(const char *s);\nconst char *greeting(void);\nint main(void) { puts(greeting()); return 0; }\n' >main.c
printf 'const char *greeting(void) { return "built-by-make-in-lguest-exec"; }\n' >greet.c
printf 'CC = tcc\nhello: main.o greet.o\n\t$(CC) -o $@ main.o greet.o\n%%.o: %%.c\n\t$(CC) -c -o $@ $<\n' >Makefile
run -- make >make.out 2>&1
status=$?
cat make.out
check exec-make "make in lguest exec exited with $status; the program says: $(./hello 2>&1)" \
    sh -c "[ $status = 0 ] && [ \"\$(./hello)\" = built-by-make-in-lguest-exec ]"
cd /

echo "== exec: two at once"
run -- sh -c 'echo one' >one.out 2>&1 &
first=$!
run -- sh -c 'echo two' >two.out 2>&1
second=$?
wait $first
first=$?
check exec-two "the two execs: $first '$(cat one.out)', $second '$(cat two.out)'" \
    sh -c "[ $first = 0 ] && [ $second = 0 ] && [ \"\$(cat one.out)\" = one ] && [ \"\$(cat two.out)\" = two ]"
echo "== exec: --net user (as nobody: passt needs the chroot as_nobody makes)"
# As tests/lab/virtio-net-user.sh: a bridge with no wire holds the lab's addresses and its
# default route, dnsmasq answers for lab.test, httpd serves a page.
ip link add br0 type bridge && ip addr add 169.254.1.1/16 dev br0 && ip addr add 169.254.2.1/16 dev br0 &&
    ip link set br0 up && ip route add default via 169.254.1.254 dev br0
echo 'nameserver 169.254.2.1' >/etc/resolv.conf
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >>/etc/passwd
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --pid-file= --user=root \
    --listen-address=169.254.2.1 --bind-interfaces --address=/lab.test/169.254.2.1 &
dns_pid=$!
mkdir -p /tmp/www && echo exec-net-page >/tmp/www/index.html
httpd -p 8080 -h /tmp/www
cat >/tmp/exec-net.sh <<'EOS'
cd /tmp/work && exec timeout 180 lguest exec --kernel /guest/vmlinux --memory 256M --net user -- \
    sh -c 'wget -qO- http://169.254.2.1:8080/ && wget -qO- http://lab.test:8080/'
EOS
chmod 755 /tmp/exec-net.sh
as_nobody /tmp/exec-net.sh >net.out 2>&1
status=$?
cat net.out
check exec-net "lguest exec --net user exited $status; fetched: $(cat net.out)" \
    sh -c "[ $status = 0 ] && [ \"\$(grep -c '^exec-net-page' net.out)\" = 2 ]"
kill $dns_pid

echo "== exec: done after $(($(date +%s) - start)) s"
