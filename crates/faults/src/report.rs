//! What the suite prints: per scenario its figures and checks as they happen, then one
//! closing `faults: N passed, M failed` line that CI reads.

/// The record of one scenario; every line is printed as it is added.
#[derive(Debug, Default)]
pub(crate) struct Report {
    checks: Vec<(String, bool)>,
}

impl Report {
    /// A scenario header.
    pub(crate) fn start(name: &str, what: &str) {
        println!("\n== {name}: {what}");
    }

    /// A progress line while waiting.
    pub(crate) fn progress(line: &str) {
        println!("   .. {line}");
    }

    /// A measured figure.
    pub(crate) fn figure(name: &str, value: impl std::fmt::Display) {
        println!("   figure  {name}: {value}");
    }

    /// A check: `ok` decides it, `detail` says what was seen.
    pub(crate) fn check(&mut self, name: &str, ok: bool, detail: impl std::fmt::Display) {
        println!(
            "   check   {name}: {} ({detail})",
            if ok { "ok" } else { "FAILED" }
        );
        self.checks.push((name.to_owned(), ok));
    }

    /// Whether every check so far passed.
    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|(_, ok)| *ok)
    }

    /// Checks that failed.
    pub(crate) fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| name.clone())
            .collect()
    }
}
