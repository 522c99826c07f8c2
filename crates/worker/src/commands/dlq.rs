//! `enrichd dlq replay [--limit N]` and `enrichd dlq purge`.

use std::io::Write as _;

use enrichd_bus::connect;
use enrichd_bus::publish::Publisher;

use crate::cli::DlqAction;
use crate::config::Settings;
use crate::exit;

pub(super) async fn dlq(settings: &Settings, action: &DlqAction) -> u8 {
    let Some(bus) = &settings.bus else {
        eprintln!("config: dlq needs a broker: set ENRICHD_AMQP_URL");
        return exit::CONFIG;
    };
    let topology = bus.topology();
    let result =
        async {
            let connection = connect(&bus.amqp_url, "enrichd-dlq").await?;
            let publisher = Publisher::open(&connection).await?;
            for mismatch in topology.declare(&connection).await? {
                tracing::warn!(queue = %mismatch.queue, broker = %mismatch.broker_says, migrate = %mismatch.migrate, "Queue exists with other arguments; used as it is.");
            }
            let channel = connection.create_channel().await.map_err(|source| {
                enrichd_bus::BusError::Amqp {
                    operation: "open channel",
                    source,
                }
            })?;
            let line = match action {
                DlqAction::Replay { limit } => {
                    let moved =
                        enrichd_bus::dlq::replay(&publisher, &channel, &topology, *limit).await?;
                    format!(
                        "replayed {moved} dead letters from {} to {}\n",
                        topology.dead_queue, topology.queue
                    )
                }
                DlqAction::Purge => {
                    let dropped = enrichd_bus::dlq::purge(&channel, &topology).await?;
                    format!(
                        "purged {dropped} dead letters from {}\n",
                        topology.dead_queue
                    )
                }
            };
            let _ = connection.close(200, "bye".into()).await;
            Ok::<_, enrichd_bus::BusError>(line)
        }
        .await;
    match result {
        Ok(line) => {
            let mut stdout = std::io::stdout().lock();
            if stdout.write_all(line.as_bytes()).is_err() {
                return exit::FAILURE;
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {}", enrichd_core::error::chain(&e));
            exit::FAILURE
        }
    }
}
