use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn settings(toml: &str, pairs: &[(&str, &str)]) -> Settings {
    Settings::from_sources(toml, "test.toml", &env(pairs)).expect("valid configuration")
}

fn problems(toml: &str, pairs: &[(&str, &str)]) -> Vec<String> {
    Settings::from_sources(toml, "test.toml", &env(pairs))
        .expect_err("invalid configuration")
        .0
        .into_iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn defaults_are_the_embedded_laptop_setup() {
    let s = settings("", &[]);
    assert_eq!(s.database_url, "sqlite://enrichd.db?mode=rwc");
    assert!(s.auto_migrate);
    assert_eq!(s.bus, None);
    assert!(s.dns.ptr_enabled);
    assert!(!s.dns.fcrdns);
    assert_eq!(s.dns.timeout, Duration::from_millis(2000));
    assert_eq!(s.dns.concurrency, 10);
    assert!(s.dns.servers.is_empty());
    let ids: Vec<_> = s.providers.iter().map(|p| p.id).collect();
    assert_eq!(ids, ProviderId::ALL);
    let greynoise = s.provider(ProviderId::Greynoise).unwrap();
    assert!((greynoise.rate_per_sec - 1.0 / 1.5).abs() < 1e-9);
    assert_eq!(greynoise.concurrency, 4);
    let abuseipdb = s.provider(ProviderId::Abuseipdb).unwrap();
    assert_eq!(abuseipdb.daily_quota, 1000);
    assert!((abuseipdb.rate_per_sec - 2.0).abs() < 1e-9);
    assert_eq!(s.ttl, Duration::from_secs(24 * 3600));
    assert_eq!(s.poll_interval, Duration::from_secs(60));
    assert_eq!(s.grace, Duration::from_secs(20));
    assert_eq!(s.feodo_refresh, Duration::from_secs(3600));
    assert_eq!(s.feodo_max_age, Duration::from_secs(86_400));
    assert_eq!(s.metrics_addr.to_string(), "127.0.0.1:9464");
}

#[test]
fn environment_beats_the_file_and_enrichd_beats_decnet() {
    let toml = r#"
        database_url = "postgres://file@127.0.0.1/file"
        ttl_hours = 12
        [dns]
        ptr_enabled = true
        timeout_ms = 500
    "#;
    let s = settings(
        toml,
        &[
            (
                "ENRICHD_DATABASE_URL",
                "postgres://env@127.0.0.1/env?sslmode=disable",
            ),
            ("DECNET_DATABASE_URL", "postgres://decnet@127.0.0.1/decnet"),
            ("DECNET_PTR_ENABLED", "false"),
            ("DECNET_TTL_HOURS", "6"),
        ],
    );
    assert_eq!(
        s.database_url,
        "postgres://env@127.0.0.1/env?sslmode=disable"
    );
    assert!(
        !s.dns.ptr_enabled,
        "the reference's kill switch is honoured"
    );
    assert_eq!(s.dns.timeout, Duration::from_millis(500), "file value kept");
    assert_eq!(
        s.ttl,
        Duration::from_secs(6 * 3600),
        "DECNET_ beats the file"
    );

    let s = settings(
        "",
        &[
            ("ENRICHD_PTR_ENABLED", "true"),
            ("DECNET_PTR_ENABLED", "false"),
        ],
    );
    assert!(s.dns.ptr_enabled);
}

#[test]
fn providers_list_parses_and_empty_means_none() {
    let s = settings("", &[("ENRICHD_PROVIDERS", "threatfox, greynoise")]);
    let ids: Vec<_> = s.providers.iter().map(|p| p.id).collect();
    assert_eq!(
        ids,
        [ProviderId::Greynoise, ProviderId::Threatfox],
        "contract order"
    );
    assert!(
        settings("", &[("ENRICHD_PROVIDERS", "")])
            .providers
            .is_empty()
    );
    let toml = "[providers]\nenabled = [\"feodo\"]\n";
    assert_eq!(settings(toml, &[]).providers.len(), 1);
}

#[test]
fn keys_come_from_the_environment_and_never_print() {
    let s = settings(
        "",
        &[
            ("ENRICHD_GREYNOISE_API_KEY", "gn-secret-1"),
            ("DECNET_ABUSEIPDB_API_KEY", "ab-secret-2"),
            ("ENRICHD_ABUSECH_AUTH_KEY", "ac-secret-3"),
        ],
    );
    let key = |id| {
        s.provider(id)
            .unwrap()
            .api_key
            .as_ref()
            .map(|k| k.expose().to_owned())
    };
    assert_eq!(key(ProviderId::Greynoise).as_deref(), Some("gn-secret-1"));
    assert_eq!(key(ProviderId::Abuseipdb).as_deref(), Some("ab-secret-2"));
    assert_eq!(
        key(ProviderId::Threatfox).as_deref(),
        Some("ac-secret-3"),
        "abuse.ch fallback"
    );
    assert_eq!(key(ProviderId::Feodo).as_deref(), Some("ac-secret-3"));
    let printed = format!("{s:?}");
    for secret in ["gn-secret-1", "ab-secret-2", "ac-secret-3"] {
        assert!(!printed.contains(secret), "{secret} leaked into Debug");
    }

    let s = settings(
        "",
        &[
            ("ENRICHD_THREATFOX_API_KEY", "tf-own"),
            ("ENRICHD_ABUSECH_AUTH_KEY", "ac-shared"),
        ],
    );
    let threatfox = s.provider(ProviderId::Threatfox).unwrap();
    assert_eq!(threatfox.api_key.as_ref().unwrap().expose(), "tf-own");
}

#[test]
fn a_key_in_the_file_is_refused() {
    let errors = problems("[providers.greynoise]\napi_key = \"oops\"\n", &[]);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("unknown field `api_key`"), "{errors:?}");
    assert!(!errors[0].contains("oops"));
}

#[test]
fn key_files_are_read_and_trimmed() {
    let dir = std::env::temp_dir().join(format!("enrichd-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("abuseipdb.key");
    std::fs::write(&path, "from-file-key\n").unwrap();
    let toml = format!(
        "[providers.abuseipdb]\napi_key_file = {:?}\n",
        path.display().to_string()
    );
    let s = settings(&toml, &[]);
    let abuseipdb = s.provider(ProviderId::Abuseipdb).unwrap();
    assert_eq!(
        abuseipdb.api_key.as_ref().unwrap().expose(),
        "from-file-key"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn providers_needing_a_key_without_one_are_disabled() {
    let s = settings("", &[("ENRICHD_GREYNOISE_API_KEY", "k")]);
    let reason = |id| s.provider(id).unwrap().disabled_reason();
    assert_eq!(
        reason(ProviderId::Greynoise),
        None,
        "greynoise works without a key too"
    );
    assert_eq!(reason(ProviderId::Feodo), None);
    let abuseipdb = reason(ProviderId::Abuseipdb).unwrap();
    assert!(
        abuseipdb.contains("ENRICHD_ABUSEIPDB_API_KEY"),
        "{abuseipdb}"
    );
    assert!(reason(ProviderId::Threatfox).is_some());
}

#[test]
fn every_problem_is_reported_at_once() {
    let errors = problems(
        "",
        &[
            ("ENRICHD_DATABASE_URL", "mysql://root:hunter2@db/x"),
            ("ENRICHD_AMQP_URL", "http://guest:guest@127.0.0.1"),
            ("ENRICHD_PREFETCH", "0"),
            ("ENRICHD_PROVIDERS", "greynoise,shodan"),
            ("ENRICHD_DNS_SERVERS", "127.0.0.1:5353,not-a-server"),
            ("ENRICHD_PTR_ENABLED", "maybe"),
            ("ENRICHD_EXCLUDE_CIDRS", "10.0.0.0/8,10.0.0.0/99"),
            ("ENRICHD_TTL_HOURS", "0"),
            ("ENRICHD_GREYNOISE_RATE_PER_SEC", "-1"),
            ("ENRICHD_METRICS_ADDR", "everywhere"),
        ],
    );
    assert_eq!(errors.len(), 10, "{errors:#?}");
    let all = errors.join("\n");
    for needle in [
        "database_url",
        "amqp_url",
        "prefetch",
        "shodan",
        "not-a-server",
        "ENRICHD_PTR_ENABLED",
        "10.0.0.0/99",
        "ttl_hours",
        "ENRICHD_GREYNOISE_RATE_PER_SEC",
        "metrics_addr",
    ] {
        assert!(all.contains(needle), "missing {needle} in {all}");
    }
    assert!(!all.contains("hunter2"), "a password leaked: {all}");
    assert!(
        errors.iter().all(|e| !e.contains('\n')),
        "one line per problem"
    );
}

#[test]
fn unknown_file_keys_and_bad_toml_are_errors() {
    assert!(problems("databse_url = \"x\"\n", &[])[0].contains("unknown field"));
    assert!(problems("[dns]\nservers = 3\n", &[])[0].starts_with("config: test.toml"));
    assert!(!problems("this is not toml", &[]).is_empty());
}

#[test]
fn unknown_enrichd_variables_are_listed_for_a_warning() {
    let e = env(&[
        ("ENRICHD_SERVICE_HOST", "10.0.0.1"),
        ("ENRICHD_DATABASE_URL", "sqlite://x.db"),
        ("ENRICHD_GREYNOISE_RATE_PER_SEC", "1"),
        ("DECNET_WHATEVER", "1"),
        ("PATH", "/bin"),
    ]);
    assert_eq!(Settings::unknown_variables(&e), ["ENRICHD_SERVICE_HOST"]);
    assert!(
        Settings::from_sources("", "t", &e).is_ok(),
        "a warning, not an error"
    );
}

#[test]
fn bus_settings_parse() {
    let s = settings(
        "",
        &[
            ("ENRICHD_AMQP_URL", "amqps://u:p@rabbit.example:5671/%2f"),
            ("ENRICHD_PREFETCH", "64"),
            ("ENRICHD_EXCHANGE", "decnet-test"),
        ],
    );
    let bus = s.bus.expect("bus configured");
    assert_eq!(bus.prefetch, 64);
    assert_eq!(bus.exchange, "decnet-test");
    assert_eq!(bus.queue, "enrich.attackers");
    assert_eq!(bus.ack_deadline, Duration::from_secs(30));
    assert!(!format!("{bus:?}").contains("u:p"));
}

#[test]
fn dns_servers_parse_from_env_and_file() {
    let s = settings(
        "",
        &[(
            "ENRICHD_DNS_SERVERS",
            "127.0.0.1:5353, [::1]:5354,127.0.0.2",
        )],
    );
    let servers: Vec<_> = s.dns.servers.iter().map(ToString::to_string).collect();
    assert_eq!(servers, ["127.0.0.1:5353", "[::1]:5354", "127.0.0.2:53"]);
    let s = settings("[dns]\nservers = [\"127.0.0.1:15353\"]\n", &[]);
    assert_eq!(s.dns.servers.len(), 1);
}

#[test]
fn redacts_passwords_in_urls() {
    assert_eq!(
        redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "amqp://guest:***@127.0.0.1:5672/%2f"
    );
    assert_eq!(
        redact_url("postgres://postgres@127.0.0.1/test?sslmode=disable"),
        "postgres://postgres@127.0.0.1/test?sslmode=disable"
    );
    assert_eq!(
        redact_url("postgres://u:p%40ss@h/db?x=a@b"),
        "postgres://u:***@h/db?x=a@b"
    );
    assert_eq!(
        redact_url("sqlite://enrichd.db?mode=rwc"),
        "sqlite://enrichd.db?mode=rwc"
    );
}

#[test]
fn shipped_example_config_parses_and_validates() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/enrichd.example.toml"
    );
    let text = std::fs::read_to_string(path).expect("deploy/enrichd.example.toml exists");
    let s = Settings::from_sources(&text, "enrichd.example.toml", &env(&[]))
        .unwrap_or_else(|e| panic!("example config is invalid:\n{e}"));
    assert!(s.bus.is_some(), "the example documents the bus section");
    assert_eq!(s.providers.len(), 4);
}
