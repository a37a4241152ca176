#!/usr/bin/env bash
# bench/vng/build.sh OUTDIR: virtme-ng for the lab, row 12's peer (`vng --run KERNEL -- true`
# against `lguest exec -- true`). Writes and prints OUTDIR/vng, which holds two trees for
# lab/run.sh's --file:
#   usr/  put at the lab's /usr (`--file OUTDIR/vng/usr:/usr`)
#   k/    put at /k: the reference kernel (boot/vmlinuz-VERSION, its bzImage) with the modules
#         both VMMs' guests load (lib/modules/VERSION: virtio, fuse/virtiofs, overlay, vsock,
#         virtio_console, with kmod's indexes): vng finds them as ../lib/modules/VERSION from
#         the kernel, as in an unpacked kernel package, lguest is given them with --modules
# The lab is busybox with no python, so usr/ brings what vng runs, at the paths vng looks for
# it:
#   usr/bin/python3.11 (+ python3)      Debian 12's, with its standard library, precompiled
#   usr/lib/python3/dist-packages/      virtme-ng and argcomplete (its one dependency vng imports),
#                                       the wheels from PyPI, versions and SHA-256 pinned below
#   usr/bin/vng, usr/bin/virtme-run     their console scripts (vng runs virtme-run through sh)
#   usr/bin/virtiofsd                   the Rust virtiofsd from crates.io (Debian 12 has none),
#                                       built once into the cache: with it vng shares the root
#                                       over virtio-fs on the microvm machine, as lguest does,
#                                       where it would fall back to 9p (which the cloud kernel
#                                       lacks)
#   usr/sbin/modprobe, depmod           kmod's: vng finds the guest's modules with
#                                       `modprobe --show-depends` (busybox's has no such flag)
#   usr/bin/file + its magic            vng reads the kernel's version with `file` (a bzImage's
#                                       is in its header; busybox `strings` finds none there)
#   usr/lib/systemd/systemd-udevd,      Debian 12's udev (the package, unpacked): the guest's
#   usr/bin/udevadm, usr/lib/udev/      virtme-ng-init finds the command's stdio ports by the
#                                       /dev/virtio-ports/ names udev makes; without udev it
#                                       runs the command on the console and exits 255
#   usr/lib/x86_64-linux-gnu/           the shared libraries all of these map (ldd)
# virtme-ng's guest init (virtme-ng-init, Rust) ships built in the wheel (static-pie).
# Idempotent: the tree is rebuilt only when this script changes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$(dirname "$here")")
source "$repo/lab/lib.sh"

# The wheels vng imports (virtme-ng, and its two dependencies with theirs), for Debian 12's
# python 3.11 on x86_64, each pinned with its SHA-256 (pip checks them: --require-hashes).
VNG_VERSION=1.42
WHEELS=(
    "virtme-ng==$VNG_VERSION --hash=sha256:99589f1f5d74249038fe3c52aad9d3c33cb82a2d9617997511d4489fc709a707"
    "argcomplete==3.7.2 --hash=sha256:6029205678bdd9c1c728a155f5f9ecf5812393f969eef58807641a2bc2aa5b19"
    "requests==2.34.2 --hash=sha256:2a0d60c172f83ac6ab31e4554906c0f3b3588d37b5cb939b1c061f4907e278e0"
    "certifi==2026.10.19.post1 --hash=sha256:1324c476b4811eff41a8bc2122cd0bbd4d9c7234c725446d99ab1612b3a7fdd2"
    "charset-normalizer==3.5.3 --hash=sha256:2a6f937e0b70133d1f826d0a253331b6fe1a4c874808cc12e16f2fb8177042f4"
    "idna==3.20 --hash=sha256:ab7ae7122974553370f0bdb919e1a960b2cd1bc1ef0276416d896db81c14582c"
    "urllib3==2.8.0 --hash=sha256:0cf3cae568d36aa9576b28dfb35f11328f1cb974ca7647d9475ebb86c75ac6e3"
)
VIRTIOFSD_VERSION=1.14.0
PY=/usr/bin/python3.11   # Debian's (a pyenv python3 on PATH would not run in the lab)

out=$(realpath -m "${1:?usage: bench/vng/build.sh OUTDIR}")/vng
tree=$out/usr
kernel=$LGUEST_CACHE/kernel
if [[ -f $out/.done ]] && ! stale "$out/.done" "$here/build.sh" "$here/kernel-tree.sh" "$kernel/version"; then
    echo "$out"
    exit 0
fi

# ensure_files PATH:PACKAGE...  apt-installs the packages whose file is missing (headers and
# libraries have no command for ensure_cmds to look for).
ensure_files() {
    local pair missing=()
    for pair in "$@"; do [[ -e ${pair%%:*} ]] || missing+=("${pair#*:}"); done
    ((${#missing[@]} == 0)) || ensure_cmds "${missing[@]/#/no-such-command:}"
}
ensure_cmds pip3:python3-pip cargo:cargo
ensure_files $PY:python3.11 /usr/lib/python3.11/json/__init__.py:libpython3.11-stdlib \
    /usr/bin/kmod:kmod /usr/bin/file:file /usr/include/seccomp.h:libseccomp-dev \
    /usr/include/cap-ng.h:libcap-ng-dev

# The wheels, downloaded once into the cache (pip checks each against its pinned hash).
wheels=$LGUEST_CACHE/vng/$VNG_VERSION
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
printf '%s\n' "${WHEELS[@]}" >"$requirements"
if [[ ! -f $wheels/.done ]]; then
    note "downloading virtme-ng $VNG_VERSION and its dependencies from PyPI"
    mkdir -p "$wheels"
    pip3 download --quiet --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
        --platform manylinux2014_x86_64 --require-hashes -r "$requirements" --dest "$wheels" >&2 ||
        die "pip could not download the pinned wheels (see above)"
    touch "$wheels/.done"
fi

# virtiofsd, built once (a few minutes on 2 cores); its Cargo.lock pins what it builds with.
virtiofsd=$LGUEST_CACHE/virtiofsd/$VIRTIOFSD_VERSION/bin/virtiofsd
if [[ ! -x $virtiofsd ]]; then
    note "building virtiofsd $VIRTIOFSD_VERSION from crates.io (once)"
    CARGO_TARGET_DIR=$LGUEST_CACHE/virtiofsd/target cargo install --quiet --locked virtiofsd \
        --version "$VIRTIOFSD_VERSION" --root "$LGUEST_CACHE/virtiofsd/$VIRTIOFSD_VERSION" >&2 ||
        die "building virtiofsd failed"
    rm -rf "$LGUEST_CACHE/virtiofsd/target"
fi

note "staging virtme-ng $VNG_VERSION, python 3.11, virtiofsd, kmod, file and udev in $tree"
rm -rf "$out"
mkdir -p "$tree"/{bin,sbin,lib/x86_64-linux-gnu,lib/python3/dist-packages}
libs=$tree/lib/x86_64-linux-gnu
# with_libs FILE DEST: FILE at $tree/DEST, the libraries it maps in $libs.
with_libs() {
    local lib
    install -D -m 755 "$1" "$tree/$2"
    for lib in $(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
        [[ -e $libs/${lib##*/} ]] || install -m 755 "$lib" "$libs/${lib##*/}"
    done
}
with_libs $PY bin/python3.11
ln -s python3.11 "$tree/bin/python3"
# The standard library without what vng never imports (tests, GUI, installers).
(cd /usr/lib && tar -c --exclude='python3.11/test' --exclude='python3.11/idlelib' \
    --exclude='python3.11/tkinter' --exclude='python3.11/turtledemo' --exclude='python3.11/ensurepip' \
    --exclude='python3.11/lib2to3' --exclude='python3.11/config-3.11-*' --exclude='__pycache__' \
    --exclude='python3.11/site-packages' --exclude='python3.11/dist-packages' python3.11) | tar -x -C "$tree/lib"
# The wheels, as pip installs them (entry points' executables keep their mode).
pip3 install --quiet --root-user-action=ignore --no-index --find-links "$wheels" --no-deps --no-compile --require-hashes \
    -r "$requirements" --target "$tree/lib/python3/dist-packages" >&2
rm -rf "$tree/lib/python3/dist-packages/bin" "$tree/lib/python3/dist-packages/usr"
# The libraries the compiled modules map (the standard library's and charset-normalizer's).
while read -r so; do
    for lib in $(ldd "$so" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
        [[ -e $libs/${lib##*/} ]] || install -m 755 "$lib" "$libs/${lib##*/}"
    done
done < <(find "$tree/lib/python3.11/lib-dynload" "$tree/lib/python3/dist-packages" -name '*.so')
# Compiled once here, as a packaged python is: the lab's runs don't pay for compiling.
# unchecked-hash: valid whatever the files' times after the copies into the lab.
$PY -m compileall -q -j 2 --invalidation-mode unchecked-hash "$tree/lib/python3.11" \
    "$tree/lib/python3/dist-packages" >/dev/null
for entry in vng:virtme_ng.run virtme-run:virtme.commands.run; do
    printf '#!/usr/bin/python3.11\nimport sys\nfrom %s import main\nsys.exit(main())\n' "${entry#*:}" >"$tree/bin/${entry%%:*}"
    chmod 755 "$tree/bin/${entry%%:*}"
done
with_libs "$virtiofsd" bin/virtiofsd
with_libs /usr/bin/kmod bin/kmod
ln -s ../bin/kmod "$tree/sbin/modprobe"
ln -s ../bin/kmod "$tree/sbin/depmod"
with_libs /usr/bin/file bin/file
install -D -m 644 /usr/lib/file/magic.mgc "$tree/lib/file/magic.mgc"
mkdir -p "$tree/share/misc"
ln -s ../../lib/file/magic.mgc "$tree/share/misc/magic.mgc"
# udev, as Debian 12 ships it (a distribution's root has it; the lab's busybox root has not).
debs=$LGUEST_CACHE/debs
mkdir -p "$debs"
if ! compgen -G "$debs/udev_*.deb" >/dev/null; then
    note "downloading Debian's udev"
    (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root udev >&2) || die "apt-get download udev failed"
fi
udev=$(mktemp -d)
dpkg-deb -x "$(ls "$debs"/udev_*.deb | tail -n1)" "$udev"
with_libs "$udev/bin/udevadm" bin/udevadm
install -D -m 755 "$udev/bin/udevadm" "$tree/lib/systemd/systemd-udevd"
cp -a "$udev/lib/udev" "$tree/lib/udev"
rm -rf "$udev"

# The kernel and the modules of both guests (the set tests/lab.rs gives lguest exec, and
# virtio_console for vng's stdio ports).
"$here/kernel-tree.sh" "$kernel/bzImage" "$kernel/modules" "$(cat "$kernel/version")" "$out/k" ||
    die "cannot lay out the reference kernel for vng in $out/k"
touch "$out/.done"
echo "$out"
