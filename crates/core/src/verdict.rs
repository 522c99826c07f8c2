//! Verdict labels and the aggregate rule.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A provider's opinion of an address. Ordered by severity: the aggregate is the most severe
/// opinion present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Seen, but nothing known for or against it.
    Unknown,
    /// Known and harmless (a research scanner, or reported only rarely).
    Benign,
    /// Reported for abuse, but not conclusively.
    Suspicious,
    /// Known bad.
    Malicious,
}

impl Verdict {
    /// Every verdict, least severe first.
    pub const ALL: [Self; 4] = [
        Self::Unknown,
        Self::Benign,
        Self::Suspicious,
        Self::Malicious,
    ];

    /// The stored and published label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Benign => "benign",
            Self::Suspicious => "suspicious",
            Self::Malicious => "malicious",
        }
    }

    /// Parses a stored label; anything else is `None`.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == label)
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The aggregate over stored verdicts of all providers: nulls ignored, then the first present
/// of `malicious` > `suspicious` > `benign` > `unknown`; `None` when no provider has one.
pub fn aggregate(verdicts: impl IntoIterator<Item = Option<Verdict>>) -> Option<Verdict> {
    verdicts.into_iter().flatten().max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Verdict::{Benign, Malicious, Suspicious, Unknown};

    #[test]
    fn aggregate_takes_the_most_severe_present_verdict() {
        let cases: &[(&[Option<Verdict>], Option<Verdict>)] = &[
            (&[], None),
            (&[None, None, None, None], None),
            (&[Some(Unknown)], Some(Unknown)),
            (&[Some(Unknown), None, Some(Benign)], Some(Benign)),
            (&[Some(Benign), Some(Suspicious), None], Some(Suspicious)),
            (
                &[
                    Some(Malicious),
                    Some(Benign),
                    Some(Unknown),
                    Some(Suspicious),
                ],
                Some(Malicious),
            ),
            (&[None, Some(Malicious)], Some(Malicious)),
        ];
        for (input, expected) in cases {
            assert_eq!(aggregate(input.iter().copied()), *expected, "{input:?}");
        }
    }

    #[test]
    fn labels_round_trip() {
        for v in Verdict::ALL {
            assert_eq!(Verdict::from_label(v.as_str()), Some(v));
        }
        assert_eq!(Verdict::from_label("MALICIOUS"), None);
        assert_eq!(
            serde_json::to_string(&Suspicious).unwrap(),
            "\"suspicious\""
        );
    }
}
