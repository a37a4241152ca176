"""bench/chart.py: draws bench/summarize.py's table lines as an SVG bar chart, one bar per
line that has a peer: the ratio lguest/peer of the medians, on a log scale so that 0.5× and
2× stand as far from 1.0 as each other, with 1.0 marked. The whisker spans the ratios the
samples allow at their extremes (lguest's min over the peer's max, to lguest's max over the
peer's min): a bar whose whisker crosses 1.0 is within the run's noise. Green where lguest
is ahead (below 1 for "lower is better" lines, above 1 for "higher"), red where behind.

Plain SVG text written here: a chart this simple needs no plotting library, and bench/run.sh
then needs nothing beyond python3 to draw it."""
import math
from xml.sax.saxutils import escape

WIDTH = 1280
LABEL_W = 640  # the measurement's title, left of the bars
PLOT_X, PLOT_W = LABEL_W + 50, WIDTH - LABEL_W - 100  # room for a value label on each side
BAR_H, GAP, TOP, BOTTOM = 16, 6, 34, 40
AHEAD, BEHIND = "#3a9a4a", "#c8473d"


class Axis:
    """A log axis from the power of two at or below the smallest ratio (or whisker end) to
    the one at or above the largest, at least 1/2 to 2; ratios beyond it are clamped."""

    def __init__(self, lines):
        ends = [r for line in lines for r in (line["ratio"], *(whisker(line) or ())) if r > 0]
        self.low = 2.0 ** min(-1, math.floor(math.log2(min(ends, default=1))))
        self.high = 2.0 ** max(1, math.ceil(math.log2(max(ends, default=1))))

    def x(self, ratio):
        clamped = min(max(ratio, self.low), self.high)
        span = math.log(self.high) - math.log(self.low)
        return PLOT_X + PLOT_W * (math.log(clamped) - math.log(self.low)) / span

    def ticks(self):
        power = round(math.log2(self.low))
        while 2.0 ** power <= self.high:
            yield 2.0 ** power
            power += 1


def whisker(line):
    """The (low, high) ratio the samples' extremes allow, or None without samples."""
    ours, theirs = line["lguest"], line["peer_result"]
    if not ours or not theirs or theirs["min"] <= 0 or theirs["max"] <= 0:
        return None
    return ours["min"] / theirs["max"], ours["max"] / theirs["min"]


def ahead(line):
    return line["ratio"] < 1 if line["better"] == "lower" else line["ratio"] > 1


def tick_label(ratio):
    return f"{ratio:g}×" if ratio >= 1 else f"1/{round(1 / ratio)}×"


def bar(line, y, peer_name, axis):
    """One measurement's label, bar from 1.0 to its ratio, whisker and value."""
    x_of = axis.x
    one, end = x_of(1), x_of(line["ratio"])
    colour = AHEAD if ahead(line) else BEHIND
    label = f"{line['title']} vs {peer_name} ({line['better']} is better)"
    mid = y + BAR_H / 2
    parts = [
        f'<text x="{LABEL_W - 8}" y="{mid + 4}" text-anchor="end">{escape(label)}</text>',
        f'<rect x="{min(one, end):.1f}" y="{y}" width="{max(abs(end - one), 1):.1f}" height="{BAR_H}" fill="{colour}"/>',
    ]
    spread = whisker(line)
    if spread:
        lo, hi = x_of(spread[0]), x_of(spread[1])
        parts += [f'<line x1="{lo:.1f}" y1="{mid}" x2="{hi:.1f}" y2="{mid}" stroke="#222"/>',
                  f'<line x1="{lo:.1f}" y1="{y + 3}" x2="{lo:.1f}" y2="{y + BAR_H - 3}" stroke="#222"/>',
                  f'<line x1="{hi:.1f}" y1="{y + 3}" x2="{hi:.1f}" y2="{y + BAR_H - 3}" stroke="#222"/>']
    value_x = max(end, x_of(spread[1]) if spread else end) + 4 if line["ratio"] >= 1 else \
        min(end, x_of(spread[0]) if spread else end) - 4
    anchor = "start" if line["ratio"] >= 1 else "end"
    parts.append(f'<text x="{value_x:.1f}" y="{mid + 4}" text-anchor="{anchor}">{line["ratio"]:.2f}</text>')
    return parts


def grid(axis, height):
    """The ratio ticks, their grid lines, and the 1.0 line at the bars' origin."""
    parts = []
    for tick in axis.ticks():
        x = axis.x(tick)
        parts += [f'<line x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{height - BOTTOM + 6}" stroke="#ddd"/>',
                  f'<text x="{x:.1f}" y="{height - BOTTOM + 20}" text-anchor="middle">{tick_label(tick)}</text>']
    one = axis.x(1)
    parts.append(f'<line x1="{one:.1f}" y1="{TOP - 10}" x2="{one:.1f}" y2="{height - BOTTOM + 8}" '
                 f'stroke="#000" stroke-width="1.5"/>')
    return parts


def svg(lines, peer_names, caption):
    """The whole chart for the table lines that have a ratio."""
    measured = [line for line in lines if line["ratio"] is not None]
    axis = Axis(measured)
    height = TOP + BOTTOM + len(measured) * (BAR_H + GAP)
    body = []
    for i, line in enumerate(measured):
        body += bar(line, TOP + i * (BAR_H + GAP), peer_names.get(line["peer"], line["peer"]), axis)
    head = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'font-family="sans-serif" font-size="11">',
            f'<rect width="{WIDTH}" height="{height}" fill="#fff"/>',
            f'<text x="{PLOT_X}" y="16" font-weight="bold">lguest / peer, median ratio '
            f'(log scale; whiskers: min–max; green: lguest ahead)</text>']
    foot = [f'<text x="8" y="{height - 6}" fill="#555">{escape(caption)}</text>', "</svg>"]
    return "\n".join(head + grid(axis, height) + body + foot) + "\n"
