//! Figures, their targets and verdicts, printed as a table and written as JSON.

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

/// What a figure is held to.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub(crate) enum Target {
    /// The figure must reach this.
    AtLeast(f64),
    /// The figure must stay at or under this.
    AtMost(f64),
    /// The figure must be exactly this (within float noise).
    Exactly(f64),
}

impl Target {
    fn holds(self, value: f64) -> bool {
        match self {
            Self::AtLeast(t) => value >= t,
            Self::AtMost(t) => value <= t,
            Self::Exactly(t) => (value - t).abs() < 1e-9,
        }
    }

    fn text(self, unit: &str) -> String {
        match self {
            Self::AtLeast(t) => format!(">= {} {unit}", number(t)),
            Self::AtMost(t) => format!("<= {} {unit}", number(t)),
            Self::Exactly(t) => format!("== {} {unit}", number(t)),
        }
    }
}

/// The verdict on one figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Status {
    /// Met its target.
    Pass,
    /// Missed its target.
    Miss,
    /// A measurement without a target (a ceiling, a breakdown).
    Info,
    /// Could not be measured completely (timeout, a process died); the value is partial.
    Incomplete,
}

/// One measured number.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    /// Short name (`attackers_per_sec`).
    pub name: String,
    /// The number; `None` when it could not be measured.
    pub value: Option<f64>,
    /// Its unit.
    pub unit: String,
    /// What it is held to.
    pub target: Option<Target>,
    /// The verdict.
    pub status: Status,
    /// How it was measured, or why it is incomplete.
    pub note: String,
}

impl Figure {
    /// A figure without a target.
    pub(crate) fn info(name: &str, value: f64, unit: &str, note: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            value: Some(value),
            unit: unit.to_owned(),
            target: None,
            status: Status::Info,
            note: note.into(),
        }
    }

    /// A figure judged against `target`; `complete == false` makes it `Incomplete`.
    pub(crate) fn judged(
        name: &str,
        value: f64,
        unit: &str,
        target: Target,
        complete: bool,
        note: impl Into<String>,
    ) -> Self {
        let status = if !complete {
            Status::Incomplete
        } else if target.holds(value) {
            Status::Pass
        } else {
            Status::Miss
        };
        Self {
            name: name.to_owned(),
            value: Some(value),
            unit: unit.to_owned(),
            target: Some(target),
            status,
            note: note.into(),
        }
    }
}

/// One scenario's outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioReport {
    /// Scenario id (`backfill_postgres`).
    pub name: String,
    /// Wall time of the whole scenario, setup included.
    pub wall_secs: f64,
    /// The error that ended it early, if any.
    pub error: Option<String>,
    /// Its figures.
    pub figures: Vec<Figure>,
    /// Everything else worth keeping (CPU split, database counters, provider stats).
    pub details: Value,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// The machine and software versions.
    pub machine: Value,
    /// The knobs this run used.
    pub config: Value,
    /// RFC 3339 start time.
    pub started_at: String,
    /// Wall time of the run.
    pub wall_secs: f64,
    /// Scenarios in the order they ran.
    pub scenarios: Vec<ScenarioReport>,
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The human-readable table.
pub(crate) fn render(report: &Report) -> String {
    let mut rows: Vec<[String; 5]> = vec![[
        "scenario".into(),
        "figure".into(),
        "value".into(),
        "target".into(),
        "status".into(),
    ]];
    for scenario in &report.scenarios {
        if let Some(error) = &scenario.error {
            rows.push([
                scenario.name.clone(),
                "(error)".into(),
                error.chars().take(70).collect(),
                String::new(),
                "ERROR".into(),
            ]);
        }
        for figure in &scenario.figures {
            let value = figure
                .value
                .map_or_else(|| "-".into(), |v| format!("{} {}", number(v), figure.unit));
            let target = figure
                .target
                .map_or_else(String::new, |t| t.text(&figure.unit));
            let status = serde_json::to_value(figure.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            rows.push([
                scenario.name.clone(),
                figure.name.clone(),
                value,
                target,
                status,
            ]);
        }
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, w) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<w$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_judge_their_bounds() {
        assert_eq!(
            Figure::judged("x", 1000.0, "/s", Target::AtLeast(1000.0), true, "").status,
            Status::Pass
        );
        assert_eq!(
            Figure::judged("x", 999.0, "/s", Target::AtLeast(1000.0), true, "").status,
            Status::Miss
        );
        assert_eq!(
            Figure::judged("x", 1.5, "", Target::Exactly(1.0), true, "").status,
            Status::Miss
        );
        assert_eq!(
            Figure::judged("x", 90.0, "MiB", Target::AtMost(100.0), false, "").status,
            Status::Incomplete
        );
    }
}
