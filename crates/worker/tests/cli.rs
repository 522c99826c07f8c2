//! The `enrichd` binary as an operator meets it: exit codes, migrate on both backends, the
//! single-run lock on SQLite.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a failure is a test failure"
)]
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use enrichd_testkit::services::{postgres_server_url, require_postgres};

fn enrichd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_enrichd"));
    // A clean environment: only what each test sets, so a developer's ENRICHD_* never leaks in.
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("enrichd-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("enrichd runs")
}

#[test]
fn help_works_everywhere_and_usage_errors_exit_64() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["lookup", "--help"],
        vec!["backfill", "--help"],
        vec!["check", "--help"],
        vec!["dlq", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["dlq", "purge", "--help"],
    ] {
        let out = run(enrichd().args(&args));
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{args:?}"
        );
    }
    for args in [
        vec!["frobnicate"],
        vec!["lookup"],
        vec!["run", "--bogus"],
        vec![],
    ] {
        let out = run(enrichd().args(&args));
        assert_eq!(out.status.code(), Some(64), "{args:?}");
    }
}

#[test]
fn bad_configuration_exits_78_with_one_line_per_problem() {
    let out = run(enrichd()
        .arg("check")
        .env("ENRICHD_PROVIDERS", "greynoise,shodan")
        .env("ENRICHD_PREFETCH", "lots")
        .env("ENRICHD_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
        .env("ENRICHD_DATABASE_URL", "mysql://root:topsecret@db/x"));
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines.iter().all(|l| l.starts_with("config: ")), "{stderr}");
    assert!(!stderr.contains("topsecret"), "{stderr}");

    let dir = temp_dir("badfile");
    let file = dir.join("enrichd.toml");
    std::fs::write(&file, "[dns]\ntimeout_msec = 5\n").unwrap();
    let out = run(enrichd().arg("--config").arg(&file).arg("check"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout_msec"));
}

#[test]
fn migrate_creates_a_fresh_sqlite_file_and_check_reports_it() {
    let dir = temp_dir("sqlite");
    let url = format!("sqlite://{}?mode=rwc", dir.join("enrichd.db").display());
    let out = run(enrichd().arg("migrate").env("ENRICHD_DATABASE_URL", &url));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.join("enrichd.db").exists());
    // Twice is a no-op.
    let out = run(enrichd().arg("migrate").env("ENRICHD_DATABASE_URL", &url));
    assert_eq!(out.status.code(), Some(0));

    let out = run(enrichd()
        .arg("check")
        .env("ENRICHD_DATABASE_URL", &url)
        .env("ENRICHD_PROVIDERS", "abuseipdb")
        .env("ENRICHD_PTR_ENABLED", "false"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("database") && stdout.contains("schema current"),
        "{stdout}"
    );
    assert!(
        stdout.contains("abuseipdb") && stdout.contains("disabled"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bus") && stdout.contains("poll mode"),
        "{stdout}"
    );
}

#[test]
fn check_reports_an_unreachable_database_and_exits_1() {
    let out = run(enrichd().arg("check").env(
        "ENRICHD_DATABASE_URL",
        "postgres://postgres@127.0.0.1:1/none?sslmode=disable",
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreachable"));
}

#[test]
fn migrate_creates_the_tables_on_postgres() {
    if !require_postgres() {
        return;
    }
    let name = format!("enrichd_cli_{}", std::process::id());
    let admin = format!("{}/postgres?sslmode=disable", postgres_server_url());
    let psql = |sql: &str| {
        Command::new("psql")
            .args([&admin, "-Atc", sql])
            .output()
            .expect("psql runs")
    };
    psql(&format!("DROP DATABASE IF EXISTS {name}"));
    assert!(psql(&format!("CREATE DATABASE {name}")).status.success());
    let url = format!("{}/{name}?sslmode=disable", postgres_server_url());
    let out = run(enrichd().arg("migrate").env("ENRICHD_DATABASE_URL", &url));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tables = Command::new("psql")
        .args([
            &url,
            "-Atc",
            "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables \
             WHERE table_schema = 'public' AND table_name IN ('attackers', 'attacker_intel')",
        ])
        .output()
        .expect("psql");
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout).trim(),
        "attacker_intel,attackers"
    );
    psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
}

#[test]
fn a_second_run_on_one_sqlite_file_exits_1() {
    let dir = temp_dir("lock");
    let url = format!("sqlite://{}?mode=rwc", dir.join("enrichd.db").display());
    let mut first = enrichd()
        .arg("run")
        .env("ENRICHD_DATABASE_URL", &url)
        .env("ENRICHD_PROVIDERS", "")
        .env("ENRICHD_PTR_ENABLED", "false")
        .env("ENRICHD_METRICS_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("first run starts");
    // Wait until the first run holds the lock (observed by failing to take it ourselves).
    let lock = dir.join("enrichd.db.lock");
    let held = (0..600).any(|_| {
        let locked_by_other = std::fs::File::open(&lock)
            .is_ok_and(|f| matches!(f.try_lock(), Err(std::fs::TryLockError::WouldBlock)));
        if !locked_by_other {
            std::thread::sleep(Duration::from_millis(50));
        }
        locked_by_other
    });
    assert!(held, "the first run never took the lock");
    let second = run(enrichd()
        .arg("run")
        .env("ENRICHD_DATABASE_URL", &url)
        .env("ENRICHD_PROVIDERS", "")
        .env("ENRICHD_PTR_ENABLED", "false")
        .env("ENRICHD_METRICS_ADDR", "127.0.0.1:0"));
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("another `enrichd run` is already using"),
        "{stderr}"
    );
    first.kill().expect("stop the first run");
    let _ = first.wait();
}

#[test]
fn help_opens_with_what_enrichd_does_for_its_user() {
    let out = run(enrichd().arg("--help"));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("enrichd turns the IP addresses attacking your honeypots"),
        "{text}"
    );
    assert!(
        !text.contains("The enrichd binary"),
        "no crate description: {text}"
    );
}

/// Runs `enrichd args` on a pseudo-terminal (util-linux `script`), as a person at a shell
/// would, and returns everything it wrote there (stdout and stderr together).
fn on_a_terminal(dir: &std::path::Path, args: &str, extra_env: &[(&str, &str)]) -> String {
    let bin = env!("CARGO_BIN_EXE_enrichd");
    let mut cmd = Command::new("script");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "dumb")
        .current_dir(dir)
        .args(["-qec", &format!("{bin} {args}"), "/dev/null"]);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    String::from_utf8_lossy(&out.stdout).replace('\r', "")
}

#[test]
fn a_person_at_a_terminal_reads_text_and_a_pipe_gets_json() {
    let dir = temp_dir("terminal");
    let env = [("ENRICHD_PROVIDERS", ""), ("ENRICHD_PTR_ENABLED", "false")];

    // On a terminal: no JSON, no migration chatter; the table is all there is.
    let screen = on_a_terminal(&dir, "lookup 10.1.2.3", &env);
    assert!(!screen.contains("{\""), "no JSON on a terminal: {screen}");
    assert!(!screen.contains("Applying"), "no info chatter: {screen}");
    assert!(screen.contains("10.1.2.3"), "{screen}");

    // A warning still reaches the person, as a compact text line.
    let warned = on_a_terminal(
        &dir,
        "lookup 10.1.2.4",
        &[("ENRICHD_PROVIDERS", "threatfox")],
    );
    assert!(
        warned.contains("WARN") && warned.contains("Provider disabled."),
        "{warned}"
    );
    assert!(!warned.contains("{\""), "{warned}");

    // ENRICHD_LOG_FORMAT=json wins on a terminal.
    let forced = on_a_terminal(
        &dir,
        "lookup 10.1.2.5",
        &[
            ("ENRICHD_PROVIDERS", "threatfox"),
            ("ENRICHD_LOG_FORMAT", "json"),
        ],
    );
    assert!(forced.contains("{\"timestamp\""), "{forced}");

    // Not a terminal: JSON lines, info and up.
    let piped = run(enrichd()
        .env_remove("RUST_LOG")
        .env("ENRICHD_PROVIDERS", "")
        .env("ENRICHD_PTR_ENABLED", "false")
        .current_dir(&dir)
        .args(["lookup", "10.1.2.6"]));
    let stderr = String::from_utf8_lossy(&piped.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        serde_json::from_str::<serde_json::Value>(first).is_ok(),
        "JSON lines on a pipe: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
