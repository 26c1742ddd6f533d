//! Runs the benchmark driver once in `--quick` mode: proves the harness
//! still works end to end (daemon start, forked watchers, every scenario,
//! the table, a verdict or a measured reason for every goal). It never
//! looks at a number: benchmarks are not timed tests.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quick_mode_runs_every_scenario_and_prints_the_table() {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_sysgenid-bench"));
    let daemon = exe.parent().expect("target dir").join("sysgenidd");
    if !daemon.exists() {
        eprintln!(
            "skipping: {} is not built (run `cargo build --workspace --bins` first)",
            daemon.display()
        );
        return;
    }
    let out = Command::new(&exe)
        .arg("--quick")
        .output()
        .expect("run sysgenid-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "sysgenid-bench --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.starts_with("| # | measure | sysgenid |"), "{stdout}");
    for scenario in 1..=7 {
        assert!(
            stdout.contains(&format!("\n| {scenario} | ")),
            "scenario {scenario} missing from the table:\n{stdout}"
        );
    }
    // Every row with a goal says "holds" or why not, from what it measured.
    let goal_rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("| ≤ "))
        .collect();
    assert!(goal_rows.len() >= 9, "too few goal rows:\n{stdout}");
    for row in goal_rows {
        let holds = row
            .trim_end_matches(" |")
            .rsplit(" | ")
            .next()
            .unwrap_or("");
        assert!(
            holds == "holds" || (holds.starts_with("**no**: ") && holds.len() > 20),
            "goal row without a verdict or a reason: {row}"
        );
    }
    // The restore window is measured on the real kmsg path.
    assert!(
        stdout.contains("restore window: kmsg record written → page shows it"),
        "{stdout}"
    );
}
