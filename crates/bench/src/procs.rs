//! What `/proc` says about processes: peak resident memory (`VmHWM`), CPU seconds, and the
//! CPU split between enrichd, the fakes, PostgreSQL, RabbitMQ and everything else on the
//! machine; and `perf record` attached to enrichd.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use enrichd_harness::process::{Process, Signal};
use serde::Serialize;
use tokio::process::Command;

/// A `VmHWM`/`VmRSS`-style field of `/proc/<pid>/status`, in KiB.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Clock ticks per second for `/proc/*/stat` times (`getconf CLK_TCK`; 100 on Linux).
pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// (command name, user+system ticks) of one process.
fn stat_of(pid: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text[open + 1..close].to_owned();
    // Fields after the command: state is field 3; utime and stime are fields 14 and 15.
    let rest: Vec<&str> = text[close + 2..].split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// CPU seconds used so far by `pid` (all its threads).
pub(crate) fn cpu_secs(pid: u32, ticks: f64) -> Option<f64> {
    stat_of(&pid.to_string()).map(|(_, t)| t as f64 / ticks)
}

/// A snapshot of CPU ticks: per tracked process group and machine-wide busy time.
#[derive(Debug, Clone, Default)]
pub(crate) struct CpuSnapshot {
    groups: BTreeMap<String, u64>,
    machine_busy: u64,
    steal: u64,
    at: Option<tokio::time::Instant>,
}

/// Where CPU went between two snapshots, in CPU seconds, plus the wall time between them.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct CpuSplit {
    pub wall_secs: f64,
    pub groups: BTreeMap<String, f64>,
    /// Busy time of the whole machine (all cores).
    pub machine_busy: f64,
    /// Busy time not in any tracked group: other work on this shared machine.
    pub other: f64,
    /// Part of `machine_busy` the hypervisor gave to other guests (`steal` in `/proc/stat`):
    /// time this machine's processes wanted a core and did not get one. Hosts of the same
    /// kind differ twofold in their ceilings; a run with much steal is slower still.
    pub steal: f64,
}

/// Groups by pid (`enrichd`, `fakes`) plus every `postgres` and `beam.smp` process.
pub(crate) fn cpu_snapshot(pids: &[(&str, u32)]) -> CpuSnapshot {
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    for (name, _) in pids {
        groups.insert((*name).to_owned(), 0);
    }
    groups.insert("postgres".into(), 0);
    groups.insert("rabbitmq".into(), 0);
    groups.insert("bench".into(), 0);
    let me = std::process::id();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(pid_text) = name.to_str() else {
                continue;
            };
            let Ok(pid) = pid_text.parse::<u32>() else {
                continue;
            };
            let Some((comm, ticks)) = stat_of(pid_text) else {
                continue;
            };
            let group = if let Some((g, _)) = pids.iter().find(|(_, p)| *p == pid) {
                (*g).to_owned()
            } else if pid == me {
                "bench".into()
            } else if comm == "postgres" {
                "postgres".into()
            } else if comm.starts_with("beam") || comm == "erl_child_setup" {
                "rabbitmq".into()
            } else {
                continue;
            };
            *groups.entry(group).or_default() += ticks;
        }
    }
    let (machine_busy, steal) = machine_ticks().unwrap_or((0, 0));
    CpuSnapshot {
        groups,
        machine_busy,
        steal,
        at: Some(tokio::time::Instant::now()),
    }
}

/// Machine-wide busy ticks (steal included) and steal ticks.
fn machine_ticks() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, fields.get(7).copied().unwrap_or(0)))
}

impl CpuSnapshot {
    /// CPU used from `self` to `later`.
    pub(crate) fn until(&self, later: &Self, ticks: f64) -> CpuSplit {
        let mut groups = BTreeMap::new();
        let mut tracked = 0.0;
        for (name, after) in &later.groups {
            let before = self.groups.get(name).copied().unwrap_or(0);
            let secs = after.saturating_sub(before) as f64 / ticks;
            tracked += secs;
            groups.insert(name.clone(), round3(secs));
        }
        let machine_busy = later.machine_busy.saturating_sub(self.machine_busy) as f64 / ticks;
        let steal = later.steal.saturating_sub(self.steal) as f64 / ticks;
        let wall_secs = match (self.at, later.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        CpuSplit {
            wall_secs: round3(wall_secs),
            groups,
            machine_busy: round3(machine_busy),
            other: round3((machine_busy - tracked).max(0.0)),
            steal: round3(steal),
        }
    }
}

pub(crate) fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// A `perf record` attached to `pid`, writing `out`; stopped with SIGINT so it writes its
/// data file.
pub(crate) struct Profiler {
    perf: Process,
}

impl Profiler {
    /// Attaches perf to `pid` (DWARF call graphs need no frame pointers), or `None` when
    /// perf cannot start.
    pub(crate) fn attach(pid: u32, out: &Path, log: &Path) -> Option<Self> {
        let mut perf = Command::new("perf");
        perf.args(["record", "-F", "199", "--call-graph", "dwarf,8192", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(out);
        Process::spawn(perf, log).ok().map(|perf| Self { perf })
    }

    /// Stops recording and waits for perf to write its file.
    pub(crate) async fn stop(mut self) {
        let _ = self.perf.signal(Signal::Int).await;
        let _ = self.perf.wait_exit(Duration::from_secs(60)).await;
    }
}
