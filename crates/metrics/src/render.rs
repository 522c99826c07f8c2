//! Prometheus text exposition format 0.0.4, and the help text of every enrichd series.

use std::fmt::Write as _;

use enrichd_core::metric_names as names;

use crate::registry::{Families, Family, Labels};

/// `# HELP` text per series name. Unknown names (tests, ad-hoc series) get a generic line so
/// every family still has one.
fn help(name: &str) -> &'static str {
    match name {
        names::EVENTS_CONSUMED => "Deliveries received from the work queue.",
        names::EVENTS_ACKED => "Deliveries acked.",
        names::EVENTS_DEAD_LETTERED => {
            "Deliveries republished to the dead-letter exchange, by reason."
        }
        names::LOOKUPS => "Provider lookups, by provider and outcome.",
        names::PROVIDER_LATENCY => "Provider call latency in seconds, by provider.",
        names::CACHE_HITS => {
            "Work skipped because stored state was fresh, by provider (ptr for reverse DNS)."
        }
        names::QUOTA_REMAINING => "Provider quota left, when known, by provider.",
        names::BREAKER_STATE => {
            "Circuit breaker state (0 closed, 1 half-open, 2 open), by provider."
        }
        names::BACKLOG => "Attackers with due work, as of the last backfill pass.",
        names::IN_FLIGHT => "Jobs in flight in this replica.",
        names::OUTBOX_DEPTH => "Outbox rows waiting to be published.",
        names::OUTBOX_OLDEST_AGE => "Age of the oldest unpublished outbox row in seconds.",
        names::PTR_LOOKUPS => "PTR lookups, by outcome.",
        _ => "enrichd series.",
    }
}

pub(crate) fn render(families: &Families) -> String {
    let mut out = String::with_capacity(4096);
    for (name, family) in families {
        let kind = match family {
            Family::Counter(s) | Family::Gauge(s) if s.is_empty() => continue,
            Family::Histogram(s) if s.is_empty() => continue,
            Family::Counter(_) => "counter",
            Family::Gauge(_) => "gauge",
            Family::Histogram(_) => "histogram",
        };
        // Writing to a String cannot fail; the results are ignored for that reason only.
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help(name)));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        match family {
            Family::Counter(series) => {
                for (labels, value) in series {
                    let value = value.load(std::sync::atomic::Ordering::Relaxed);
                    let _ = writeln!(out, "{name}{} {value}", label_set(labels, None));
                }
            }
            Family::Gauge(series) => {
                for (labels, value) in series {
                    let value = f64::from_bits(value.load(std::sync::atomic::Ordering::Relaxed));
                    let _ = writeln!(out, "{name}{} {}", label_set(labels, None), number(value));
                }
            }
            Family::Histogram(series) => {
                for (labels, histogram) in series {
                    let snapshot = histogram.snapshot();
                    for (bound, count) in &snapshot.cumulative {
                        let le = number(*bound);
                        let _ =
                            writeln!(out, "{name}_bucket{} {count}", label_set(labels, Some(&le)));
                    }
                    let count = snapshot.count;
                    let _ = writeln!(
                        out,
                        "{name}_bucket{} {count}",
                        label_set(labels, Some("+Inf"))
                    );
                    let _ = writeln!(
                        out,
                        "{name}_sum{} {}",
                        label_set(labels, None),
                        number(snapshot.sum)
                    );
                    let _ = writeln!(out, "{name}_count{} {count}", label_set(labels, None));
                }
            }
        }
    }
    out
}

/// `{a="x",b="y"}`, with `le` last when given; empty when there are no labels at all.
fn label_set(labels: &Labels, le: Option<&str>) -> String {
    if labels.is_empty() && le.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let pairs = labels
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(le.map(|le| ("le", le)));
    for (i, (name, value)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(name);
        out.push_str("=\"");
        escape_label_value(&mut out, value);
        out.push('"');
    }
    out.push('}');
    out
}

fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Go `ParseFloat` syntax, which Prometheus reads: Rust's `Display` except for the specials.
fn number(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value == f64::INFINITY {
        "+Inf".to_owned()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_enrichd_series_has_its_own_help_text() {
        for name in names::ALL {
            assert_ne!(help(name), help("not_an_enrichd_series"), "{name}");
        }
    }

    #[test]
    fn numbers_use_prometheus_spelling() {
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.0025), "0.0025");
        assert_eq!(number(-2.5), "-2.5");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NEG_INFINITY), "-Inf");
    }

    #[test]
    fn help_text_escapes_backslash_and_newline() {
        assert_eq!(escape_help("a\\b\nc\"d"), "a\\\\b\\nc\"d");
    }
}
