//! Strings bound for size-limited columns: NUL bytes stripped (PostgreSQL rejects them in
//! text) and the rest cut to a number of characters on a character boundary, never
//! mid-UTF-8 sequence.

/// Strips NUL characters and truncates to at most `max_chars` characters.
pub fn column_text(value: &str, max_chars: usize) -> String {
    value
        .chars()
        .filter(|c| *c != '\0')
        .take(max_chars)
        .collect()
}

/// [`column_text`] for optional values.
pub fn column_text_opt(value: Option<&str>, max_chars: usize) -> Option<String> {
    value.map(|v| column_text(v, max_chars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_on_character_boundaries() {
        assert_eq!(column_text("héllo", 2), "hé");
        assert_eq!(column_text("日本語テキスト", 3), "日本語");
        assert_eq!(column_text("🦀🦀🦀", 1), "🦀");
    }

    #[test]
    fn strips_nul_bytes_before_counting() {
        assert_eq!(column_text("a\0b\0c", 2), "ab");
    }

    #[test]
    fn leaves_short_strings_alone() {
        assert_eq!(column_text("short", 32), "short");
        assert_eq!(column_text("", 32), "");
        assert_eq!(column_text_opt(None, 3), None);
    }
}
