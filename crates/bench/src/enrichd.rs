//! Running the real `enrichd` binary against the fakes: its environment, and a watcher that
//! samples its memory and CPU while it runs. Starting it, its log and its metrics are the
//! harness's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use enrichd_bus::Topology;
use enrichd_core::ProviderId;
use enrichd_harness::enrichd::{Enrichd, EnrichdEnv, Limits, PER_ADDRESS};

use crate::procs;

/// How to run enrichd.
#[derive(Debug, Clone)]
pub(crate) struct Launcher {
    pub binary: PathBuf,
    pub work_dir: PathBuf,
    /// `http://` + the fakes' HTTP address: every provider's base URL.
    pub fakes_base_url: String,
    pub fakes_dns: String,
    pub concurrency: u32,
    pub rust_log: String,
}

impl Launcher {
    /// enrichd's environment: the fakes as every provider's base URL and as the only DNS
    /// server, `limits` on the keyed providers (the Feodo feed is never metered),
    /// `concurrency` per provider, and the bus at `bus` when given.
    pub(crate) fn env(
        &self,
        database_url: &str,
        bus: Option<(&str, &Topology)>,
        limits: Limits,
    ) -> EnrichdEnv {
        let env = EnrichdEnv::new()
            .database(database_url)
            .set("ENRICHD_AUTO_MIGRATE", "true")
            .dns_servers(&self.fakes_dns)
            .set("ENRICHD_PTR_CONCURRENCY", self.concurrency.to_string())
            .set("ENRICHD_GRACE_SECS", "5")
            .api_key(ProviderId::Greynoise, "bench-greynoise")
            .api_key(ProviderId::Abuseipdb, "bench-abuseipdb")
            .api_key(ProviderId::Threatfox, "bench-threatfox")
            .set("RUST_LOG", self.rust_log.as_str())
            .providers_at(&self.fakes_base_url)
            .limits(&PER_ADDRESS, limits)
            .limits(&[ProviderId::Feodo], Limits::Lifted)
            .concurrency(&ProviderId::ALL, self.concurrency);
        match bus {
            Some((url, topology)) => env.bus(url, topology),
            None => env,
        }
    }

    /// Starts `enrichd <command>`; its log is `<work_dir>/<label>.log`.
    pub(crate) fn start(
        &self,
        command: &str,
        label: &str,
        env: &EnrichdEnv,
    ) -> anyhow::Result<Enrichd> {
        let log = self.work_dir.join(format!("{label}.log"));
        Enrichd::start(&self.binary, &[command], env, &log)
    }

    /// Runs `enrichd migrate` to completion.
    pub(crate) async fn migrate(&self, label: &str, env: &EnrichdEnv) -> anyhow::Result<()> {
        let mut migrate = self.start("migrate", &format!("{label}-migrate"), env)?;
        migrate.finish(Duration::from_secs(60)).await
    }
}

/// Samples a running process every 100 ms: peak `VmHWM`, last `VmRSS`, last CPU seconds.
/// The last sample before the process ends is what remains (`/proc` forgets a reaped child).
#[derive(Debug, Default)]
pub(crate) struct Watch {
    pub hwm_kib: AtomicU64,
    pub rss_kib: AtomicU64,
    /// CPU milliseconds.
    pub cpu_ms: AtomicU64,
    pub stop: AtomicBool,
}

impl Watch {
    /// Starts sampling `pid`.
    pub(crate) fn start(pid: u32, ticks: f64) -> Arc<Self> {
        let watch = Arc::new(Self::default());
        let me = Arc::clone(&watch);
        tokio::spawn(async move {
            while !me.stop.load(Ordering::Relaxed) {
                me.sample(pid, ticks);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        watch
    }

    /// Takes one sample now (call right before stopping the process).
    pub(crate) fn sample(&self, pid: u32, ticks: f64) {
        if let Some(hwm) = procs::status_kib(pid, "VmHWM") {
            self.hwm_kib.fetch_max(hwm, Ordering::Relaxed);
        }
        if let Some(rss) = procs::status_kib(pid, "VmRSS") {
            self.rss_kib.store(rss, Ordering::Relaxed);
        }
        if let Some(cpu) = procs::cpu_secs(pid, ticks) {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "CPU milliseconds of one run are small and positive"
            )]
            self.cpu_ms.store((cpu * 1000.0) as u64, Ordering::Relaxed);
        }
    }

    /// Peak resident memory so far, MiB.
    pub(crate) fn hwm_mib(&self) -> f64 {
        self.hwm_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// CPU seconds at the last sample.
    pub(crate) fn cpu_secs(&self) -> f64 {
        self.cpu_ms.load(Ordering::Relaxed) as f64 / 1000.0
    }
}
