# shellcheck shell=bash
# Helpers shared by lab/fetch.sh, guest/build.sh and lab/run.sh (sourced, not run).

# The download/extract cache, kept between runs and shared by every checkout.
LGUEST_CACHE="${LGUEST_CACHE:-$HOME/.cache/lguest}"

die() { echo "${0##*/}: $*" >&2; exit 1; }
note() { echo "${0##*/}: $*" >&2; }

# ensure_cmds CMD:PACKAGE...  installs (with apt) the packages whose command is missing.
# CI may run on a fresh machine, so every script installs what it uses.
ensure_cmds() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    ((${#missing[@]})) || return 0
    note "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine may have no package lists yet: update once and retry.
    apt-get install -y -q "${missing[@]}" >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q "${missing[@]}" >&2; }
}

# stale TARGET INPUT...  succeeds when TARGET is missing or older than any input
# (inputs may be directories: everything below them counts).
stale() {
    local target=$1; shift
    [[ -e $target ]] || return 0
    [[ -n $(find "$@" -newer "$target" -print -quit) ]]
}

# copy_with_libs FILE STAGE DEST  copies FILE to STAGE/DEST and the shared libraries
# that ldd lists for it to the same paths under STAGE (nothing for a static binary).
copy_with_libs() {
    local file=$1 stage=$2 dest=$3 lib
    install -D -m 755 "$file" "$stage/$dest"
    # ldd prints "name => /path (addr)" or "/path (addr)"; the vdso has no path.
    for lib in $(ldd "$file" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        install -D -m 755 "$lib" "$stage/$lib"   # install dereferences symlinks
    done
}

# mkcpio DIR OUT  packs DIR as a newc cpio (owned by root, files sorted, so it is reproducible).
mkcpio() {
    (cd "$1" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) >"$2"
}

# mod_deps MODDIR NAME...  prints module paths (relative to MODDIR, from modules.dep),
# dependencies first, each once: the order insmod needs.
mod_deps() {
    local dir=$1; shift
    awk -v want="$*" '
        function visit(m,   n, i, d) {
            if (m in done) return
            done[m] = 1
            n = split(deps[m], d, " ")
            for (i = n; i >= 1; i--) visit(d[i])   # modules.dep lists the deepest last
            print m
        }
        {
            sub(/:$/, "", $1); m = $1; $1 = ""; deps[m] = $0
            base = m; sub(/.*\//, "", base); sub(/\.ko$/, "", base); gsub(/-/, "_", base)
            path[base] = m
        }
        END {
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                name = w[i]; gsub(/-/, "_", name)
                if (!(name in path)) { print "no such module: " w[i] > "/dev/stderr"; exit 1 }
                visit(path[name])
            }
        }' "$dir/modules.dep"
}
