# shellcheck shell=sh
# Helpers for the lab test scenarios (tests/lab/*.sh), sourced as /tests/lib.sh inside the lab
# machine (busybox sh; tests/lab.rs puts it there).

# The pattern guest/init writes too: BYTES/32 numbered 32-byte lines, so data at a wrong
# offset never matches.
pattern() {  # pattern TAG BYTES
    awk -v tag="$1" -v n=$(($2 / 32)) 'BEGIN { for (i = 0; i < n; i++) printf "lguest %-5s %018d\n", tag, i }'
}
md5() { md5sum | cut -d' ' -f1; }
# said OUT MARKER: the rest of the guest's first line that starts with "MARKER " (no \r).
said() { tr -d '\r' <"$1" | sed -n "s/^$2 //p" | head -n1; }
# check NAME WHY CONDITION...: CASE NAME status=0 if the condition holds, else status=1
# and the why.
check() {
    local name=$1 why=$2
    shift 2
    if "$@"; then
        echo "CASE $name status=0"
    else
        echo "CASE $name status=1"
        echo "FAIL $name: $why"
    fi
}
