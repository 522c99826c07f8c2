//! Formatting of error chains for log lines and operator messages.

use std::error::Error;

/// Joins an error and its `source()` chain with `": "`, outermost first.
///
/// Errors display only their own layer (the cause sits in `#[source]`), so a log line needs the
/// whole chain to be useful.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn joins_every_layer_outermost_first() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&err), "outer: inner");
    }
}
