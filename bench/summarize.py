"""bench/summarize.py RAW MD JSON: turns bench/run.sh's raw lines into one Markdown table (MD),
the same numbers as JSON (JSON), and the table's ratios as a bar chart (MD's name with .svg,
drawn by bench/chart.py). Raw lines (everything else is ignored):

    BENCH row=ROW vmm=VMM metric=METRIC value=NUMBER unit=UNIT    one sample
    BENCH-NOTE row=ROW text...                                     listed under the table
    BENCH-PARAM key=value                                          how the run was made

BENCH-PARAM rows=LIST (bench/run.sh's --rows) limits the table to those rows' lines.

Each table line is one measurement: lguest's median (min–max) over its samples, a peer's
(QEMU, QEMU with vhost, or the bare KVM_RUN loop), and the ratio of the medians,
lguest/peer. Whether a lower or a higher number is better is said per line. Lines with no
sample at all are still shown (n/a), so a missing row is visible rather than silently gone."""
import json
import os
import re
import statistics
import sys

import chart

# (row number, row id, metric, title, unit, better, peers). Titles may use the BENCH-PARAMs.
CATALOG = [
    (1, "boot-1cpu", "init", "Boot, 1 vCPU, 256 MiB: start → guest /init", "ms", "lower", ["qemu"]),
    (1, "boot-1cpu", "exit", "Boot, 1 vCPU, 256 MiB: start → exit after poweroff", "ms", "lower", ["qemu"]),
    (1, "boot-2cpu", "init", "Boot, 2 vCPUs, 256 MiB: start → guest /init", "ms", "lower", ["qemu"]),
    (1, "boot-2cpu", "exit", "Boot, 2 vCPUs, 256 MiB: start → exit after poweroff", "ms", "lower", ["qemu"]),
    (1, "boot-1cpu", "exits-port", "Boot, 1 vCPU: exits to lguest, port I/O", "exits", "lower", []),
    (1, "boot-1cpu", "exits-mmio", "Boot, 1 vCPU: exits to lguest, MMIO", "exits", "lower", []),
    (1, "boot-1cpu", "exits-other", "Boot, 1 vCPU: exits to lguest, other", "exits", "lower", []),
    (1, "boot-2cpu", "exits-port", "Boot, 2 vCPUs: exits to lguest, port I/O", "exits", "lower", []),
    (1, "boot-2cpu", "exits-mmio", "Boot, 2 vCPUs: exits to lguest, MMIO", "exits", "lower", []),
    (1, "boot-2cpu", "exits-other", "Boot, 2 vCPUs: exits to lguest, other", "exits", "lower", []),
    (2, "startup", "first-kvm-run", "VMM start-up, lab, Debian kernel: main → first KVM_RUN", "ms", "lower", []),
    (2, "exits-host", "startup", "VMM start-up, this host's KVM, tiny guest: main → first KVM_RUN", "ms", "lower", ["bare"]),
    (2, "exits-lab", "startup", "VMM start-up, lab KVM, tiny guest: main → first KVM_RUN", "ms", "lower", ["bare"]),
    (3, "memory-256m", "rss", "Memory, idle guest, 256 MiB: VMM RSS", "MiB", "lower", ["qemu"]),
    (3, "memory-256m", "overhead", "Memory, idle guest, 256 MiB: RSS − guest RAM touched", "MiB", "lower", ["qemu"]),
    (3, "memory-2g", "rss", "Memory, idle guest, 2 GiB: VMM RSS", "MiB", "lower", ["qemu"]),
    (3, "memory-2g", "overhead", "Memory, idle guest, 2 GiB: RSS − guest RAM touched", "MiB", "lower", ["qemu"]),
    (3, "memory-256m-4dev", "rss", "Memory, 256 MiB + 4 virtio devices: VMM RSS", "MiB", "lower", ["qemu"]),
    (3, "memory-256m-4dev", "overhead", "Memory, 256 MiB + 4 virtio devices: RSS − guest RAM", "MiB", "lower", ["qemu"]),
    (5, "net", "tcp-tx", "Network: TCP guest → host (iperf3)", "Mbit/s", "higher", ["qemu"]),
    (5, "net", "tcp-rx", "Network: TCP host → guest (iperf3 -R)", "Mbit/s", "higher", ["qemu"]),
    (5, "net", "tcp-rr", "Network: 1-byte TCP request/response", "trans/s", "higher", ["qemu"]),
    (5, "net-vhost", "tcp-tx", "Network, both vhost=on: TCP guest → host (iperf3)", "Mbit/s", "higher", ["qemu-vhost"]),
    (5, "net-vhost", "tcp-rx", "Network, both vhost=on: TCP host → guest (iperf3 -R)", "Mbit/s", "higher", ["qemu-vhost"]),
    (5, "net-vhost", "tcp-rr", "Network, both vhost=on: 1-byte TCP request/response", "trans/s", "higher", ["qemu-vhost"]),
    (5, "net", "cpu-tx", "Network: lab CPU per GiB, guest → host", "s/GiB", "lower", ["qemu"]),
    (5, "net", "cpu-rx", "Network: lab CPU per GiB, host → guest", "s/GiB", "lower", ["qemu"]),
    (5, "net-vhost", "cpu-tx", "Network, both vhost=on: lab CPU per GiB, guest → host", "s/GiB", "lower", ["qemu-vhost"]),
    (5, "net-vhost", "cpu-rx", "Network, both vhost=on: lab CPU per GiB, host → guest", "s/GiB", "lower", ["qemu-vhost"]),
    (5, "net-2cpu", "tcp-tx", "Network, 2 vCPUs, 2 queue pairs: TCP guest → host (iperf3)", "Mbit/s", "higher", ["qemu"]),
    (5, "net-2cpu", "tcp-rx", "Network, 2 vCPUs, 2 queue pairs: TCP host → guest (iperf3 -R)", "Mbit/s", "higher", ["qemu"]),
    (5, "net-2cpu", "tcp-rr", "Network, 2 vCPUs, 2 queue pairs: 1-byte TCP request/response", "trans/s", "higher", ["qemu"]),
    (5, "net-2cpu", "cpu-tx", "Network, 2 vCPUs, 2 queue pairs: lab CPU per GiB, guest → host", "s/GiB", "lower", ["qemu"]),
    (5, "net-2cpu", "cpu-rx", "Network, 2 vCPUs, 2 queue pairs: lab CPU per GiB, host → guest", "s/GiB", "lower", ["qemu"]),
    (5, "net", "exits-tx", "Network: guest exits per MiB, guest → host", "exits/MiB", "lower", ["qemu"]),
    (5, "net", "irqs-tx", "Network: interrupts injected per MiB, guest → host", "irqs/MiB", "lower", ["qemu"]),
    (5, "net", "exits-rx", "Network: guest exits per MiB, host → guest", "exits/MiB", "lower", ["qemu"]),
    (5, "net", "irqs-rx", "Network: interrupts injected per MiB, host → guest", "irqs/MiB", "lower", ["qemu"]),
    (5, "net-vhost", "exits-tx", "Network, both vhost=on: guest exits per MiB, guest → host", "exits/MiB", "lower", ["qemu-vhost"]),
    (5, "net-vhost", "irqs-tx", "Network, both vhost=on: interrupts injected per MiB, guest → host", "irqs/MiB", "lower", ["qemu-vhost"]),
    (5, "net-vhost", "exits-rx", "Network, both vhost=on: guest exits per MiB, host → guest", "exits/MiB", "lower", ["qemu-vhost"]),
    (5, "net-vhost", "irqs-rx", "Network, both vhost=on: interrupts injected per MiB, host → guest", "irqs/MiB", "lower", ["qemu-vhost"]),
    (5, "net-2cpu", "exits-tx", "Network, 2 vCPUs, 2 queue pairs: guest exits per MiB, guest → host", "exits/MiB", "lower", ["qemu"]),
    (5, "net-2cpu", "irqs-tx", "Network, 2 vCPUs, 2 queue pairs: interrupts injected per MiB, guest → host", "irqs/MiB", "lower", ["qemu"]),
    (5, "net-2cpu", "exits-rx", "Network, 2 vCPUs, 2 queue pairs: guest exits per MiB, host → guest", "exits/MiB", "lower", ["qemu"]),
    (5, "net-2cpu", "irqs-rx", "Network, 2 vCPUs, 2 queue pairs: interrupts injected per MiB, host → guest", "irqs/MiB", "lower", ["qemu"]),
    (6, "exits-host", "unhandled-port", "Exit cost, this host's KVM: write to an unhandled port", "ns", "lower", ["bare"]),
    (6, "exits-host", "device-port", "Exit cost, this host's KVM: write to a device port (UART)", "ns", "lower", ["bare"]),
    (6, "exits-lab", "unhandled-port", "Exit cost, lab KVM: write to an unhandled port", "ns", "lower", ["bare"]),
    (6, "exits-lab", "device-port", "Exit cost, lab KVM: write to a device port (UART)", "ns", "lower", ["bare"]),
    (7, "density", "all-init", "Density, {density_vms} × {density_mib} MiB at once: all at /init", "ms", "lower", ["qemu"]),
    (7, "density", "total-rss", "Density, {density_vms} × {density_mib} MiB at once: total RSS at idle", "MiB", "lower", ["qemu"]),
    (8, "vsock", "stream-tx", "vsock: stream guest → host (QEMU: vhost-vsock)", "MiB/s", "higher", ["qemu"]),
    (8, "vsock", "stream-rx", "vsock: stream host → guest (QEMU: vhost-vsock)", "MiB/s", "higher", ["qemu"]),
    (8, "vsock", "stream-rr", "vsock: 1-byte request/response (QEMU: vhost-vsock)", "trans/s", "higher", ["qemu"]),
    (9, "usernet", "tcp-tx", "User network: TCP guest → host (lguest: passt; QEMU: slirp, or the same passt)", "MiB/s", "higher", ["qemu", "qemu-passt"]),
    (9, "usernet", "tcp-rx", "User network: TCP host → guest, forwarded port", "MiB/s", "higher", ["qemu", "qemu-passt"]),
    (9, "usernet", "tcp-rx-short", "User network: TCP host → guest, one 32 KiB stream (latency-bound)", "MiB/s", "higher", ["qemu", "qemu-passt"]),
    (9, "usernet", "tcp-rr", "User network: 1-byte TCP request/response", "trans/s", "higher", ["qemu", "qemu-passt"]),
    (10, "snapshot-256m", "save", "Snapshot, 256 MiB: pause + save (QEMU: migrate to a file)", "ms", "lower", ["qemu"]),
    (10, "snapshot-256m", "restore-answer", "Snapshot, 256 MiB: restore, process start → the guest answers", "ms", "lower", ["qemu"]),
    (10, "snapshot-256m", "files-on-disk", "Snapshot, 256 MiB: the files' space on disk", "MiB", "lower", ["qemu"]),
    (10, "snapshot-256m", "state-file", "Snapshot, 256 MiB: lguest's state file", "KiB", "lower", []),
    (10, "snapshot-256m", "memory-file-length", "Snapshot, 256 MiB: lguest's memory file, length (sparse)", "MiB", "lower", []),
    (10, "snapshot-256m", "diff-save", "Snapshot, 256 MiB: pause + Diff snapshot, 2 s after the Full one", "ms", "lower", []),
    (10, "snapshot-256m", "diff-memory-on-disk", "Snapshot, 256 MiB: the Diff's memory file on disk", "KiB", "lower", []),
    (10, "snapshot-2g", "save", "Snapshot, 2 GiB: pause + save (QEMU: migrate to a file)", "ms", "lower", ["qemu"]),
    (10, "snapshot-2g", "restore-answer", "Snapshot, 2 GiB: restore, process start → the guest answers", "ms", "lower", ["qemu"]),
    (10, "snapshot-2g", "files-on-disk", "Snapshot, 2 GiB: the files' space on disk", "MiB", "lower", ["qemu"]),
    (10, "snapshot-2g", "state-file", "Snapshot, 2 GiB: lguest's state file", "KiB", "lower", []),
    (10, "snapshot-2g", "memory-file-length", "Snapshot, 2 GiB: lguest's memory file, length (sparse)", "MiB", "lower", []),
    (10, "snapshot-2g", "diff-save", "Snapshot, 2 GiB: pause + Diff snapshot, 2 s after the Full one", "ms", "lower", []),
    (10, "snapshot-2g", "diff-memory-on-disk", "Snapshot, 2 GiB: the Diff's memory file on disk", "KiB", "lower", []),
    (11, "fs", "untar", "Shared directory: untar 5 000 files (lguest: virtio-fs; QEMU: 9p; virtme-ng: virtiofsd)", "ms", "lower", ["qemu", "vng"]),
    (11, "fs", "find", "Shared directory: find the 5 051 entries", "ms", "lower", ["qemu", "vng"]),
    (11, "fs", "read", "Shared directory: read every file (24 MB)", "ms", "lower", ["qemu", "vng"]),
    (11, "fs", "rm", "Shared directory: rm -rf the tree", "ms", "lower", ["qemu", "vng"]),
    (11, "fs", "total", "Shared directory: the four phases in all", "ms", "lower", ["qemu", "vng"]),
    (12, "exec", "true", "Run one command in a throwaway VM: `exec -- true`, process start → exit (peer: virtme-ng on QEMU)", "ms", "lower", ["vng"]),
    (12, "exec", "vmm-share", "`lguest exec -- true`: the VMM's share (up to the first KVM_RUN, and CMD's end → VM stopped)", "ms", "lower", []),
    (12, "exec", "initramfs", "`lguest exec -- true`: start → initramfs built", "ms", "lower", []),
    (12, "exec", "vm-built", "`lguest exec -- true`: start → VM built (kernel loaded)", "ms", "lower", []),
    (12, "exec", "first-kvm-run", "`lguest exec -- true`: start → first KVM_RUN", "ms", "lower", []),
    (12, "exec", "init-connected", "`lguest exec -- true`: start → guest init connected (modules loaded, root mounted)", "ms", "lower", []),
    (12, "exec", "cmd-started", "`lguest exec -- true`: start → CMD started", "ms", "lower", []),
    (12, "exec", "cmd-exited", "`lguest exec -- true`: start → CMD exited", "ms", "lower", []),
    (12, "exec", "vm-stopped", "`lguest exec -- true`: start → VM stopped", "ms", "lower", []),
]
PEER_NAMES = {"lguest-mq": "lguest queues=2", "qemu": "QEMU", "qemu-vhost": "QEMU vhost=on", "qemu-uring": "QEMU aio=io_uring",
              "bare": "bare KVM_RUN loop", "vng": "virtme-ng"}


def parse(lines):
    samples, units, notes, params = {}, {}, [], {}
    for line in lines:
        line = line.strip()
        if line.startswith("BENCH "):
            f = dict(re.findall(r"(\w+)=(\S+)", line))
            try:
                value = float(f["value"])
            except (KeyError, ValueError):
                notes.append(f"unreadable line: {line}")
                continue
            key = (f.get("row"), f.get("metric"))
            samples.setdefault(key + (f.get("vmm"),), []).append(value)
            units[key] = f.get("unit", "")
        elif line.startswith("BENCH-NOTE "):
            m = re.match(r"BENCH-NOTE row=(\S+) (.*)", line)
            if m:
                notes.append(f"{m.group(1)}: {m.group(2)}")
        elif line.startswith("BENCH-PARAM "):
            for k, v in re.findall(r"(\w+)=(\S+)", line):
                params[k] = v
    return samples, units, notes, params


def stats(values):
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values), "samples": values}


def num(x):
    if x is None:
        return "n/a"
    a = abs(x)
    if x == int(x) and a < 100:
        return f"{x:.0f}"  # a count: 0 or 7, not 0.00 or 7.00
    return f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}"


def cell(s):
    return "n/a" if s is None else f"{num(s['median'])} ({num(s['min'])}–{num(s['max'])})"


# Row 4's tests (bench/guest/init's disk scenario): metric, what it is, unit.
DISK_TESTS = [("seq-read", "sequential read, 1 MiB × 4", "MiB/s"), ("seq-write", "sequential write, 1 MiB × 4", "MiB/s"),
              ("rand-read", "random read, 4 KiB × 16", "IOPS"), ("rand-write", "random write, 4 KiB × 16", "IOPS")]


def disk_catalog():
    """Row 4: each test at 1 and 2 vCPUs with 1 and 4 fio jobs, against QEMU's aio=threads and
    aio=io_uring; its lab CPU-seconds per GiB, the guest's disk interrupts and the lab's KVM exits
    per I/O against QEMU's best (io_uring)."""
    both, best = ["qemu", "qemu-uring"], ["qemu-uring"]
    entries = []
    for row, cpus in (("disk", "1 vCPU"), ("disk-2cpu", "2 vCPUs")):
        for sfx, jobs in (("", "1 job"), ("-4j", "4 jobs")):
            for metric, what, unit in DISK_TESTS:
                where = f"Disk, {cpus}, {jobs}: {what}"
                # At 2 vCPUs, lguest's default (one queue) against itself with a queue per vCPU too.
                peers = both + ["lguest-mq"] if row == "disk-2cpu" else both
                entries.append((4, row, metric + sfx, where, unit, "higher", peers))
                entries.append((4, row, f"cpu-{metric}{sfx}", f"{where}: lab CPU per GiB", "s/GiB", "lower", best))
                entries.append((4, row, f"irq-{metric}{sfx}", f"{where}: guest interrupts per I/O", "irq/IO", "lower", best))
                entries.append((4, row, f"exits-{metric}{sfx}", f"{where}: lab KVM exits per I/O", "exits/IO", "lower", best))
    return entries


# Row 4 goes where its number says: before row 5's first line.
_row_5 = next(i for i, entry in enumerate(CATALOG) if entry[0] == 5)
CATALOG[_row_5:_row_5] = disk_catalog()

# bench/run.sh's row names → the row ids of the catalog they fill.
GROUPS = {"boot": ["boot-1cpu", "boot-2cpu", "startup"], "memory": ["memory-256m", "memory-2g", "memory-256m-4dev"],
          "disk": ["disk", "disk-2cpu"], "net": ["net", "net-vhost", "net-2cpu"], "exits": ["exits-host", "exits-lab"], "exits-host": ["exits-host"],
          "density": ["density"], "vsock": ["vsock"], "usernet": ["usernet"],
          "snapshot": ["snapshot-256m", "snapshot-2g"], "fs": ["fs"], "exec": ["exec"]}


def build(samples, units, params):
    lines = []
    wanted = params.get("rows")
    catalog = list(CATALOG)
    if wanted:
        ids = {i for group in wanted.split(",") for i in GROUPS.get(group, [group])}
        catalog = [entry for entry in catalog if entry[1] in ids]
    known = {(r, m) for _, r, m, *_ in CATALOG}
    for row, metric, _vmm in samples:  # anything the catalog does not know yet, at the end
        if (row, metric) not in known:
            known.add((row, metric))
            catalog.append((0, row, metric, f"{row}: {metric}", "", "lower", ["qemu"]))
    fmt = dict({"density_vms": "K", "density_mib": "M"}, **params)
    for number, row, metric, title, unit, better, peers in catalog:
        ours = stats(samples.get((row, metric, "lguest"), []))
        for peer in peers or [None]:
            theirs = stats(samples.get((row, metric, peer), [])) if peer else None
            ratio = ours["median"] / theirs["median"] if ours and theirs and theirs["median"] else None
            lines.append({
                "row": number, "id": f"{row}/{metric}", "title": title.format(**fmt),
                "unit": units.get((row, metric), unit), "better": better,
                "lguest": ours, "peer": peer, "peer_result": theirs,
                "ratio": round(ratio, 3) if ratio is not None else None,
            })
    return lines


def markdown(lines, notes, params):
    out = ["| # | measurement | unit | better | lguest median (min–max) | peer | peer median (min–max) | lguest/peer |",
           "|---|---|---|---|---|---|---|---|"]
    for l in lines:
        peer = PEER_NAMES.get(l["peer"], l["peer"] or "—")
        ratio = "n/a" if l["ratio"] is None else f"{l['ratio']:.2f}"
        peer_cell = cell(l["peer_result"]) if l["peer"] else "—"
        out.append(f"| {l['row'] or ''} | {l['title']} | {l['unit']} | {l['better']} | "
                   f"{cell(l['lguest'])} | {peer} | {peer_cell} | {ratio} |")
    if params:
        out += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in params.items())]
    if notes:
        out += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: summarize.py RAW MD JSON")
    raw, md_path, json_path = sys.argv[1:]
    with open(raw, encoding="utf-8", errors="replace") as f:
        samples, units, notes, params = parse(f)
    lines = build(samples, units, params)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown(lines, notes, params))
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump({"schema": 1, "params": params, "rows": lines, "notes": notes}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    caption = ", ".join(f"{k}={params[k]}" for k in ("date", "commit", "rows") if k in params)
    with open(os.path.splitext(md_path)[0] + ".svg", "w", encoding="utf-8") as f:
        f.write(chart.svg(lines, PEER_NAMES, caption))


if __name__ == "__main__":
    main()
