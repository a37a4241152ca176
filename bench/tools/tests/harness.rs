//! The benchmark harness itself, end to end, on this host: `bench/run.sh --rows exits-host`
//! (row 6 on this host's /dev/kvm, no lab) with this build's `exit-cost`, and the `lguest`
//! built beside it. It must print the Markdown table and write JSON that parses, with the
//! row's samples for the bare loop and for lguest. It checks what the harness produces,
//! never how fast anything was.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `command`, killing it and failing the test if it takes longer than `limit`.
fn run_with_deadline(mut command: Command, limit: Duration) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("output");
    let file = std::fs::File::create(&log).expect("create the log");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("dup the log"))
        .stderr(file)
        .spawn()
        .expect("start bench/run.sh");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bench/run.sh") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("bench/run.sh did not finish within {limit:?}:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.success(), std::fs::read_to_string(&log).expect("read the log"))
}

#[test]
fn run_sh_prints_a_table_and_writes_json_for_the_host_exit_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    let exit_cost = PathBuf::from(env!("CARGO_BIN_EXE_exit-cost"));
    std::os::unix::fs::symlink(&exit_cost, bin.join("exit-cost")).expect("link exit-cost");
    // `cargo test --workspace` (scripts/test.sh) builds lguest into the same directory.
    let lguest = exit_cost.with_file_name("lguest");
    let with_lguest = lguest.exists();
    if with_lguest {
        std::os::unix::fs::symlink(&lguest, bin.join("lguest")).expect("link lguest");
    } else {
        eprintln!("note: no lguest at {} (run with --workspace): bare loop only", lguest.display());
    }
    let out = dir.path().join("results");

    let mut command = Command::new(repo().join("bench/run.sh"));
    command.args(["--rows", "exits-host", "--quick", "--runs", "2", "--bin-dir"]).arg(&bin).arg("--out").arg(&out);
    let (ok, output) = run_with_deadline(command, Duration::from_secs(300));
    assert!(ok, "bench/run.sh failed:\n{output}");

    // The table, on stdout and in latest.md.
    let md = std::fs::read_to_string(out.join("latest.md")).expect("latest.md written");
    for text in ["| # | measurement |", "Exit cost, this host's KVM: write to an unhandled port", "bare KVM_RUN loop"] {
        assert!(md.contains(text), "no '{text}' in the table:\n{md}");
    }
    assert!(output.contains(md.lines().nth(2).expect("a first table line")), "the table was not printed:\n{output}");
    assert!(!md.contains("Boot,"), "rows that were not run are listed:\n{md}");

    // The JSON: valid, and with two samples per VMM for both measurements of the row; the SVG
    // chart drawn from the same lines.
    let check = r##"
import json, sys
data = json.load(open(sys.argv[1]))
with_lguest = sys.argv[2] == "1"
rows = {r["id"]: r for r in data["rows"]}
for metric in ("unhandled-port", "device-port"):
    row = rows["exits-host/" + metric]
    assert row["unit"] == "ns" and row["peer"] == "bare", row
    assert row["peer_result"]["runs"] == 2 and len(row["peer_result"]["samples"]) == 2, row
    if with_lguest:
        assert row["lguest"]["runs"] == 2 and row["ratio"] is not None, row
        assert row["lguest"]["min"] <= row["lguest"]["median"] <= row["lguest"]["max"], row
assert data["params"]["rows"] == "exits-host", data["params"]
# The chart beside it: one bar (a filled rect) per line with a ratio, and the 1.0 tick.
from xml.dom import minidom
chart = minidom.parse(sys.argv[3])
bars = [r for r in chart.getElementsByTagName("rect") if r.getAttribute("fill") != "#fff"]
texts = [t.firstChild.data for t in chart.getElementsByTagName("text") if t.firstChild]
assert len(bars) == sum(1 for r in data["rows"] if r["ratio"] is not None), (len(bars), texts)
assert "1×" in texts, texts
print("json ok")
"##;
    let json = out.join("latest.json");
    let result = Command::new("python3")
        .args(["-c", check])
        .arg(&json)
        .arg(if with_lguest { "1" } else { "0" })
        .arg(out.join("latest.svg"))
        .output()
        .expect("run python3 (bench/run.sh installs it)");
    assert!(
        result.status.success(),
        "latest.json is not what it should be: {}\n{}",
        String::from_utf8_lossy(&result.stderr),
        std::fs::read_to_string(&json).unwrap_or_default()
    );
}
