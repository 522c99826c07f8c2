//! The deployment kit (`deploy/`) checked against the code it deploys.
//!
//! Every file under `deploy/` is parsed by its kind (YAML, JSON, TOML, systemd unit,
//! Dockerfile, env file, Markdown); a file of an unknown kind fails the test, so nothing new
//! escapes the checks. The checks tie the kit to the code: environment variable names to
//! `config::known_variables`, dashboard series to `metric_names::ALL`, command lines to the
//! clap `Cli`, and each environment a deployment builds to `Settings::from_sources`. Each
//! scanner has a negative self-check on an inline string, so a scanner that finds nothing
//! cannot pass silently.

// Helpers outside `#[test]` functions are test code too; a panic here is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use enrichd_core::metric_names;
use enrichd_worker::cli::Cli;
use enrichd_worker::config::{Settings, known_variables};
use serde::Deserialize;
use serde_json::Value as Json;
use serde_norway::Value as Yaml;

/// The metrics and probe port of the contract (SPEC §11: `0.0.0.0:9464` in deployments).
const METRICS_PORT: u16 = 9464;
/// `ENRICHD_GRACE_SECS` default; stop timeouts must exceed the grace actually configured.
const DEFAULT_GRACE_SECS: u64 = 20;
/// Histograms: their base name is no series; only `_bucket`, `_sum` and `_count` exist.
const HISTOGRAMS: [&str; 1] = [metric_names::PROVIDER_LATENCY];

// ===================================================================== loading the kit ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Yaml,
    Json,
    Toml,
    SystemdUnit,
    Dockerfile,
    EnvFile,
    Markdown,
    /// RabbitMQ's `key = value` configuration (`conf.d/*.conf`).
    RabbitConf,
}

fn classify(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?;
    if name == "Dockerfile" || name.ends_with(".Dockerfile") {
        return Some(Kind::Dockerfile);
    }
    if name == ".env.example" || name.ends_with(".env.example") {
        return Some(Kind::EnvFile);
    }
    match path.extension()?.to_str()? {
        "yaml" | "yml" => Some(Kind::Yaml),
        "json" => Some(Kind::Json),
        "toml" => Some(Kind::Toml),
        "service" => Some(Kind::SystemdUnit),
        "md" => Some(Kind::Markdown),
        "conf" => Some(Kind::RabbitConf),
        _ => None,
    }
}

struct File {
    /// Path relative to `deploy/`, for messages.
    rel: String,
    kind: Kind,
    text: String,
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn kit() -> Vec<File> {
    let root = deploy_dir();
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    let mut unknown = Vec::new();
    let mut files = Vec::new();
    for path in paths {
        let rel = path
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        // An operator's filled-in copies are not part of the kit (and must never be committed).
        if rel == ".env" || rel.ends_with("/.env") {
            continue;
        }
        match classify(&path) {
            Some(kind) => files.push(File {
                rel,
                kind,
                text: std::fs::read_to_string(&path).unwrap(),
            }),
            None => unknown.push(rel),
        }
    }
    assert!(
        unknown.is_empty(),
        "files under deploy/ that this test cannot parse (teach `classify` and add checks): {unknown:?}"
    );
    files
}

fn file<'a>(kit: &'a [File], rel: &str) -> &'a File {
    kit.iter()
        .find(|f| f.rel == rel)
        .unwrap_or_else(|| panic!("deploy/{rel} is missing"))
}

fn yaml_docs(text: &str, rel: &str) -> Vec<Yaml> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| {
            let mut value = Yaml::deserialize(doc).unwrap_or_else(|e| panic!("deploy/{rel}: {e}"));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("deploy/{rel}: {e}"));
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// One `[Section]`'s `Key=Value` lines, in order (systemd keys may repeat).
type Unit = BTreeMap<String, Vec<(String, String)>>;

fn parse_unit(text: &str) -> Result<Unit, String> {
    let mut unit = Unit::new();
    let mut section: Option<String> = None;
    for (n, line) in logical_lines(text, &['#', ';']) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            unit.entry(name.to_owned()).or_default();
            continue;
        }
        let Some(current) = section.as_ref() else {
            return Err(format!("line {n}: {line:?} before any [Section]"));
        };
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {n}: {line:?} is not Key=Value"));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("line {n}: {key:?} is not a unit key"));
        }
        unit.get_mut(current)
            .unwrap()
            .push((key.to_owned(), value.trim().to_owned()));
    }
    Ok(unit)
}

fn unit_values<'a>(unit: &'a Unit, section: &str, key: &str) -> Vec<&'a str> {
    unit.get(section)
        .map(|lines| {
            lines
                .iter()
                .filter(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// Non-blank, non-comment lines with `\` continuations joined, with their first line number.
fn logical_lines(text: &str, comment: &[char]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_none() && (line.is_empty() || line.starts_with(comment)) {
            continue;
        }
        let (start, mut joined) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(head) = line.strip_suffix('\\') {
            joined.push_str(head.trim_end());
            joined.push(' ');
            pending = Some((start, joined));
        } else {
            joined.push_str(line);
            out.push((start, joined));
        }
    }
    if let Some(rest) = pending {
        out.push(rest);
    }
    out
}

const DOCKERFILE_INSTRUCTIONS: [&str; 18] = [
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
    "MAINTAINER",
];

/// `(instruction, arguments)` per logical line.
fn parse_dockerfile(text: &str) -> Result<Vec<(String, String)>, String> {
    logical_lines(text, &['#'])
        .into_iter()
        .map(|(n, line)| {
            let (word, args) = line
                .split_once(char::is_whitespace)
                .unwrap_or((line.as_str(), ""));
            if DOCKERFILE_INSTRUCTIONS.contains(&word) {
                Ok((word.to_owned(), args.trim().to_owned()))
            } else {
                Err(format!(
                    "line {n}: {word:?} is not a Dockerfile instruction"
                ))
            }
        })
        .collect()
}

fn dockerfile_exec_form(args: &str, what: &str) -> Vec<String> {
    serde_json::from_str(args)
        .unwrap_or_else(|e| panic!("{what} must use the exec (JSON) form, got {args:?}: {e}"))
}

fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    logical_lines(text, &['#'])
        .into_iter()
        .map(|(n, line)| {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {n}: {line:?} is not KEY=VALUE"))?;
            if k.is_empty()
                || !k
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(format!("line {n}: {k:?} is not a variable name"));
            }
            Ok((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// Lines inside fenced code blocks; an unclosed fence is an error.
fn markdown_code_lines(text: &str) -> Result<Vec<String>, String> {
    let mut inside = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside;
        } else if inside {
            lines.push(line.to_owned());
        }
    }
    if inside {
        Err("unclosed ``` fence".into())
    } else {
        Ok(lines)
    }
}

// ========================================================================== scanners ===

/// `(prefix, name)` for every `ENRICHD_*`/`DECNET_*` variable named in `text`. Placeholders
/// such as `ENRICHD_*`, `ENRICHD_<PROVIDER>_API_KEY` or a `DECNET_` prefix on its own name no
/// variable and are skipped.
fn env_references(text: &str) -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for prefix in ["ENRICHD_", "DECNET_"] {
        for (at, _) in text.match_indices(prefix) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = text[at + prefix.len()..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            if name.is_empty() || name.ends_with('_') {
                continue;
            }
            found.push((prefix, name));
        }
    }
    found
}

fn unknown_env_references(text: &str, known: &BTreeSet<String>) -> Vec<String> {
    env_references(text)
        .into_iter()
        .filter(|(_, name)| !known.contains(name))
        .map(|(prefix, name)| format!("{prefix}{name}"))
        .collect()
}

/// Every `enrichd_*` series name in a Prometheus query or in text.
fn series_references(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("enrichd_") {
        if text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        found.push(name);
    }
    found
}

/// The exported series a reference names: histogram suffixes stripped, else `None`.
fn exported_series(reference: &str) -> Option<&'static str> {
    if let Some(name) = metric_names::ALL.iter().find(|n| **n == reference) {
        return (!HISTOGRAMS.contains(name)).then_some(*name);
    }
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| reference.strip_suffix(s))?;
    HISTOGRAMS.iter().find(|n| **n == base).copied()
}

/// Every string value anywhere in a JSON document, with its key.
fn json_strings<'a>(value: &'a Json, key: &str, out: &mut Vec<(String, &'a str)>) {
    match value {
        Json::String(s) => out.push((key.to_owned(), s)),
        Json::Array(items) => items.iter().for_each(|v| json_strings(v, key, out)),
        Json::Object(map) => map.iter().for_each(|(k, v)| json_strings(v, k, out)),
        _ => {}
    }
}

/// `enrichd` command lines: argv starting at the binary, from shell-ish text.
fn command_lines_in_shell(line: &str) -> Vec<Vec<String>> {
    let line = line.split(" #").next().unwrap_or_default();
    line.split(['|', ';'])
        .flat_map(|part| part.split("&&"))
        .filter_map(|part| {
            let words: Vec<&str> = part.split_whitespace().collect();
            let first = *words.first()?;
            (first == "enrichd" || first.ends_with("/enrichd")).then(|| {
                words
                    .iter()
                    .map(|w| w.trim_matches(['`', '\'', '"']).to_owned())
                    .collect()
            })
        })
        .collect()
}

fn parses_as_cli(argv: &[String]) -> Result<(), String> {
    let mut argv = argv.to_vec();
    argv[0] = "enrichd".into();
    Cli::try_parse_from(&argv)
        .map(|_| ())
        .map_err(|e| format!("{argv:?}: {}", e.kind()))
}

// ===================================================================== YAML helpers ===

fn y<'a>(value: &'a Yaml, path: &str) -> &'a Yaml {
    path.split('.').fold(value, |v, key| {
        v.get(key)
            .unwrap_or_else(|| panic!("missing `{key}` on the way to `{path}`"))
    })
}

fn y_str<'a>(value: &'a Yaml, path: &str) -> &'a str {
    y(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` is not a string"))
}

fn labels(value: &Yaml) -> BTreeMap<String, String> {
    value
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().unwrap().to_owned(),
                        v.as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn k8s_objects(kit: &[File]) -> Vec<(String, Yaml)> {
    kit.iter()
        .filter(|f| f.rel.starts_with("k8s/") && f.kind == Kind::Yaml)
        .flat_map(|f| {
            yaml_docs(&f.text, &f.rel)
                .into_iter()
                .map(|doc| (f.rel.clone(), doc))
        })
        .collect()
}

fn k8s_one<'a>(objects: &'a [(String, Yaml)], kind: &str) -> &'a Yaml {
    let found: Vec<_> = objects
        .iter()
        .filter(|(_, o)| o.get("kind").and_then(Yaml::as_str) == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind} in deploy/k8s, found {}",
        found.len()
    );
    &found[0].1
}

fn compose(kit: &[File]) -> Yaml {
    let f = file(kit, "compose.yaml");
    let mut docs = yaml_docs(&f.text, &f.rel);
    assert_eq!(docs.len(), 1, "compose.yaml is one document");
    docs.remove(0)
}

fn yaml_scalar(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        Yaml::Null => String::new(),
        other => panic!("{other:?} is not a scalar"),
    }
}

/// A compose `environment:` (map or `KEY=VALUE` list) as pairs.
fn compose_environment(service: &Yaml) -> Vec<(String, String)> {
    match service.get("environment") {
        None => Vec::new(),
        Some(Yaml::Mapping(m)) => m
            .iter()
            .map(|(k, v)| (yaml_scalar(k), yaml_scalar(v)))
            .collect(),
        Some(Yaml::Sequence(items)) => items
            .iter()
            .map(|i| {
                let s = yaml_scalar(i);
                let (k, v) = s.split_once('=').unwrap_or((&s, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect(),
        Some(other) => panic!("environment must be a map or a list, got {other:?}"),
    }
}

/// Compose interpolation (`${X}`, `${X:-default}`, `${X:?error}`) with values an operator
/// would put in `.env`: `sample(name)` or the default.
fn interpolate(text: &str, sample: &dyn Fn(&str) -> Option<String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = start
            + rest[start..]
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {text:?}"));
        let inner = &rest[start + 2..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner.split_once(":?").map_or(inner, |(n, _)| n), None),
        };
        out.push_str(
            &sample(name)
                .or(default.map(str::to_owned))
                .unwrap_or_default(),
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn grace_of(env: &HashMap<String, String>) -> u64 {
    env.get("ENRICHD_GRACE_SECS")
        .map_or(DEFAULT_GRACE_SECS, |v| v.parse().unwrap())
}

fn settings_from(env: &HashMap<String, String>, what: &str) -> Settings {
    Settings::from_sources("", what, env)
        .unwrap_or_else(|e| panic!("{what}: the environment it builds is rejected:\n{e}"))
}

/// Seconds in a systemd / compose duration such as `30s`, `1min`, `90`.
fn duration_secs(text: &str) -> u64 {
    let text = text.trim();
    let digits: String = text.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("{text:?} is not a duration"));
    match &text[digits.len()..] {
        "" | "s" | "sec" => n,
        "m" | "min" => n * 60,
        other => panic!("unit {other:?} in {text:?} not understood"),
    }
}

/// RabbitMQ's new-style configuration: `key = value` lines, `#` comments.
fn parse_rabbit_conf(text: &str) -> Result<HashMap<String, String>, String> {
    let mut settings = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: no `=` in {line:?}", n + 1))?;
        settings.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(settings)
}

// ============================================================================= tests ===

#[test]
fn every_deploy_file_is_of_a_known_kind_and_parses() {
    let kit = kit();
    let mut problems = Vec::new();
    for f in &kit {
        let result: Result<(), String> = match f.kind {
            Kind::Yaml => {
                let docs = yaml_docs(&f.text, &f.rel);
                if docs.is_empty() {
                    Err("no YAML document".into())
                } else {
                    Ok(())
                }
            }
            Kind::Json => serde_json::from_str::<Json>(&f.text)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::Toml => toml::from_str::<toml::Table>(&f.text)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Kind::SystemdUnit => parse_unit(&f.text).map(|_| ()),
            Kind::Dockerfile => parse_dockerfile(&f.text).map(|_| ()),
            Kind::EnvFile => parse_env_file(&f.text).map(|_| ()),
            Kind::Markdown => markdown_code_lines(&f.text).map(|_| ()),
            Kind::RabbitConf => parse_rabbit_conf(&f.text).map(|_| ()),
        };
        if let Err(e) = result {
            problems.push(format!("deploy/{}: {e}", f.rel));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The kit the contract asks for (SPEC §11) is all there.
    for rel in [
        "Dockerfile",
        "compose.yaml",
        "systemd/enrichd.service",
        "k8s/deployment.yaml",
        "grafana/enrichd.json",
        "enrichd.example.toml",
    ] {
        file(&kit, rel);
    }
}

#[test]
fn the_parsers_reject_malformed_files() {
    assert!(
        parse_unit("[Service]\nRestart on-failure\n").is_err(),
        "a line without ="
    );
    assert!(
        parse_unit("Restart=on-failure\n").is_err(),
        "a key outside a section"
    );
    assert!(
        parse_dockerfile("FROM x\nRUNN echo\n").is_err(),
        "a misspelt instruction"
    );
    assert!(
        parse_dockerfile("FROM x\nRUN a \\\n  && b\nCMD [\"run\"]\n").is_ok(),
        "continuations join"
    );
    assert!(
        parse_env_file("ENRICHD_GRACE_SECS 20\n").is_err(),
        "a line without ="
    );
    assert!(
        markdown_code_lines("```sh\nenrichd run\n").is_err(),
        "an unclosed fence"
    );
    assert_eq!(
        classify(Path::new("deploy/notes.txt")),
        None,
        "unknown kinds are refused"
    );
}

#[test]
fn every_environment_variable_named_in_the_kit_is_defined() {
    let known: BTreeSet<String> = known_variables().into_iter().collect();
    let kit = kit();
    let mut unknown = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &kit {
        for name in unknown_env_references(&f.text, &known) {
            unknown.push(format!("deploy/{}: {name}", f.rel));
        }
        seen.extend(env_references(&f.text).into_iter().map(|(_, n)| n));
    }
    assert!(
        unknown.is_empty(),
        "variables that enrichd does not define:\n{}",
        unknown.join("\n")
    );
    for expected in [
        "DATABASE_URL",
        "AMQP_URL",
        "METRICS_ADDR",
        "ABUSEIPDB_API_KEY",
        "GRACE_SECS",
    ] {
        assert!(
            seen.contains(expected),
            "the scanner found no ENRICHD_{expected} in the kit: {seen:?}"
        );
    }
}

#[test]
fn the_variable_scanner_catches_typos_and_skips_placeholders() {
    let known: BTreeSet<String> = known_variables().into_iter().collect();
    let text = "ENRICHD_DATABSE_URL=x\n  ${DECNET_GRACE_SEC:-20} ENRICHD_METRICS_ADDR=0.0.0.0:9464\n\
                ENRICHD_<PROVIDER>_API_KEY, ENRICHD_*, DECNET_*_API_KEY, MY_ENRICHD_FOO, ENRICHD_FEODO_*";
    assert_eq!(
        unknown_env_references(text, &known),
        vec!["ENRICHD_DATABSE_URL", "DECNET_GRACE_SEC"]
    );
    assert_eq!(
        env_references("- name: ENRICHD_METRICS_ADDR"),
        vec![("ENRICHD_", "METRICS_ADDR".to_owned())]
    );
    assert!(known.contains("GREYNOISE_API_KEY") && known.contains("ABUSECH_AUTH_KEY"));
}

#[test]
fn the_dashboard_uses_only_exported_series_and_shows_every_one() {
    let kit = kit();
    let dashboard: Json = serde_json::from_str(&file(&kit, "grafana/enrichd.json").text).unwrap();

    assert!(
        dashboard["schemaVersion"].as_u64().unwrap() >= 36,
        "schemaVersion"
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus");
    let ds_ref = format!("${{{}}}", datasource["name"].as_str().unwrap());

    let mut strings = Vec::new();
    json_strings(&dashboard, "", &mut strings);
    let mut problems = Vec::new();
    for (key, text) in &strings {
        for reference in series_references(text) {
            let in_expr = key == "expr";
            // Outside queries (descriptions) a histogram's base name is fine as prose.
            let ok = exported_series(&reference).is_some()
                || (!in_expr && metric_names::ALL.contains(&reference.as_str()));
            if !ok {
                problems.push(format!("{key}: {reference} is not an exported series"));
            }
        }
    }

    let panels: Vec<&Json> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    let mut ids = BTreeSet::new();
    let mut shown = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "panel id {} repeats",
            panel["id"]
        );
        assert_eq!(
            panel["datasource"]["uid"],
            ds_ref.as_str(),
            "{title}: panel data source"
        );
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            assert_eq!(
                target["datasource"]["uid"],
                ds_ref.as_str(),
                "{title}: target data source"
            );
            if expr.contains("histogram_quantile") {
                assert!(
                    expr.contains("_bucket") && expr.contains("le"),
                    "{title}: quantile needs buckets by le"
                );
            }
            shown.extend(
                series_references(expr)
                    .iter()
                    .filter_map(|r| exported_series(r)),
            );
        }
    }
    let missing: Vec<_> = metric_names::ALL
        .iter()
        .filter(|n| !shown.contains(*n))
        .collect();
    if !missing.is_empty() {
        problems.push(format!("series no panel shows: {missing:?}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_series_scanner_catches_typos_and_bare_histograms() {
    let expr = "sum(rate(enrichd_lookup_total[5m])) / enrichd_lookups_total + \
                histogram_quantile(0.5, rate(enrichd_provider_latency_seconds_bucket[5m])) + \
                enrichd_provider_latency_seconds + xenrichd_backlog";
    let refs = series_references(expr);
    assert_eq!(
        refs,
        vec![
            "enrichd_lookup_total",
            "enrichd_lookups_total",
            "enrichd_provider_latency_seconds_bucket",
            "enrichd_provider_latency_seconds"
        ]
    );
    let resolved: Vec<_> = refs.iter().map(|r| exported_series(r)).collect();
    assert_eq!(
        resolved,
        vec![
            None,
            Some(metric_names::LOOKUPS),
            Some(metric_names::PROVIDER_LATENCY),
            None
        ]
    );
    assert_eq!(
        exported_series("enrichd_lookups_total_bucket"),
        None,
        "only histograms have buckets"
    );
}

#[test]
fn the_image_runs_enrichd_as_non_root_with_metrics_on_9464() {
    let kit = kit();
    let lines = parse_dockerfile(&file(&kit, "Dockerfile").text).unwrap();
    let all = |instruction: &str| -> Vec<&str> {
        lines
            .iter()
            .filter(|(i, _)| i == instruction)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let froms = all("FROM");
    assert!(froms.len() >= 2, "multi-stage build");
    assert!(
        froms[0].starts_with("rust:1") && froms[0].contains("bookworm"),
        "builder: {}",
        froms[0]
    );
    assert!(
        froms.last().unwrap().starts_with("debian:bookworm-slim"),
        "runtime image"
    );
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("cargo build --release --locked -p enrichd-worker")),
        "release build of the worker with the lock file"
    );
    assert!(
        all("RUN").iter().any(|r| r.contains("ca-certificates")),
        "CA bundle for TLS"
    );

    let user = *all("USER").last().expect("a USER");
    let uid = user.split(':').next().unwrap_or_default();
    assert!(
        !["root", "0", ""].contains(&uid),
        "runs as non-root: {user}"
    );
    assert_eq!(all("EXPOSE"), vec![METRICS_PORT.to_string()]);

    let env: HashMap<String, String> = all("ENV")
        .iter()
        .flat_map(|args| args.split_whitespace())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV in KEY=VALUE form");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let settings = settings_from(&env, "Dockerfile ENV");
    assert_eq!(
        settings.metrics_addr,
        SocketAddr::from(([0, 0, 0, 0], METRICS_PORT))
    );

    let entrypoint = dockerfile_exec_form(all("ENTRYPOINT").last().unwrap(), "ENTRYPOINT");
    let cmd = dockerfile_exec_form(all("CMD").last().unwrap(), "CMD");
    assert_eq!(entrypoint, vec!["enrichd"]);
    assert_eq!(cmd, vec!["run"]);
}

/// A compose `enrichd migrate` service: once, after PostgreSQL is healthy.
fn check_compose_migration(name: &str, svc: &Yaml) {
    assert_eq!(y_str(svc, "restart"), "no", "{name}: migrations run once");
    assert_eq!(
        y_str(svc, "depends_on.postgres.condition"),
        "service_healthy"
    );
}

/// A compose `enrichd run` service; returns its replica count.
fn check_compose_worker(
    name: &str,
    svc: &Yaml,
    env: &HashMap<String, String>,
    settings: &Settings,
) -> u64 {
    let replicas = svc
        .get("deploy")
        .and_then(|d| d.get("replicas"))
        .map_or(1, |r| r.as_u64().unwrap());
    assert_eq!(
        y_str(svc, "restart"),
        "on-failure",
        "{name}: `stop` exits 0 and must not restart"
    );
    assert_eq!(
        y_str(svc, "depends_on.migrate.condition"),
        "service_completed_successfully",
        "{name}: waits for the migration"
    );
    assert_eq!(
        y_str(svc, "depends_on.rabbitmq.condition"),
        "service_healthy"
    );
    assert!(settings.bus.is_some(), "{name}: on the bus");
    assert!(
        !settings.auto_migrate,
        "{name}: the migrate service owns the schema"
    );
    assert_eq!(
        settings.metrics_addr,
        SocketAddr::from(([0, 0, 0, 0], METRICS_PORT)),
        "{name}"
    );
    let stop = duration_secs(y_str(svc, "stop_grace_period"));
    assert!(
        stop > grace_of(env),
        "{name}: stop_grace_period {stop}s must exceed the grace"
    );
    let exposed: Vec<String> = y(svc, "expose")
        .as_sequence()
        .unwrap()
        .iter()
        .map(yaml_scalar)
        .collect();
    assert_eq!(
        exposed,
        vec![METRICS_PORT.to_string()],
        "{name}: metrics port"
    );
    replicas
}

#[test]
fn compose_runs_brokers_a_one_shot_migration_and_three_workers() {
    let kit = kit();
    let compose = compose(&kit);
    let services = y(&compose, "services").as_mapping().unwrap();
    let service = |name: &str| {
        services
            .get(name)
            .unwrap_or_else(|| panic!("compose service {name}"))
    };

    assert!(
        y_str(service("rabbitmq"), "image").starts_with("rabbitmq:"),
        "RabbitMQ image"
    );
    assert!(
        y_str(service("rabbitmq"), "image").contains("management"),
        "management image"
    );
    assert!(
        y_str(service("postgres"), "image").starts_with("postgres:15"),
        "PostgreSQL 15"
    );
    for name in ["rabbitmq", "postgres"] {
        y(service(name), "healthcheck.test");
    }

    let sample = |name: &str| name.ends_with("PASSWORD").then(|| "s3cret".to_owned());
    let mut worker_replicas = 0;
    let mut migrations = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let Some(command) = svc.get("command") else {
            continue;
        };
        let command: Vec<String> = command
            .as_sequence()
            .unwrap()
            .iter()
            .map(yaml_scalar)
            .collect();
        let env: HashMap<String, String> = compose_environment(svc)
            .into_iter()
            .map(|(k, v)| (k, interpolate(&v, &sample)))
            .collect();
        let settings = settings_from(&env, &format!("compose service {name}"));
        assert!(
            settings.database_url.starts_with("postgres://"),
            "{name}: PostgreSQL"
        );
        assert!(
            settings.database_url.contains("sslmode=disable"),
            "{name}: sslmode=disable on the compose network"
        );
        assert!(
            svc.get("image").and_then(Yaml::as_str) == Some("enrichd:local")
                || svc.get("build").is_some(),
            "{name}: the enrichd image"
        );
        match command.first().map(String::as_str) {
            Some("migrate") => {
                migrations += 1;
                check_compose_migration(name, svc);
            }
            Some("run") => worker_replicas += check_compose_worker(name, svc, &env, &settings),
            other => panic!("{name}: unexpected enrichd command {other:?}"),
        }
    }
    assert_eq!(migrations, 1, "one migrate service");
    assert_eq!(worker_replicas, 3, "three worker replicas");
}

/// Probes and scraping all reach the metrics port, on the contract's paths.
fn check_metrics_port_probes_and_scraping(deployment: &Yaml, container: &Yaml) {
    let ports: BTreeMap<String, u64> = y(container, "ports")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                y_str(p, "name").to_owned(),
                y(p, "containerPort").as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports.get("metrics"),
        Some(&u64::from(METRICS_PORT)),
        "container port `metrics`"
    );
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = y(container, &format!("{probe}.httpGet"));
        assert_eq!(y_str(get, "path"), path, "{probe} path");
        let port = match y(get, "port") {
            Yaml::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("{probe}: no port named {name}")),
            other => other.as_u64().unwrap(),
        };
        assert_eq!(port, u64::from(METRICS_PORT), "{probe} port");
    }
    let annotations = labels(y(deployment, "spec.template.metadata.annotations"));
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&METRICS_PORT.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
}

#[test]
fn kubernetes_deployment_is_replicated_probed_and_reads_the_secret() {
    let kit = kit();
    let objects = k8s_objects(&kit);
    for (rel, object) in &objects {
        for key in ["apiVersion", "kind"] {
            assert!(object.get(key).is_some(), "deploy/{rel}: {key}");
        }
    }
    let deployment = k8s_one(&objects, "Deployment");
    let config_map = k8s_one(&objects, "ConfigMap");
    let secret = k8s_one(&objects, "Secret");

    assert!(
        y(deployment, "spec.replicas").as_u64().unwrap() > 1,
        "replicas > 1"
    );
    let pod = y(deployment, "spec.template.spec");
    let containers = y(pod, "containers").as_sequence().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // References resolve to objects in the kit.
    let env_from = y(container, "envFrom").as_sequence().unwrap();
    let secret_name = y_str(secret, "metadata.name");
    let config_name = y_str(config_map, "metadata.name");
    assert!(
        env_from
            .iter()
            .any(|e| e.get("secretRef").map(|r| y_str(r, "name")) == Some(secret_name)),
        "Secret reference"
    );
    assert!(
        env_from
            .iter()
            .any(|e| e.get("configMapRef").map(|r| y_str(r, "name")) == Some(config_name)),
        "ConfigMap reference"
    );

    // The environment the pod gets, with the Secret's placeholders, is a valid configuration.
    let mut env: HashMap<String, String> = HashMap::new();
    for source in [y(config_map, "data"), y(secret, "stringData")] {
        env.extend(labels(source));
    }
    for item in y(container, "env").as_sequence().unwrap() {
        env.insert(
            y_str(item, "name").to_owned(),
            y_str(item, "value").to_owned(),
        );
    }
    let settings = settings_from(&env, "the Deployment's environment");
    assert_eq!(
        settings.metrics_addr,
        SocketAddr::from(([0, 0, 0, 0], METRICS_PORT))
    );

    check_metrics_port_probes_and_scraping(deployment, container);

    // Drains get their time; the pod is locked down.
    let grace = y(pod, "terminationGracePeriodSeconds").as_u64().unwrap();
    assert!(
        grace > grace_of(&env),
        "terminationGracePeriodSeconds {grace} must exceed ENRICHD_GRACE_SECS"
    );
    assert_eq!(y(pod, "securityContext.runAsNonRoot").as_bool(), Some(true));
    assert_eq!(
        y(container, "securityContext.readOnlyRootFilesystem").as_bool(),
        Some(true)
    );
    assert_eq!(
        y(container, "securityContext.allowPrivilegeEscalation").as_bool(),
        Some(false)
    );
    assert_eq!(
        y(pod, "enableServiceLinks").as_bool(),
        Some(false),
        "no injected ENRICHD_SERVICE_* variables"
    );
    y(container, "resources.requests");
    y(container, "resources.limits");

    let argv: Vec<String> = y(container, "args")
        .as_sequence()
        .unwrap()
        .iter()
        .map(yaml_scalar)
        .collect();
    assert_eq!(argv, vec!["run"]);
    let template_labels = labels(y(deployment, "spec.template.metadata.labels"));
    assert!(
        selects(
            &labels(y(deployment, "spec.selector.matchLabels")),
            &template_labels
        ),
        "Deployment selector"
    );
}

#[test]
fn the_disruption_budget_selects_the_workers_and_not_the_migration() {
    let kit = kit();
    let objects = k8s_objects(&kit);
    let deployment = k8s_one(&objects, "Deployment");
    let pdb = k8s_one(&objects, "PodDisruptionBudget");
    let job = k8s_one(&objects, "Job");

    let selector = labels(y(pdb, "spec.selector.matchLabels"));
    assert!(
        selects(
            &selector,
            &labels(y(deployment, "spec.template.metadata.labels"))
        ),
        "PDB selects the workers"
    );
    assert!(
        !selects(&selector, &labels(y(job, "spec.template.metadata.labels"))),
        "PDB must not count migration pods"
    );
    assert!(
        pdb.get("spec")
            .is_some_and(|s| s.get("maxUnavailable").is_some() || s.get("minAvailable").is_some()),
        "a budget"
    );

    let container = &y(job, "spec.template.spec.containers")
        .as_sequence()
        .unwrap()[0];
    let argv: Vec<String> = y(container, "args")
        .as_sequence()
        .unwrap()
        .iter()
        .map(yaml_scalar)
        .collect();
    assert_eq!(argv, vec!["migrate"]);
    assert_ne!(y_str(job, "spec.template.spec.restartPolicy"), "Always");
}

#[test]
fn the_kustomization_applies_every_manifest_and_the_readme_says_scale_to_zero() {
    let kit = kit();
    let objects = k8s_objects(&kit);
    // A manifest the kustomization does not list is never deployed.
    let kustomization = objects
        .iter()
        .find(|(rel, _)| rel == "k8s/kustomization.yaml")
        .map(|(_, o)| o)
        .expect("k8s/kustomization.yaml");
    let listed: BTreeSet<String> = y(kustomization, "resources")
        .as_sequence()
        .unwrap()
        .iter()
        .map(yaml_scalar)
        .collect();
    let manifests: BTreeSet<String> = kit
        .iter()
        .filter(|f| {
            f.kind == Kind::Yaml && f.rel.starts_with("k8s/") && f.rel != "k8s/kustomization.yaml"
        })
        .map(|f| f.rel.trim_start_matches("k8s/").to_owned())
        .collect();
    assert_eq!(
        listed, manifests,
        "kustomization resources vs manifests in deploy/k8s"
    );

    let readme = &file(&kit, "k8s/README.md").text;
    assert!(
        readme.contains("--replicas=0"),
        "the README says to stop by scaling to zero"
    );
}

#[test]
fn no_secret_value_is_committed() {
    let kit = kit();
    let objects = k8s_objects(&kit);
    for (name, value) in labels(y(k8s_one(&objects, "Secret"), "stringData")) {
        assert!(
            value.contains("REPLACE_ME"),
            "Secret {name} must hold a placeholder, not a value"
        );
    }
    let is_secret = |name: &str| {
        name.ends_with("_API_KEY") || name.ends_with("_AUTH_KEY") || name.ends_with("PASSWORD")
    };
    for (name, value) in compose(&kit)
        .get("services")
        .and_then(Yaml::as_mapping)
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(compose_environment)
    {
        if is_secret(&name) {
            assert!(
                value.trim().starts_with("${") && value.trim().ends_with('}'),
                "compose {name} must come from .env"
            );
        }
    }
    for f in kit.iter().filter(|f| f.kind == Kind::EnvFile) {
        for (name, value) in parse_env_file(&f.text).unwrap() {
            if is_secret(&name) {
                assert!(
                    value.is_empty(),
                    "deploy/{}: {name} must be empty in an example",
                    f.rel
                );
            }
        }
    }
    let unit = parse_unit(&file(&kit, "systemd/enrichd.service").text).unwrap();
    for value in unit_values(&unit, "Service", "Environment") {
        assert!(
            !env_references(value).iter().any(|(_, n)| is_secret(n)),
            "keys belong in the EnvironmentFile"
        );
    }
}

#[test]
fn the_systemd_unit_is_hardened_and_restarts_only_on_failure() {
    let kit = kit();
    let unit = parse_unit(&file(&kit, "systemd/enrichd.service").text).unwrap();
    let one = |key: &str| -> &str {
        let values = unit_values(&unit, "Service", key);
        assert_eq!(values.len(), 1, "[Service] {key}= once, found {values:?}");
        values[0]
    };
    assert_eq!(
        one("Restart"),
        "on-failure",
        "a cluster-wide stop exits 0 and must stay stopped"
    );
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert!(
        ["strict", "full", "yes"].contains(&one("ProtectSystem")),
        "ProtectSystem"
    );
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "", "no capabilities");
    let dynamic = unit_values(&unit, "Service", "DynamicUser");
    let user = unit_values(&unit, "Service", "User");
    assert!(
        dynamic == ["yes"] || user.iter().any(|u| !u.is_empty() && *u != "root"),
        "a dedicated user (DynamicUser=yes or User=)"
    );
    assert_eq!(one("StateDirectory"), "enrichd");
    assert_eq!(
        one("EnvironmentFile").trim_start_matches('-'),
        "/etc/enrichd/enrichd.env"
    );
    let environment: HashMap<String, String> = unit_values(&unit, "Service", "Environment")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    let stop = duration_secs(one("TimeoutStopSec"));
    assert!(
        stop > grace_of(&environment),
        "TimeoutStopSec {stop}s must exceed ENRICHD_GRACE_SECS"
    );
    assert!(unit_values(&unit, "Install", "WantedBy").contains(&"multi-user.target"));

    // The environment file example plus Environment= is a valid configuration.
    let mut env: HashMap<String, String> =
        parse_env_file(&file(&kit, "systemd/enrichd.env.example").text)
            .unwrap()
            .into_iter()
            .collect();
    env.extend(environment);
    settings_from(&env, "systemd environment");
}

/// Every `enrichd` argv the kit runs or documents, with where it comes from.
fn kit_command_lines(kit: &[File]) -> Vec<(String, Vec<String>)> {
    let mut argvs: Vec<(String, Vec<String>)> = Vec::new();

    let docker = parse_dockerfile(&file(kit, "Dockerfile").text).unwrap();
    let last = |instruction: &str| {
        docker
            .iter()
            .rev()
            .find(|(i, _)| i == instruction)
            .map(|(_, a)| a.clone())
            .unwrap()
    };
    let entrypoint = dockerfile_exec_form(&last("ENTRYPOINT"), "ENTRYPOINT");
    let mut image_default = entrypoint.clone();
    image_default.extend(dockerfile_exec_form(&last("CMD"), "CMD"));
    argvs.push(("Dockerfile ENTRYPOINT + CMD".into(), image_default));

    for (name, svc) in y(&compose(kit), "services").as_mapping().unwrap() {
        if let Some(command) = svc.get("command").and_then(Yaml::as_sequence) {
            let mut argv = entrypoint.clone();
            argv.extend(command.iter().map(yaml_scalar));
            argvs.push((format!("compose {}", yaml_scalar(name)), argv));
        }
    }
    for (rel, object) in k8s_objects(kit) {
        let Some(spec) = object
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"))
        else {
            continue;
        };
        for container in y(spec, "containers").as_sequence().unwrap() {
            let mut argv = match container.get("command").and_then(Yaml::as_sequence) {
                Some(command) => command.iter().map(yaml_scalar).collect(),
                None => entrypoint.clone(),
            };
            argv.extend(
                container
                    .get("args")
                    .and_then(Yaml::as_sequence)
                    .into_iter()
                    .flatten()
                    .map(yaml_scalar),
            );
            argvs.push((format!("deploy/{rel}"), argv));
        }
    }
    let unit = parse_unit(&file(kit, "systemd/enrichd.service").text).unwrap();
    for key in [
        "ExecStart",
        "ExecStartPre",
        "ExecStartPost",
        "ExecReload",
        "ExecStop",
    ] {
        for value in unit_values(&unit, "Service", key) {
            argvs.push((
                format!("systemd {key}"),
                value
                    .trim_start_matches(['-', '@', '+', '!'])
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
            ));
        }
    }
    for f in kit.iter().filter(|f| f.kind == Kind::Markdown) {
        for line in markdown_code_lines(&f.text).unwrap() {
            for argv in command_lines_in_shell(&line) {
                argvs.push((format!("deploy/{}", f.rel), argv));
            }
        }
    }

    argvs
}

#[test]
fn every_enrichd_command_line_in_the_kit_parses() {
    let kit = kit();
    let argvs = kit_command_lines(&kit);

    let cli = Cli::command();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (source, argv) in &argvs {
        let Some(first) = argv.first() else {
            problems.push(format!("{source}: empty command"));
            continue;
        };
        if first != "enrichd" && !first.ends_with("/enrichd") {
            problems.push(format!("{source}: runs {first:?}, not enrichd"));
            continue;
        }
        if let Some(sub) = argv
            .iter()
            .skip(1)
            .scan(false, |skip, a| {
                let this = !*skip && !a.starts_with('-');
                *skip = a == "--config";
                Some((this, a))
            })
            .find_map(|(is_sub, a)| is_sub.then_some(a))
        {
            if cli.find_subcommand(sub).is_none() {
                problems.push(format!("{source}: `{sub}` is not an enrichd subcommand"));
            }
            used.insert(sub.clone());
        }
        if let Err(e) = parses_as_cli(argv) {
            problems.push(format!("{source}: {e}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for expected in ["run", "migrate", "check"] {
        assert!(
            used.contains(expected),
            "no `enrichd {expected}` found in the kit; the scan is broken: {argvs:?}"
        );
    }
}

#[test]
fn the_command_line_scanner_catches_unknown_subcommands() {
    let found = command_lines_in_shell(
        "enrichd migrat && /usr/local/bin/enrichd --config /x.toml run | tee log # enrichd nope",
    );
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        parses_as_cli(&found[0]).is_err(),
        "a misspelt subcommand is refused"
    );
    assert!(parses_as_cli(&found[1]).is_ok());
    assert!(
        command_lines_in_shell("kubectl -n enrichd scale deployment/enrichd --replicas=0")
            .is_empty()
    );
    assert!(Cli::command().find_subcommand("migrat").is_none());
    assert_eq!(duration_secs("30s"), 30);
    assert_eq!(duration_secs("2min"), 120);
}

#[test]
fn the_broker_refuses_bodies_far_over_the_contract_and_compose_mounts_that() {
    let kit = kit();
    let conf = parse_rabbit_conf(&file(&kit, "rabbitmq/enrichd.conf").text).unwrap();
    let max: usize = conf["max_message_size"].parse().unwrap();
    let contract = enrichd_bus::decode::MAX_BODY_BYTES;
    assert!(
        max > contract && max <= 2 * contract,
        "oversized events still reach the dead-letter queue, floods do not: {max}"
    );
    let compose = &file(&kit, "compose.yaml").text;
    assert!(
        compose.contains("./rabbitmq/enrichd.conf:/etc/rabbitmq/conf.d/"),
        "compose mounts it"
    );
}
