//! The configuration loader (`Settings::from_sources`): TOML text plus an environment.
//!
//! Layout: the input split on NUL bytes (no TOML text or environment variable can hold one):
//! the first piece is the TOML file, each further piece a `NAME=value` variable. In a value,
//! `{secret}` stands for a canary the fuzzer never sees. Properties: no panic, whatever the
//! TOML and the variables; the same sources always give the same answer; a failure lists at
//! least one problem; accepted settings keep the limits validation promises; and an API key
//! (from a variable or from the key file) or the broker URL's password never shows in a
//! problem or in the settings' `Debug` form.
//!
//! `api_key_file` reads a file, so the target makes a scratch directory, [`SCRATCH_DIR`],
//! holding `key` (the canary) and `empty`, and skips inputs whose TOML names a key file
//! outside it: `/dev/zero` would only measure the machine's memory. (Not a relative path and
//! no change of directory: libFuzzer writes its corpus to relative paths.)

#![no_main]

use std::collections::HashMap;
use std::path::{Component, Path};
use std::sync::Once;

use enrichd_worker::config::{Settings, redact_url};
use libfuzzer_sys::fuzz_target;

const CANARY: &str = "CnRy9v2Kq7ZxW4";
const PLACEHOLDER: &str = "{secret}";

/// Where the key files live; fixed, so seeds and the dictionary can name them.
const SCRATCH_DIR: &str = "/tmp/enrichd-fuzz-config";

static SCRATCH: Once = Once::new();

fn make_scratch_dir() {
    SCRATCH.call_once(|| {
        let dir = Path::new(SCRATCH_DIR);
        std::fs::create_dir_all(dir).expect("scratch dir");
        std::fs::write(dir.join("key"), format!("{CANARY}\n")).expect("key file");
        std::fs::write(dir.join("empty"), "").expect("empty file");
    });
}

fuzz_target!(|data: &[u8]| {
    make_scratch_dir();
    let mut pieces = data.split(|b| *b == 0);
    let toml_text = String::from_utf8_lossy(pieces.next().unwrap_or_default()).into_owned();
    if !key_files_stay_inside(&toml_text) {
        return;
    }
    let mut env: HashMap<String, String> = HashMap::new();
    let mut secret_used_outside_keys = false;
    for piece in pieces {
        let piece = String::from_utf8_lossy(piece);
        let (name, value) = piece.split_once('=').unwrap_or((&piece, ""));
        if value.contains(PLACEHOLDER) && !is_secret_variable(name) {
            secret_used_outside_keys = true;
        }
        env.insert(name.to_owned(), value.replace(PLACEHOLDER, CANARY));
    }
    // The canary may show only when the fuzzer wrote it somewhere else on its own.
    let canary_checked =
        !secret_used_outside_keys && !String::from_utf8_lossy(data).contains(&CANARY[..6]);

    let first = Settings::from_sources(&toml_text, "fuzz.toml", &env);
    let second = Settings::from_sources(&toml_text, "fuzz.toml", &env);
    assert_eq!(first, second, "the same sources gave two answers");

    let shown = match &first {
        Ok(settings) => {
            check_settings(settings);
            let _ = redact_url(&settings.database_url);
            let _ = redact_url(settings.bus.as_ref().map_or("", |b| b.amqp_url.expose()));
            format!("{settings:?}")
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a failure without a problem");
            errors.to_string()
        }
    };
    if canary_checked {
        assert!(!shown.contains(CANARY), "a secret leaked: {shown}");
    }
    let _ = Settings::unknown_variables(&env);
    for value in env.values() {
        let _ = redact_url(value);
    }
});

/// Variables whose value is a secret: the API keys and the broker URL (which may carry a
/// password). The database URL is not one: the settings print it.
fn is_secret_variable(name: &str) -> bool {
    let name = name
        .strip_prefix("ENRICHD_")
        .or_else(|| name.strip_prefix("DECNET_"))
        .unwrap_or(name);
    name.ends_with("_API_KEY") || name == "ABUSECH_AUTH_KEY" || name == "AMQP_URL"
}

/// Whether every `api_key_file` the TOML names is inside [`SCRATCH_DIR`]. TOML that does not
/// parse is never read further, so it is fine.
fn key_files_stay_inside(text: &str) -> bool {
    let Ok(table) = text.parse::<toml::Table>() else {
        return true;
    };
    let Some(toml::Value::Table(providers)) = table.get("providers") else {
        return true;
    };
    providers.values().all(|section| {
        let Some(path) = section.get("api_key_file") else {
            return true;
        };
        // Not a string: the loader refuses it before reading anything.
        let Some(path) = path.as_str() else {
            return true;
        };
        Path::new(path)
            .strip_prefix(SCRATCH_DIR)
            .is_ok_and(|rest| rest.components().all(|c| matches!(c, Component::Normal(_))))
    })
}

/// What validation promises about accepted settings.
fn check_settings(settings: &Settings) {
    let url = settings.database_url.to_ascii_lowercase();
    assert!(
        ["sqlite://", "postgres://", "postgresql://"]
            .iter()
            .any(|s| url.starts_with(s))
    );
    if let Some(bus) = &settings.bus {
        let url = bus.amqp_url.expose().to_ascii_lowercase();
        assert!(url.starts_with("amqp://") || url.starts_with("amqps://"));
        assert!(bus.prefetch >= 1);
        assert!(!bus.ack_deadline.is_zero());
        for name in [&bus.exchange, &bus.queue] {
            assert!(!name.trim().is_empty() && name.len() <= 255);
        }
    }
    assert!(!settings.dns.timeout.is_zero());
    assert!((1..=10_000).contains(&settings.dns.concurrency));
    assert!(
        settings.providers.windows(2).all(|w| w[0].id < w[1].id),
        "providers not sorted unique"
    );
    for provider in &settings.providers {
        assert!(provider.rate_per_sec.is_finite() && provider.rate_per_sec >= 0.0);
        assert!((1..=1024).contains(&provider.concurrency));
        let url = provider.base_url.to_ascii_lowercase();
        assert!(url.starts_with("http://") || url.starts_with("https://"));
        assert!(!provider.base_url.ends_with('/'));
    }
    assert!(!settings.feodo_refresh.is_zero() && !settings.feodo_max_age.is_zero());
    assert!(!settings.ttl.is_zero() && !settings.poll_interval.is_zero());
}
