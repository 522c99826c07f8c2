//! A child process whose output goes to a log file: signals, terminate with grace, `kill -9`,
//! the exit with a deadline, the log's tail and the pid (for sampling its memory and CPU).
//! The process is killed when the value is dropped, so a failed run leaves nothing behind.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::process::{Child, ChildStdout, Command};

/// A signal sent with kill(1): the workspace forbids `unsafe`, so no libc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: drain and exit.
    Term,
    /// SIGINT: what Ctrl-C sends (and what makes `perf record` write its data).
    Int,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Term => "TERM",
            Self::Int => "INT",
        }
    }
}

/// Where the child's stdout goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stdout {
    /// Into the log, with stderr.
    Log,
    /// To a pipe the caller reads ([`Process::take_stdout`]).
    Piped,
}

/// A running child.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pid: u32,
    log: PathBuf,
    /// Once seen: how it ended. Kept because a reaped child cannot be asked again.
    exit: Option<ExitStatus>,
}

impl Process {
    /// Starts `command` with stdin closed and stdout and stderr written to `log` (created
    /// anew). Whatever environment `command` carries is the child's: clear it there for a
    /// clean one.
    pub fn spawn(command: Command, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(command, log, Stdout::Log)
    }

    /// [`Process::spawn`], but stdout is a pipe for the caller (a banner to read); stderr
    /// alone goes to `log`.
    pub fn spawn_piped(command: Command, log: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(command, log, Stdout::Piped)
    }

    fn spawn_with(mut command: Command, log: &Path, stdout: Stdout) -> anyhow::Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let out = match stdout {
            Stdout::Log => Stdio::from(file.try_clone()?),
            Stdout::Piped => Stdio::piped(),
        };
        let program = command.as_std().get_program().to_owned();
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        Ok(Self {
            child,
            pid,
            log: log.to_owned(),
            exit: None,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The piped stdout of a [`Process::spawn_piped`] child, once.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// The whole log so far (empty when it cannot be read).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The last `n` log lines that are warnings, errors or panics (JSON log lines), each cut
    /// to 400 characters, for failure reports.
    pub fn log_warnings(&self, n: usize) -> Vec<String> {
        let text = self.log_text();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("\"WARN\"") || l.contains("\"ERROR\"") || l.contains("panicked"))
            .collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.chars().take(400).collect())
            .collect()
    }

    /// How it ended, if it has.
    pub fn exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.exit().is_none()
    }

    /// Sends `signal` (nothing once it has exited: its pid may belong to another process).
    pub async fn signal(&mut self, signal: Signal) -> anyhow::Result<()> {
        if !self.running() {
            return Ok(());
        }
        let status = Command::new("kill")
            .arg(format!("-{}", signal.name()))
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .context("run kill(1)")?;
        if !status.success() {
            bail!("kill -{} {} failed ({status})", signal.name(), self.pid);
        }
        Ok(())
    }

    /// Waits up to `within` for it to exit; `None` when it is still running then.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit() {
            return Some(status);
        }
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .ok()?
            .ok()?;
        self.exit = Some(status);
        Some(status)
    }

    /// SIGTERM, then SIGKILL when it has not exited within `grace`. Returns how it ended by
    /// itself; `None` when it had to be killed.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exit() {
            return Some(status);
        }
        let _ = self.signal(Signal::Term).await;
        if let Some(status) = self.wait_exit(grace).await {
            return Some(status);
        }
        let _ = self.kill9().await;
        None
    }

    /// `kill -9`, then reaps it.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exit() {
            return Ok(status);
        }
        self.child.start_kill().context("kill -9")?;
        let status = self.child.wait().await.context("reap a killed child")?;
        self.exit = Some(status);
        Ok(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("enrichd-harness-{name}-{}.log", std::process::id()))
    }

    #[tokio::test]
    async fn output_goes_to_the_log_and_the_exit_is_kept() {
        let mut command = Command::new("sh");
        command.args([
            "-c",
            r#"echo one; echo '{"level":"WARN","m":"two"}' >&2; echo three; exit 3"#,
        ]);
        let log = log_path("exit");
        let mut process = Process::spawn(command, &log).unwrap();
        let status = process.wait_exit(Duration::from_secs(10)).await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(!process.running());
        assert_eq!(process.exit().and_then(|s| s.code()), Some(3));
        assert_eq!(
            process.log_tail(2),
            "{\"level\":\"WARN\",\"m\":\"two\"}\nthree"
        );
        assert_eq!(
            process.log_warnings(5),
            vec!["{\"level\":\"WARN\",\"m\":\"two\"}".to_owned()]
        );
        // Signalling an exited process is a no-op, never a signal to a reused pid.
        process.signal(Signal::Term).await.unwrap();
        let _ = std::fs::remove_file(log);
    }

    #[tokio::test]
    async fn terminate_sends_sigterm_and_kills_what_ignores_it() {
        let log = log_path("term");
        let mut sleep = Command::new("sleep");
        sleep.arg("60");
        let mut polite = Process::spawn(sleep, &log).unwrap();
        let status = polite.terminate(Duration::from_secs(10)).await.unwrap();
        assert_eq!(status.code(), None, "ended by SIGTERM");

        let mut command = Command::new("sh");
        // An ignored signal stays ignored across exec: sleep itself shrugs SIGTERM off.
        command.args(["-c", "trap '' TERM; echo up; exec sleep 60"]);
        let mut stubborn = Process::spawn(command, &log).unwrap();
        assert!(
            tokio_poll(|| stubborn.log_text().contains("up")).await,
            "the trap is set"
        );
        assert_eq!(stubborn.terminate(Duration::from_millis(300)).await, None);
        assert!(!stubborn.running(), "killed after the grace");
        let _ = std::fs::remove_file(log);
    }

    /// Polls `check` every 10 ms for up to 10 s.
    async fn tokio_poll(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..1000 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}
