//! The processes a scenario runs: `enrichd-fakes` and `enrichd run` replicas, each killed
//! when dropped, with their output in the run's log directory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// A minimal HTTP/1.1 request (`Connection: close`); returns status and body.
pub(crate) async fn http(addr: &str, method: &str, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!(
                    "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("{addr}{path} did not answer in 10 s"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{path}: not an HTTP answer"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{addr}{path}: no status"))?;
    Ok((status, body.to_owned()))
}

/// A port free right now on loopback.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last `n` lines of a log file that are warnings or errors, for failure reports.
pub(crate) fn log_tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\"") || l.contains("panicked"))
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).chars().take(400).collect())
        .collect()
}

/// A running `enrichd-fakes`.
#[derive(Debug)]
pub(crate) struct Fakes {
    _child: Child,
    /// `127.0.0.1:PORT` of the providers.
    pub(crate) http: String,
    /// `127.0.0.1:PORT` of the DNS server.
    pub(crate) dns: String,
}

impl Fakes {
    /// Starts the binary with `args` and reads its banner.
    pub(crate) async fn start(binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let stdout = child.stdout.take().context("fakes stdout")?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(20),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("enrichd-fakes printed no banner in 20 s")??;
        let banner: Value = serde_json::from_str(&line)
            .with_context(|| format!("enrichd-fakes banner {line:?}"))?;
        let field = |k: &str| {
            banner[k]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("banner has no {k}"))
        };
        Ok(Self {
            http: field("http")?,
            dns: field("dns")?,
            _child: child,
        })
    }

    /// `GET /_stats`.
    pub(crate) async fn stats(&self) -> Result<Value> {
        let (status, body) = http(&self.http, "GET", "/_stats").await?;
        if status != 200 {
            bail!("/_stats answered {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `GET /_log`: `{provider: [[arrival_ms, key, status], ...]}`.
    pub(crate) async fn log(&self) -> Result<Value> {
        let (status, body) = http(&self.http, "GET", "/_log").await?;
        if status != 200 {
            bail!("/_log answered {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }
}

/// How a replica ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exit(pub(crate) Option<i32>);

/// One `enrichd run` process.
#[derive(Debug)]
pub(crate) struct Replica {
    /// `r1`, `r2`, …
    pub(crate) name: String,
    child: Child,
    /// Its stderr (JSON logs).
    pub(crate) log: PathBuf,
    /// Its metrics listener.
    pub(crate) metrics: String,
    /// Once it has exited: its exit code (`None` = ended by a signal).
    pub(crate) exit: Option<Exit>,
}

impl Replica {
    /// Starts `enrichd run` with exactly `env` (plus its own metrics port).
    pub(crate) fn spawn(
        binary: &Path,
        name: &str,
        env: &[(String, String)],
        log: PathBuf,
    ) -> Result<Self> {
        let port = free_port()?;
        let metrics = format!("127.0.0.1:{port}");
        let child = Command::new(binary)
            .arg("run")
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("ENRICHD_METRICS_ADDR", &metrics)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
            metrics,
            exit: None,
        })
    }

    /// Whether `/readyz` answers 200 (database reachable, schema current).
    pub(crate) async fn ready(&self) -> bool {
        matches!(http(&self.metrics, "GET", "/readyz").await, Ok((200, _)))
    }

    /// Whether the process is still running.
    pub(crate) fn running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.exit = Some(Exit(status.code()));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// `kill -9`.
    pub(crate) async fn kill9(&mut self) -> Result<()> {
        self.child.start_kill()?;
        let status = self.child.wait().await?;
        self.exit = Some(Exit(status.code()));
        Ok(())
    }

    /// SIGTERM; waits up to `within` for the exit and returns its code (`None`: still
    /// running then, and killed, or ended by a signal).
    pub(crate) async fn terminate(&mut self, within: Duration) -> Option<i32> {
        if !self.running() {
            return self.exit.and_then(|e| e.0);
        }
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if let Ok(Ok(status)) = tokio::time::timeout(within, self.child.wait()).await {
            self.exit = Some(Exit(status.code()));
            status.code()
        } else {
            let _ = self.kill9().await;
            self.exit = Some(Exit(None));
            None
        }
    }

    /// A metric summed over its label sets (0 when absent or unreachable).
    pub(crate) async fn metric(&self, name: &str) -> f64 {
        let Ok((200, text)) = http(&self.metrics, "GET", "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
