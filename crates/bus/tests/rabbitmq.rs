//! Against the real RabbitMQ on this machine, with uniquely named exchanges and queues so
//! tests run in parallel and never touch a deployment's topology.

use std::time::Duration;

use enrichd_bus::publish::{Outgoing, Publisher};
use enrichd_bus::{Topology, connect, decode};
use enrichd_core::Secret;
use enrichd_testkit::services::{amqp_url, require_rabbitmq};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};

fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", std::process::id()) + &format!(".{:x}", rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::thread::current().id())
}

/// A connection, a confirming publisher on it, and a freshly named topology declared.
#[expect(
    clippy::expect_used,
    reason = "test support: a failed setup is a failed test"
)]
async fn declared() -> (lapin::Connection, Publisher, Topology) {
    let url = Secret::new(amqp_url());
    let connection = connect(&url, "enrichd-bus-test").await.expect("connect");
    let publisher = Publisher::open(&connection).await.expect("publisher");
    let topology = Topology::new(&unique("t.decnet"), &unique("t.enrich.attackers"));
    topology.declare(&connection).await.expect("declare");
    (connection, publisher, topology)
}

/// A consumer of `queue` on `channel`, tagged `tag`.
#[expect(
    clippy::expect_used,
    reason = "test support: a failed setup is a failed test"
)]
async fn consume(channel: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_routes_events_and_dead_letters_poison_with_its_reason() {
    if !require_rabbitmq() {
        return;
    }
    let (connection, publisher, topology) = declared().await;
    // Declaring twice (a second replica) is accepted: same arguments.
    topology.declare(&connection).await.expect("redeclare");
    let control = topology
        .declare_control_queue(publisher.channel())
        .await
        .expect("control");
    assert!(control.starts_with("amq.gen-"), "server-named: {control}");

    let event = br#"{"v":1,"id":"0123456789abcdef0123456789abcdef","topic":"attacker.scored",
                    "type":"scored","ts":1.0,"payload":{"attacker_ip":"45.155.205.233"}}"#;
    publisher
        .publish(Outgoing::persistent(
            &topology.exchange,
            "attacker.scored",
            event,
        ))
        .await
        .expect("publish event");
    // Not bound: must not reach the work queue.
    publisher
        .publish(Outgoing {
            exchange: &topology.exchange,
            routing_key: "attacker.other",
            body: b"{}",
            message_id: None,
            persistent: false,
            expiration_ms: None,
            headers: None,
        })
        .await
        .expect("publish unrouted");

    let consume_channel = connection.create_channel().await.expect("channel");
    let mut consumer = consume(&consume_channel, &topology.queue, "t").await;
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(delivery.routing_key.as_str(), "attacker.scored");
    let request = decode(&delivery.data, delivery.routing_key.as_str()).expect("decodes");
    assert_eq!(request.ip.to_string(), "45.155.205.233");

    // Treat it as poison for the test: republish to the DLX, then ack the original.
    publisher
        .dead_letter(
            &topology.dead_letter_exchange,
            &topology.dead_queue,
            &delivery,
            &enrichd_bus::Poison::NotJson.into(),
        )
        .await
        .expect("dead-letter");
    delivery.ack(BasicAckOptions::default()).await.expect("ack");

    let mut dead = consume(&consume_channel, &topology.dead_queue, "d").await;
    let dead_letter = tokio::time::timeout(Duration::from_secs(10), dead.next())
        .await
        .expect("a dead letter within 10 s")
        .expect("stream open")
        .expect("delivery");
    assert_eq!(dead_letter.data, event);
    let headers = dead_letter.properties.headers().clone().expect("headers");
    assert_eq!(
        headers.inner().get("x-enrichd-reason"),
        Some(&AMQPValue::LongString("not json".into()))
    );
    assert_eq!(dead_letter.properties.delivery_mode(), &Some(2));
    assert_eq!(headers.inner().get("x-enrichd-truncated"), None);
    dead_letter
        .ack(BasicAckOptions::default())
        .await
        .expect("ack dead");

    topology.delete(&connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_is_kept_reported_and_consumed() {
    if !require_rabbitmq() {
        return;
    }
    let url = Secret::new(amqp_url());
    let connection = connect(&url, "enrichd-bus-test").await.expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let topology = Topology::new(&unique("t2.decnet"), &unique("t2.enrich.attackers"));
    // An older release's dead-letter queue: no byte bound.
    let mut old_arguments = FieldTable::default();
    old_arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    old_arguments.insert("x-max-length".into(), AMQPValue::LongInt(100_000));
    old_arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("drop-head".into()),
    );
    channel
        .queue_declare(
            topology.dead_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            old_arguments,
        )
        .await
        .expect("old declare");
    let mismatches = topology.declare(&connection).await.expect("no crash loop");
    assert_eq!(mismatches.len(), 1, "{mismatches:?}");
    let mismatch = &mismatches[0];
    assert_eq!(mismatch.queue, topology.dead_queue);
    assert!(
        mismatch.broker_says.contains("x-max-length-bytes"),
        "what differs: {mismatch:?}"
    );
    assert!(mismatch.migrate.contains("set_policy"), "{mismatch:?}");
    // Still usable: the binding is in place, so a dead letter reaches the old queue.
    let publisher = Publisher::open(&connection).await.expect("publisher");
    publisher
        .publish(Outgoing {
            exchange: &topology.dead_letter_exchange,
            routing_key: &topology.dead_queue,
            body: b"{}",
            message_id: None,
            persistent: true,
            expiration_ms: None,
            headers: None,
        })
        .await
        .expect("routed and confirmed");
    let depth = connection
        .create_channel()
        .await
        .expect("channel")
        .queue_declare(
            topology.dead_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive")
        .message_count();
    assert_eq!(depth, 1);
    topology.delete(&connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_url_is_an_error_without_the_password() {
    let url = Secret::new("amqp://guest:supersecret@127.0.0.1:1/%2f");
    let err = connect(&url, "t")
        .await
        .expect_err("nothing listens on port 1");
    let text = enrichd_core::error::chain(&err);
    assert!(!text.contains("supersecret"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_moves_letters_back_within_the_limit_and_purge_drops_the_rest() {
    if !require_rabbitmq() {
        return;
    }
    let url = Secret::new(amqp_url());
    let connection = connect(&url, "enrichd-bus-test").await.expect("connect");
    let publisher = Publisher::open(&connection).await.expect("publisher");
    let topology = Topology::new(&unique("t3.decnet"), &unique("t3.enrich.attackers"));
    topology.declare(&connection).await.expect("declare");
    for i in 0..5 {
        let body = format!(r#"{{"attacker_ip":"8.8.8.{i}"}}"#);
        publisher
            .publish(Outgoing::persistent(
                &topology.dead_letter_exchange,
                &topology.dead_queue,
                body.as_bytes(),
            ))
            .await
            .expect("seed dead letter");
    }
    let channel = connection.create_channel().await.expect("channel");
    let moved = enrichd_bus::dlq::replay(&publisher, &channel, &topology, Some(2))
        .await
        .unwrap();
    assert_eq!(moved, 2);
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let count = |queue: String| {
        let channel = channel.clone();
        async move {
            channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .expect("passive declare")
                .message_count()
        }
    };
    assert_eq!(
        count(topology.queue.clone()).await,
        2,
        "two back on the work queue"
    );
    assert_eq!(count(topology.dead_queue.clone()).await, 3);
    let purged = enrichd_bus::dlq::purge(&channel, &topology).await.unwrap();
    assert_eq!(purged, 3);
    assert_eq!(count(topology.dead_queue.clone()).await, 0);
    topology.delete(&connection).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_before_earlier_confirms_arrive_in_the_order_sent() {
    if !require_rabbitmq() {
        return;
    }
    let (connection, publisher, topology) = declared().await;

    // Every message is sent before any confirm is awaited, then the confirms are awaited
    // newest first: the relay's pattern, which must neither reorder nor lose a message.
    let bodies: Vec<Vec<u8>> = (0..50)
        .map(|n| format!(r#"{{"n":{n}}}"#).into_bytes())
        .collect();
    let mut pending = Vec::new();
    for body in &bodies {
        pending.push(
            publisher
                .send(Outgoing::persistent(
                    &topology.exchange,
                    "attacker.scored",
                    body,
                ))
                .await
                .expect("send"),
        );
    }
    for confirm in pending.into_iter().rev() {
        confirm.confirmed().await.expect("confirmed");
    }

    let consume_channel = connection.create_channel().await.expect("channel");
    let mut consumer = consume(&consume_channel, &topology.queue, "t").await;
    let mut received = Vec::new();
    while received.len() < bodies.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .expect("stream open")
            .expect("delivery");
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        received.push(delivery.data);
    }
    assert_eq!(received, bodies);

    topology.delete(&connection).await;
}
