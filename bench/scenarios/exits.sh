# Lab side of bench/run.sh's row 6 (exit cost); bench/run.sh prepends RUNS=N EXITS=N.
# exit-cost (bench/tools) runs its tiny guest, N port writes then a reset, under its own bare
# KVM_RUN loop and under lguest, on the lab's (nested) KVM. See bench/tools/src/bin/exit-cost.rs.
. /bench/lib.sh
# Pinned to one lab CPU: a vCPU thread that moves between the lab's CPUs is what hangs
# nested guests now and then (lab/README.md), and a hang here once took the lab with it.
timeout $((RUNS * 40)) taskset -c 1 exit-cost --row exits-lab --exits "$EXITS" --runs "$RUNS" --lguest "$(command -v lguest)" ||
    note exits-lab "exit-cost failed (status $?)"
drain
