#!/usr/bin/env bash
# lab/run.sh: run a scenario script inside the nested lab: a QEMU (TCG) machine with an
# emulated AMD SVM CPU, whose kernel therefore has a real /dev/kvm (see lab/README.md).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
source "$here/lib.sh"

usage() {
    cat <<'EOF'
usage: lab/run.sh [--interactive] [--with-qemu] [--bin PATH]... [--file SRC:DEST]...
                  [--timeout SECS] SCENARIO.sh

Boots the lab machine with SCENARIO.sh as /scenario.sh and runs it (sh, cwd /) after
loading kvm-amd, tun and bridge. Inside the lab:
  /bin/NAME           each --bin PATH, with the shared libraries ldd lists for it
  DEST                each --file SRC:DEST (a file or a directory)
  /guest/bzImage, /guest/vmlinux, /guest/initramfs.cpio.gz   the reference guest
  qemu-system-x86_64  with --with-qemu, QEMU and its firmware, to compare against
Prints the scenario's output and exits with its status. Exits 125 (and prints the lab
machine's whole console) when the lab machine did not finish the scenario.
  --interactive  the lab's serial console is this terminal (Ctrl-A x quits QEMU);
                 no timeout unless --timeout is given
  --timeout SECS default 600
Environment: LGUEST_CACHE (download cache, default ~/.cache/lguest),
             LAB_OUT (work dir, default lab/out), LAB_MEM_MIB (default 4096),
             LAB_SMP (the lab's CPUs, default 2),
             LAB_KERNEL (vmlinux, the default, or bzImage: how the lab kernel boots).
EOF
    exit 2
}

interactive=0 with_qemu=0 timeout_s='' bins=() files=()
while (($#)); do
    case $1 in
        --interactive) interactive=1 ;;
        --with-qemu) with_qemu=1 ;;
        --bin) bins+=("${2:?--bin needs a PATH}"); shift ;;
        --file) files+=("${2:?--file needs SRC:DEST}"); shift ;;
        --timeout) timeout_s=${2:?--timeout needs SECS}; shift ;;
        -h | --help) usage ;;
        --) shift; break ;;
        -*) echo "lab: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
    shift
done
(($# == 1)) || usage
scenario=$1
[[ -f $scenario ]] || die "no scenario file $scenario"
for b in "${bins[@]}"; do [[ -f $b && -x $b ]] || die "--bin $b: not an executable file"; done
for f in "${files[@]}"; do
    [[ $f == *:/* && -e ${f%%:*} ]] || die "--file $f: want SRC:/DEST with an existing SRC"
done
if [[ -z $timeout_s ]] && ((!interactive)); then timeout_s=600; fi

ensure_cmds qemu-system-x86_64:qemu-system-x86 cpio:cpio timeout:coreutils ldd:libc-bin \
    flock:util-linux mkfs.ext4:e2fsprogs
"$here/fetch.sh" >/dev/null
guest_paths=$("$repo/guest/build.sh")   # bzImage, vmlinux, initramfs, one per line
guest=$(dirname "${guest_paths%%$'\n'*}")
kdir=$LGUEST_CACHE/kernel

out=${LAB_OUT:-$here/out}
pieces=$out/pieces
mkdir -p "$pieces" "$out/logs"
run=$(mktemp -d "$out/run.XXXXXX")
trap 'rm -rf "$run"' EXIT

# The outer initramfs is several cpio archives concatenated (the kernel unpacks them
# in turn). The pieces that don't change between runs are cached in $pieces; only the
# per-run piece (--bin, --file, the scenario) is packed every time. They stay
# uncompressed: under TCG, unpacking a plain cpio is faster than decompressing.
exec 9>"$out/.lock"   # parallel runs: one builds a stale piece, the others wait
flock 9

# base: busybox, /init and the modules, in load order, for KVM (AMD), test networks and loop
# devices (an ext4 image mounted in the lab);
# mkfs.ext4 (e2fsprogs, this host's, with its libraries) for disk images made in the lab.
mkfs_ext4=$(command -v mkfs.ext4)
if stale "$pieces/base.cpio" "$here/init" "$here/run.sh" "$here/lib.sh" \
    "$LGUEST_CACHE/busybox" "$kdir/.from" "$mkfs_ext4"; then
    s=$run/base
    mkdir -p "$s"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,guest}
    install -m 755 "$LGUEST_CACHE/busybox" "$s/bin/busybox"
    for applet in $("$LGUEST_CACHE/busybox" --list-full); do
        [[ $applet == bin/busybox ]] || ln -sf /bin/busybox "$s/$applet"
    done
    install -m 755 "$here/init" "$s/init"
    mknod -m 600 "$s/dev/console" c 5 1
    copy_with_libs "$mkfs_ext4" "$s" usr/sbin/mkfs.ext4
    [[ ! -f /etc/mke2fs.conf ]] || install -m 644 /etc/mke2fs.conf "$s/etc/mke2fs.conf"
    ver=$(cat "$kdir/version")
    mod_deps "$kdir/modules" kvm-amd tun bridge vhost_net loop >"$s/etc/lab-modules"
    while read -r m; do
        install -D -m 644 "$kdir/modules/$m" "$s/lib/modules/$ver/$m"
    done <"$s/etc/lab-modules"
    cp "$kdir/modules/modules.dep" "$s/lib/modules/$ver/"
    mkcpio "$s" "$pieces/base.cpio.tmp" && mv "$pieces/base.cpio.tmp" "$pieces/base.cpio"
    rm -rf "$s"
fi

# guest: the reference guest of guest/build.sh, at /guest. (Its directory is named after its
# inputs, so a piece made from another directory is stale whatever the times say.)
if stale "$pieces/guest.cpio" "$guest/bzImage" "$guest/vmlinux" "$guest/initramfs.cpio.gz" ||
    [[ $(cat "$pieces/guest.from" 2>/dev/null) != "$guest" ]]; then
    s=$run/guest
    mkdir -p "$s/guest"
    cp "$guest/bzImage" "$guest/vmlinux" "$guest/initramfs.cpio.gz" "$s/guest/"
    mkcpio "$s" "$pieces/guest.cpio.tmp" && mv "$pieces/guest.cpio.tmp" "$pieces/guest.cpio"
    echo "$guest" >"$pieces/guest.from"
    rm -rf "$s"
fi

# qemu: QEMU as the peer VMM, at its usual paths (it finds its firmware in
# /usr/bin/../share/qemu and its modules in /usr/bin/../lib/x86_64-linux-gnu/qemu).
qemu=$(command -v qemu-system-x86_64)
if ((with_qemu)) && stale "$pieces/qemu.cpio" "$qemu" "$here/run.sh"; then
    s=$run/qemu
    copy_with_libs "$qemu" "$s" usr/bin/qemu-system-x86_64
    # microvm: bios-microvm.bin (qboot); -kernel bzImage: linuxboot_dma.bin;
    # -kernel vmlinux (PVH): pvh.bin; -M pc/q35: SeaBIOS (bios-256k.bin) and kvmvapic.bin.
    for f in /usr/share/qemu/{bios-microvm.bin,qboot.rom,linuxboot.bin,linuxboot_dma.bin,pvh.bin,multiboot.bin,multiboot_dma.bin,kvmvapic.bin} \
        /usr/share/seabios/{bios.bin,bios-256k.bin}; do
        [[ ! -e $f ]] || install -D -m 644 "$f" "$s$f"
    done
    # TCG as a module: only used if a scenario runs QEMU without KVM.
    tcg=/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so
    [[ ! -e $tcg ]] || copy_with_libs "$tcg" "$s" "${tcg#/}"
    mkcpio "$s" "$pieces/qemu.cpio.tmp" && mv "$pieces/qemu.cpio.tmp" "$pieces/qemu.cpio"
    rm -rf "$s"
fi
flock -u 9

# This run's piece: --bin, --file and the scenario.
s=$run/extra
mkdir -p "$s/bin"
for b in "${bins[@]}"; do copy_with_libs "$b" "$s" "bin/${b##*/}"; done
for f in "${files[@]}"; do
    src=${f%%:*} dest=${f#*:}
    mkdir -p "$(dirname "$s$dest")"
    cp -a "$src" "$s$dest"
done
install -m 755 "$scenario" "$s/scenario.sh"
mkcpio "$s" "$run/extra.cpio"

initrd=$run/initrd.cpio
cat "$pieces/base.cpio" "$pieces/guest.cpio" >"$initrd"
((!with_qemu)) || cat "$pieces/qemu.cpio" >>"$initrd"
cat "$run/extra.cpio" >>"$initrd"

log=$out/logs/lab-$(date +%Y%m%d-%H%M%S)-$$.log
ln -sfn "$log" "$out/last.log"
# Keep the 20 newest logs.
find "$out/logs" -name "lab-*.log" -printf "%T@ %p\n" | sort -rn | tail -n +21 | cut -d" " -f2- | xargs -r rm -f

# The outer kernel is the cached cloud kernel, booted as the ELF vmlinux through its PVH
# entry: that skips the bzImage's decompression under TCG (~0.4 s of a ~3.5 s boot).
# The CPU is an EPYC with SVM and nested paging, minus the features TCG can't emulate
# anyway: the guest sees the same CPUID, and QEMU prints no warning for each of them.
cpu=EPYC,+svm,+npt,-rdseed,-sha-ni,-fxsr-opt,-misalignsse,-3dnowprefetch,-osvw,-topoext,-nrip-save,-xsavec
outer=(qemu-system-x86_64 -M q35 -accel tcg,thread=multi -cpu "$cpu" -smp "${LAB_SMP:-2}"
    -m "${LAB_MEM_MIB:-4096}" -nodefaults -no-user-config -nographic -no-reboot
    -kernel "$kdir/${LAB_KERNEL:-vmlinux}" -initrd "$initrd"
    -append "console=ttyS0 reboot=t panic=-1 quiet")
tmo=()
# --foreground: QEMU stays in the terminal's process group (Ctrl-C, tty input work).
[[ -z $timeout_s ]] || tmo=(timeout --foreground -k 10 "$timeout_s")

# Shows the console from LAB-READY (the lines before it are the outer kernel booting,
# except the lab's own "lab:" messages) up to LAB-EXIT, without the serial's \r, and
# notes when the two markers went by. (A shell loop, as mawk would hold lines back.)
filter() {
    local line ready=0 done=0
    while IFS= read -r line || [[ -n $line ]]; do
        line=${line%$'\r'}
        if ((!ready)); then
            if [[ $line == *LAB-READY ]]; then
                ready=1
                echo "ready $EPOCHREALTIME" >>"$run/times"
            elif [[ $line == "lab: "* ]]; then
                printf '%s\n' "$line"
            fi
        elif ((!done)); then
            if [[ $line =~ ^(.*)LAB-EXIT=[0-9]+$ ]]; then
                done=1
                echo "exit $EPOCHREALTIME" >>"$run/times"
                [[ -z ${BASH_REMATCH[1]} ]] || printf '%s\n' "${BASH_REMATCH[1]}"
            else
                printf '%s\n' "$line"
            fi
        fi
    done
}

start=$EPOCHREALTIME
set +e
if ((interactive)); then
    # The terminal talks to the lab's console; Ctrl-C goes to the lab, Ctrl-A x quits.
    "${tmo[@]}" "${outer[@]}" -chardev stdio,id=con,mux=on,signal=off -serial chardev:con \
        -mon chardev=con,mode=readline 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
else
    # The log keeps the whole console; the terminal gets the scenario's part.
    "${tmo[@]}" "${outer[@]}" -serial stdio </dev/null 2>&1 | tee "$log" | filter
    rc=${PIPESTATUS[0]}
fi
set -e
end=$EPOCHREALTIME

status=$(tr -d '\r' <"$log" | grep -ao 'LAB-EXIT=[0-9]*$' | tail -n1 | cut -d= -f2 || true)
if [[ -z $status ]]; then
    panic=$(tr -d '\r' <"$log" | grep -m1 -o 'Kernel panic.*' || true)
    if ((rc == 124)); then why="timed out after ${timeout_s} s"
    elif [[ -n $panic ]]; then why="the lab kernel died: $panic"
    else why="QEMU exited with status $rc before LAB-EXIT"; fi
    if ((!interactive)); then
        echo "---- the lab machine's whole console ($log) ----" >&2
        cat "$log" >&2
        echo "---- end of the lab machine's console ----" >&2
    fi
    echo "lab: the lab machine did not finish the scenario ($why; console log: $log)" >&2
    exit 125
fi
if [[ -f $run/times ]]; then
    awk -v s="$start" -v e="$end" '{ t[$1] = $2 }
        END { printf "lab: outer boot %.1f s, scenario %.1f s, total %.1f s\n",
              t["ready"] - s, t["exit"] - t["ready"], e - s }' "$run/times" >&2
fi
exit "$status"
