//! Prometheus text (exposition format 0.0.4) from enrichd's `/metrics`, summed by series name
//! and labels.

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name (`enrichd_lookups_total`, `enrichd_provider_latency_seconds_count`).
    pub name: String,
    /// Its labels, in the order written.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    samples: Vec<Sample>,
}

impl Metrics {
    /// Parses exposition text; comments, blank lines and lines that are not samples are
    /// skipped.
    pub fn parse(text: &str) -> Self {
        Self {
            samples: text.lines().filter_map(parse_sample).collect(),
        }
    }

    /// Every sample.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The sum of `name`'s samples that carry every label in `labels` (any others too);
    /// `None` when no sample matches.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .reduce(|a, b| a + b)
    }

    /// [`Metrics::sum`] of a counter or gauge of whole numbers; 0 when no sample matches.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let value = self.sum(name, labels).unwrap_or(0.0);
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "counters are whole, non-negative numbers"
        )]
        let whole = value as u64;
        whole
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let (name, mut rest) = line.split_at(name_end);
    let mut labels = Vec::new();
    if let Some(inside) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inside)?;
        labels = parsed;
        rest = after;
    }
    // The value is the first field after the labels; a timestamp may follow it.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `label="value",...}` → the labels and what follows the `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once('=')?;
        let mut chars = after_key.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        text = &after_key[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP enrichd_lookups_total Provider lookups.
# TYPE enrichd_lookups_total counter
enrichd_lookups_total{outcome="ok",provider="greynoise"} 50
enrichd_lookups_total{outcome="ok",provider="feodo"} 7
enrichd_lookups_total{outcome="error",provider="greynoise"} 2
enrichd_events_acked_total 1000
enrichd_provider_latency_seconds_bucket{provider="greynoise",le="+Inf"} 52
enrichd_provider_latency_seconds_count{provider="greynoise"} 52 1700000000000
odd_label{reason="a \"quoted\", spaced} value"} 1.5

"#;

    #[test]
    fn sums_by_name_and_by_labels() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.sum("enrichd_lookups_total", &[]), Some(59.0));
        assert_eq!(
            m.sum(
                "enrichd_lookups_total",
                &[("outcome", "ok"), ("provider", "greynoise")]
            ),
            Some(50.0)
        );
        assert_eq!(
            m.sum("enrichd_lookups_total", &[("provider", "greynoise")]),
            Some(52.0)
        );
        assert_eq!(m.sum("enrichd_events_acked_total", &[]), Some(1000.0));
        assert_eq!(m.count("enrichd_events_acked_total", &[]), 1000);
        assert_eq!(m.count("enrichd_events_dead_lettered_total", &[]), 0);
        assert_eq!(
            m.sum(
                "enrichd_provider_latency_seconds_count",
                &[("provider", "greynoise")]
            ),
            Some(52.0),
            "a timestamp after the value is not the value"
        );
        assert_eq!(m.sum("enrichd_lookups", &[]), None, "names match whole");
        assert_eq!(
            m.sum("enrichd_lookups_total", &[("provider", "threatfox")]),
            None
        );
    }

    #[test]
    fn label_values_may_hold_quotes_commas_and_braces() {
        let m = Metrics::parse(TEXT);
        let odd = m.samples().iter().find(|s| s.name == "odd_label").unwrap();
        assert_eq!(
            odd.labels,
            vec![(
                "reason".to_owned(),
                r#"a "quoted", spaced} value"#.to_owned()
            )]
        );
        assert!((odd.value - 1.5).abs() < f64::EPSILON);
        assert_eq!(m.samples().len(), 7);
    }
}
