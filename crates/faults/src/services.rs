//! The shared PostgreSQL and RabbitMQ: command helpers, restarts, and the guard that brings
//! both back up when the suite ends, whatever happened (a failed check, an error, a panic,
//! Ctrl-C).

use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use tokio::time::Instant;

/// PostgreSQL on loopback.
pub(crate) const PG_ADDR: &str = "127.0.0.1:5432";
/// RabbitMQ on loopback.
pub(crate) const AMQP_ADDR: &str = "127.0.0.1:5672";

/// Runs `program args…`, returning stdout; fails on a non-zero exit or after `timeout`.
pub(crate) async fn run(program: &str, args: &[&str], timeout: Duration) -> Result<String> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("PGCONNECT_TIMEOUT", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .with_context(|| format!("{program} {} took over {timeout:?}", args.join(" ")))??;
    if !output.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether something accepts TCP connections at `addr`.
pub(crate) fn port_open(addr: &str) -> bool {
    addr.parse::<SocketAddr>()
        .is_ok_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// Polls `check` every 200 ms until it holds or `within` passes.
pub(crate) async fn wait_until<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `fetch` every 200 ms until `done` holds for its value or `within` passes; returns
/// the last value fetched and whether `done` held. A failed fetch (`None`) is retried.
pub(crate) async fn poll<T, F, Fut>(
    within: Duration,
    mut fetch: F,
    done: impl Fn(&T) -> bool,
) -> (Option<T>, bool)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(value) = fetch().await {
            let ok = done(&value);
            last = Some(value);
            if ok {
                return (last, true);
            }
        }
        if Instant::now() >= deadline {
            return (last, false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The PostgreSQL cluster version to restart (the newest under /etc/postgresql).
fn pg_version() -> Result<String> {
    let mut versions: Vec<(u32, String)> = std::fs::read_dir("/etc/postgresql")
        .context("no /etc/postgresql: PostgreSQL is not installed the Debian way")?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| Some((name.parse::<u32>().ok()?, name)))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, name)| name)
        .context("no PostgreSQL cluster under /etc/postgresql")
}

/// The services and how to restart them.
#[derive(Debug, Clone)]
pub(crate) struct Services {
    pg_version: String,
}

impl Services {
    /// Checks both services are up (the suite never skips: a missing service is a failure).
    pub(crate) fn detect() -> Result<Self> {
        if !port_open(PG_ADDR) {
            bail!("PostgreSQL is not reachable at {PG_ADDR} (run scripts/ensure-services.sh)");
        }
        if !port_open(AMQP_ADDR) {
            bail!("RabbitMQ is not reachable at {AMQP_ADDR} (run scripts/ensure-services.sh)");
        }
        Ok(Self {
            pg_version: pg_version()?,
        })
    }

    /// `rabbitmqctl stop_app` then `start_app`; returns how long the broker was away.
    pub(crate) async fn restart_rabbitmq(&self) -> Result<Duration> {
        let started = Instant::now();
        run("rabbitmqctl", &["stop_app"], Duration::from_secs(120)).await?;
        run("rabbitmqctl", &["start_app"], Duration::from_secs(180)).await?;
        if !wait_until(Duration::from_secs(60), || async { port_open(AMQP_ADDR) }).await {
            bail!("RabbitMQ did not accept connections after start_app");
        }
        Ok(started.elapsed())
    }

    /// `pg_ctlcluster <version> main restart`; returns how long the database was away.
    pub(crate) async fn restart_postgres(&self) -> Result<Duration> {
        let started = Instant::now();
        run(
            "pg_ctlcluster",
            &[
                "--skip-systemctl-redirect",
                &self.pg_version,
                "main",
                "restart",
            ],
            Duration::from_secs(120),
        )
        .await?;
        if !wait_until(Duration::from_secs(60), || async {
            crate::pg::psql("postgres", "SELECT 1").await.is_ok()
        })
        .await
        {
            bail!("PostgreSQL did not answer after the restart");
        }
        Ok(started.elapsed())
    }

    /// Brings both services back if they are down; blocking, so it also works from `Drop`.
    /// Returns what it had to do.
    pub(crate) fn ensure_running(&self) -> Vec<String> {
        let mut actions = Vec::new();
        let blocking = |program: &str, args: &[&str]| {
            std::process::Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let settle = |addr: &str| {
            for _ in 0..300 {
                if port_open(addr) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        };
        if !port_open(AMQP_ADDR) {
            // stop_app leaves the node running; a stopped node needs the server started.
            if !blocking("rabbitmqctl", &["start_app"]) {
                blocking("rabbitmq-server", &["-detached"]);
                blocking("rabbitmqctl", &["await_startup"]);
            }
            let up = settle(AMQP_ADDR);
            actions.push(format!("RabbitMQ restarted (up: {up})"));
        }
        if !port_open(PG_ADDR) {
            blocking(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &self.pg_version,
                    "main",
                    "start",
                ],
            );
            let up = settle(PG_ADDR);
            actions.push(format!("PostgreSQL restarted (up: {up})"));
        }
        actions
    }
}

/// Brings the services back when dropped.
#[derive(Debug)]
pub(crate) struct ServicesGuard(pub(crate) Services);

impl Drop for ServicesGuard {
    #[expect(
        clippy::print_stderr,
        reason = "the last word of the suite on the services"
    )]
    fn drop(&mut self) {
        for action in self.0.ensure_running() {
            eprintln!("faults: {action}");
        }
    }
}
