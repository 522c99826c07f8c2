//! ARCHITECTURE.md's message table is the actor protocol as written in
//! `src/messages.rs`: one row per message type, each with the sender → receiver, reply and
//! fate that open the message's doc comment. Adding, removing or changing a message without
//! the table (or the other way round) fails here.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test")]

use std::collections::BTreeMap;

/// A message's contract: "sender → receiver", the reply, the fate on failure.
type Contract = (String, String, String);

const MESSAGES: &str = include_str!("../src/messages.rs");
const ARCHITECTURE: &str = include_str!("../../../ARCHITECTURE.md");

/// Every `#[derive(.. Message)]` struct of messages.rs with the first paragraph of its doc.
fn from_source() -> BTreeMap<String, Contract> {
    let mut found = BTreeMap::new();
    let mut doc: Vec<String> = Vec::new();
    let mut in_first_paragraph = true;
    let mut is_message = false;
    for line in MESSAGES.lines() {
        let line = line.trim();
        if let Some(text) = line.strip_prefix("///") {
            let text = text.trim();
            if text.is_empty() {
                in_first_paragraph = false;
            } else if in_first_paragraph {
                doc.push(text.to_owned());
            }
            continue;
        }
        if line.starts_with("#[derive(") && line.contains("Message") {
            is_message = true;
            continue;
        }
        if line.starts_with("#[") {
            continue;
        }
        let declared = line
            .strip_prefix("pub struct ")
            .or_else(|| line.strip_prefix("pub(crate) struct "));
        if let (true, Some(rest)) = (is_message, declared) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name, contract(&doc.join(" ")));
        }
        doc.clear();
        in_first_paragraph = true;
        is_message = false;
    }
    found
}

/// "A → B; reply …; fate …" split in its three parts.
fn contract(text: &str) -> Contract {
    let mut parts = text
        .splitn(3, "; ")
        .map(|p| p.trim().trim_end_matches('.').to_owned());
    (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    )
}

/// The rows of the table under ARCHITECTURE.md's `## Messages` heading.
fn from_architecture() -> BTreeMap<String, Contract> {
    let section = ARCHITECTURE
        .split("\n## Messages\n")
        .nth(1)
        .expect("a `## Messages` section");
    let mut rows = BTreeMap::new();
    for line in section.lines().take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // `| `Name` | from → to | reply | fate |` splits into 6 cells, empty at both ends.
        if cells.len() != 6 || !cells[1].starts_with('`') {
            continue;
        }
        let name = cells[1].trim_matches('`').to_owned();
        let (route, reply, fate) = (cells[2], cells[3], cells[4]);
        rows.insert(
            name,
            (
                route.to_owned(),
                reply.trim_end_matches('.').to_owned(),
                fate.trim_end_matches('.').to_owned(),
            ),
        );
    }
    rows
}

#[test]
fn the_message_table_is_the_protocol_in_messages_rs() {
    let source = from_source();
    let table = from_architecture();
    assert!(source.len() >= 19, "messages found: {:?}", source.keys());
    for (name, (route, reply, fate)) in &source {
        assert!(
            route.contains(" → "),
            "{name}: its doc opens with `sender → receiver; …`"
        );
        assert!(
            reply.starts_with("reply") || reply.starts_with("no reply"),
            "{name}: the second part says the reply: {reply:?}"
        );
        assert!(
            !fate.is_empty(),
            "{name}: the third part says the fate on failure"
        );
    }
    let missing: Vec<&String> = source.keys().filter(|k| !table.contains_key(*k)).collect();
    let extra: Vec<&String> = table.keys().filter(|k| !source.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ARCHITECTURE.md's table lacks {missing:?} and has {extra:?} that messages.rs does not"
    );
    for (name, contract) in &source {
        assert_eq!(&table[name], contract, "{name}: table row and doc differ");
    }
}
