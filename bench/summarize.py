"""Turns stopwatch's STOPWATCH lines (stdin) into a Markdown table: per metric, lguest's and
QEMU's median, min and max, and the ratio of the medians (lguest/QEMU; below 1 is better)."""
import re
import statistics
import sys

title = sys.argv[1] if len(sys.argv) > 1 else "benchmark"
samples = {}  # (metric, vmm) -> [values]
for line in sys.stdin:
    fields = dict(re.findall(r"(\w+)=(\S+)", line))
    vmm = fields.get("label")
    if "marker" in fields and fields.get("ms", "none") != "none":
        samples.setdefault((f"start → {fields['marker']} (ms)", vmm), []).append(float(fields["ms"]))
    elif " exit " in line and fields.get("status") == "0":
        samples.setdefault(("start → exit (ms)", vmm), []).append(float(fields["ms"]))
        samples.setdefault(("peak RSS (MiB)", vmm), []).append(int(fields["maxrss_kib"]) / 1024)

def cell(values):
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f})"

print(f"### {title}\n")
print("| metric | lguest median (min–max) | QEMU median (min–max) | ratio |")
print("|---|---|---|---|")
for metric in dict.fromkeys(m for m, _ in samples):
    ours, theirs = samples.get((metric, "lguest"), []), samples.get((metric, "qemu"), [])
    ratio = f"{statistics.median(ours) / statistics.median(theirs):.2f}" if ours and theirs else "n/a"
    print(f"| {metric} | {cell(ours)} | {cell(theirs)} | {ratio} |")
