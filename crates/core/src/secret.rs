//! Secrets (API keys) that must never reach a log line, an error message or a panic.

use std::fmt;

/// An API key. `Debug` and `Display` print `Secret(***)`; the value is reachable only through
/// [`Secret::expose`], which makes every use greppable.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a key. Surrounding whitespace is dropped: a trailing newline from a secret file
    /// would otherwise be sent in a header and rejected.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().trim().to_owned())
    }

    /// The raw key, for the one place that puts it in a request header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the key is empty (treated as "no key").
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let key = Secret::new(" hunter2-key\n");
        assert_eq!(format!("{key:?}"), "Secret(***)");
        assert_eq!(format!("{key}"), "***");
        assert!(!format!("{key:?} {key}").contains("hunter2"));
        assert_eq!(key.expose(), "hunter2-key");
    }
}
