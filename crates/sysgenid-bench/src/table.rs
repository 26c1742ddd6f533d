//! The one table every scenario writes into: a row per figure, the
//! same-run baseline it is divided by, the goal for that ratio, and
//! whether it holds, or, when it does not, the measured reason.

/// How a figure is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds (printed as ns / µs / ms).
    Ns,
    /// Bytes (printed as B / MiB).
    Bytes,
}

/// `v` in `unit`, human readable.
pub fn fmt(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Ns if v < 1_000.0 => format!("{v:.2} ns"),
        Unit::Ns if v < 1_000_000.0 => format!("{:.1} µs", v / 1e3),
        Unit::Ns => format!("{:.2} ms", v / 1e6),
        Unit::Bytes if v < 1024.0 * 1024.0 => format!("{:.0} B", v),
        Unit::Bytes => format!("{:.2} MiB", v / (1024.0 * 1024.0)),
    }
}

struct Row {
    id: String,
    what: String,
    ours: String,
    baseline: String,
    ratio: Option<f64>,
    goal: String,
    holds: Option<bool>,
    /// Shown when the goal does not hold: what the scenario measured that
    /// explains it.
    why: Option<String>,
}

/// The result table, printed as Markdown at the end.
#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
    /// Paragraphs printed under the table.
    pub notes: Vec<String>,
}

impl Table {
    /// A row comparing `ours` with `base` (ratio ours/base), with an
    /// optional goal `ratio <= limit`. Attach the measured reason for a
    /// missed goal with [`Table::why`].
    #[allow(clippy::too_many_arguments)]
    pub fn ratio(
        &mut self,
        id: &str,
        what: &str,
        ours: f64,
        base_name: &str,
        base: f64,
        unit: Unit,
        goal: Option<f64>,
    ) -> &mut Self {
        let ratio = (base > 0.0).then(|| ours / base);
        self.rows.push(Row {
            id: id.into(),
            what: what.into(),
            ours: fmt(ours, unit),
            baseline: format!("{}: {}", base_name, fmt(base, unit)),
            ratio,
            goal: goal.map_or("—".into(), |g| format!("≤ {g}×")),
            holds: goal.and_then(|g| ratio.map(|r| r <= g)),
            why: None,
        });
        eprintln!(
            "  {id} {what}: {} vs {base_name} {} ({})",
            fmt(ours, unit),
            fmt(base, unit),
            ratio.map_or("-".into(), |r| format!("{r:.2}×"))
        );
        self
    }

    /// A row with an absolute value and no baseline.
    pub fn value(
        &mut self,
        id: &str,
        what: &str,
        ours: String,
        goal: &str,
        holds: Option<bool>,
    ) -> &mut Self {
        eprintln!("  {id} {what}: {ours}");
        self.rows.push(Row {
            id: id.into(),
            what: what.into(),
            ours,
            baseline: "—".into(),
            ratio: None,
            goal: goal.into(),
            holds,
            why: None,
        });
        self
    }

    /// The measured reason of the last row's goal, printed when it does not
    /// hold.
    pub fn why(&mut self, why: impl Into<String>) -> &mut Self {
        if let Some(row) = self.rows.last_mut() {
            row.why = Some(why.into());
        }
        self
    }

    /// (goals measured, goals that hold).
    pub fn goals(&self) -> (usize, usize) {
        let measured = self.rows.iter().filter(|r| r.holds.is_some()).count();
        let hold = self.rows.iter().filter(|r| r.holds == Some(true)).count();
        (measured, hold)
    }

    /// Prints the table and the notes as Markdown on stdout.
    pub fn print(&self) {
        println!("| # | measure | sysgenid | baseline (same run) | ratio | goal | holds |");
        println!("|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let holds = match (r.holds, &r.why) {
                (Some(true), _) => "holds".to_string(),
                (Some(false), Some(why)) => format!("**no**: {why}"),
                (Some(false), None) => "**no**".to_string(),
                (None, _) => "—".to_string(),
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.id,
                r.what,
                r.ours,
                r.baseline,
                r.ratio.map_or("—".into(), |x| format!("{x:.2}×")),
                r.goal,
                holds
            );
        }
        for n in &self.notes {
            println!();
            println!("{n}");
        }
    }
}
