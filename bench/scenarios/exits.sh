# Lab side of bench/run.sh's row 6 (exit cost); bench/run.sh prepends RUNS=N EXITS=N.
# exit-cost (bench/tools) runs its tiny guest, N port writes then a reset, under its own bare
# KVM_RUN loop and under lguest, on the lab's (nested) KVM. See bench/tools/src/bin/exit-cost.rs.
. /bench/lib.sh
timeout 600 exit-cost --row exits-lab --exits "$EXITS" --runs "$RUNS" --lguest "$(command -v lguest)" ||
    note exits-lab "exit-cost failed (status $?)"
drain
