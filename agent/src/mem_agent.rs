//! MemAgentMemcgSet / MemAgentCompactSet: kiln's small mem-agent. Kata's
//! mem-agent reclaims container memory and compacts guest memory on a
//! period so the host can take idle memory back (with virtio-balloon free
//! page reporting). kiln does the same two jobs, off until the runtime turns
//! them on:
//! - memcg: every `period_secs`, each container cgroup under the sandbox is
//!   asked to reclaim its inactive file pages (and inactive anonymous pages
//!   when `swap` is on) through cgroup v2's `memory.reclaim`;
//! - compact: every `period_secs`, `/proc/sys/vm/compact_memory` is written.
//!
//! The PSI limits, aging counts and compaction order Kata's mem-agent also
//! takes are accepted and logged, not used: kiln does not read PSI.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::agent;
use tokio::sync::Notify;

use crate::container::cgroups::flat_keyed;
use crate::error::{invalid, Result};
use crate::guest::GuestFs;

/// The shortest period accepted: shorter ones would keep a TCG guest busy.
const MIN_PERIOD_SECS: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemcgConfig {
    pub disabled: bool,
    pub swap: bool,
    pub period_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactConfig {
    pub disabled: bool,
    pub period_secs: u64,
}

impl Default for MemcgConfig {
    fn default() -> Self {
        MemcgConfig {
            disabled: true,
            swap: false,
            period_secs: 60,
        }
    }
}

impl Default for CompactConfig {
    fn default() -> Self {
        CompactConfig {
            disabled: true,
            period_secs: 600,
        }
    }
}

fn period(p: u64) -> Result<u64> {
    if p < MIN_PERIOD_SECS {
        return Err(invalid(format!(
            "mem-agent period_secs {p} is too short (at least {MIN_PERIOD_SECS})"
        )));
    }
    Ok(p)
}

impl MemcgConfig {
    /// Unset fields keep their current values.
    pub fn merged(&self, req: &agent::MemAgentMemcgConfig) -> Result<MemcgConfig> {
        let ignored = [
            req.swappiness_max.map(|_| "swappiness_max"),
            req.period_psi_percent_limit
                .map(|_| "period_psi_percent_limit"),
            req.eviction_psi_percent_limit
                .map(|_| "eviction_psi_percent_limit"),
            req.eviction_run_aging_count_min
                .map(|_| "eviction_run_aging_count_min"),
        ];
        log_ignored("memcg", &ignored);
        Ok(MemcgConfig {
            disabled: req.disabled.unwrap_or(self.disabled),
            swap: req.swap.unwrap_or(self.swap),
            period_secs: req
                .period_secs
                .map(period)
                .transpose()?
                .unwrap_or(self.period_secs),
        })
    }
}

impl CompactConfig {
    pub fn merged(&self, req: &agent::MemAgentCompactConfig) -> Result<CompactConfig> {
        let ignored = [
            req.period_psi_percent_limit
                .map(|_| "period_psi_percent_limit"),
            req.compact_psi_percent_limit
                .map(|_| "compact_psi_percent_limit"),
            req.compact_sec_max.map(|_| "compact_sec_max"),
            req.compact_order.map(|_| "compact_order"),
            req.compact_threshold.map(|_| "compact_threshold"),
            req.compact_force_times.map(|_| "compact_force_times"),
        ];
        log_ignored("compact", &ignored);
        Ok(CompactConfig {
            disabled: req.disabled.unwrap_or(self.disabled),
            period_secs: req
                .period_secs
                .map(period)
                .transpose()?
                .unwrap_or(self.period_secs),
        })
    }
}

fn log_ignored(part: &str, fields: &[Option<&str>]) {
    let names: Vec<&str> = fields.iter().flatten().copied().collect();
    if !names.is_empty() {
        tracing::info!(
            part,
            "mem-agent settings accepted but not used by kiln: {}",
            names.join(", ")
        );
    }
}

/// One memcg pass: every cgroup directly under `sandbox_cgroup` reclaims its
/// inactive pages. Returns the bytes asked for.
pub fn reclaim_once(sandbox_cgroup: &Path, swap: bool) -> u64 {
    let mut asked = 0;
    let Ok(dir) = std::fs::read_dir(sandbox_cgroup) else {
        return 0;
    };
    for e in dir.flatten() {
        let cg = e.path();
        let Ok(stat) = std::fs::read_to_string(cg.join("memory.stat")) else {
            continue;
        };
        let mut bytes = flat_keyed(&stat, "inactive_file").unwrap_or(0);
        if swap {
            bytes += flat_keyed(&stat, "inactive_anon").unwrap_or(0);
        }
        if bytes == 0 {
            continue;
        }
        // The kernel may reclaim less and then answers EAGAIN: not an error.
        match std::fs::write(cg.join("memory.reclaim"), bytes.to_string()) {
            Ok(()) => asked += bytes,
            Err(e) => tracing::debug!(cgroup = %cg.display(), "memory.reclaim: {e}"),
        }
    }
    asked
}

/// One compaction pass.
pub fn compact_once(guest: &GuestFs) -> Result<()> {
    let p = guest.path("/proc/sys/vm/compact_memory");
    std::fs::write(&p, "1").map_err(|e| {
        crate::error::os(
            format!(
                "writing {} (CONFIG_COMPACTION in the guest kernel?)",
                p.display()
            ),
            e,
        )
    })
}

/// The running mem-agent: its settings and the two loops.
pub struct MemAgent {
    memcg: Mutex<MemcgConfig>,
    compact: Mutex<CompactConfig>,
    changed: Notify,
}

impl Default for MemAgent {
    fn default() -> Self {
        MemAgent {
            memcg: Mutex::new(MemcgConfig::default()),
            compact: Mutex::new(CompactConfig::default()),
            changed: Notify::new(),
        }
    }
}

impl MemAgent {
    pub fn set_memcg(&self, req: &agent::MemAgentMemcgConfig) -> Result<MemcgConfig> {
        let mut c = self.memcg.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.merged(req)?;
        self.changed.notify_waiters();
        tracing::info!(config = ?*c, "mem-agent memcg");
        Ok(c.clone())
    }

    pub fn set_compact(&self, req: &agent::MemAgentCompactConfig) -> Result<CompactConfig> {
        let mut c = self.compact.lock().unwrap_or_else(|p| p.into_inner());
        *c = c.merged(req)?;
        self.changed.notify_waiters();
        tracing::info!(config = ?*c, "mem-agent compact");
        Ok(c.clone())
    }

    /// Runs both loops forever; `sandbox_cgroups` names the cgroup holding the
    /// sandbox's containers (it changes with CreateSandbox).
    pub async fn run(
        self: Arc<Self>,
        guest: GuestFs,
        sandbox_cgroups: impl Fn() -> Option<PathBuf> + Send + Sync + 'static,
    ) {
        let memcg = {
            let me = self.clone();
            async move {
                loop {
                    let c = me.memcg.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    me.pause(c.disabled, c.period_secs).await;
                    let c = me.memcg.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if !c.disabled {
                        if let Some(dir) = sandbox_cgroups() {
                            let asked = reclaim_once(&dir, c.swap);
                            tracing::debug!(asked, "mem-agent memcg pass");
                        }
                    }
                }
            }
        };
        let compact = {
            let me = self.clone();
            async move {
                loop {
                    let c = me.compact.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    me.pause(c.disabled, c.period_secs).await;
                    let c = me.compact.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    if !c.disabled {
                        if let Err(e) = compact_once(&guest) {
                            tracing::warn!("mem-agent compaction: {}", e.message);
                        }
                    }
                }
            }
        };
        tokio::join!(memcg, compact);
    }

    /// Waits one period, or until the settings change (then the loop re-reads them).
    async fn pause(&self, disabled: bool, period_secs: u64) {
        let changed = self.changed.notified();
        if disabled {
            changed.await;
        } else {
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_secs(period_secs)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_keep_their_values_and_bad_periods_are_refused() {
        let c = MemcgConfig::default();
        let mut req = agent::MemAgentMemcgConfig::new();
        req.disabled = Some(false);
        req.swappiness_max = Some(50);
        let c = c.merged(&req).unwrap();
        assert_eq!(
            c,
            MemcgConfig {
                disabled: false,
                swap: false,
                period_secs: 60
            }
        );
        let mut req = agent::MemAgentMemcgConfig::new();
        req.swap = Some(true);
        assert!(c.merged(&req).unwrap().swap);
        assert!(!c.merged(&req).unwrap().disabled, "disabled kept");
        req.period_secs = Some(0);
        assert!(c.merged(&req).is_err());
        let mut req = agent::MemAgentCompactConfig::new();
        req.period_secs = Some(30);
        let k = CompactConfig::default().merged(&req).unwrap();
        assert_eq!((k.disabled, k.period_secs), (true, 30));
    }

    #[test]
    fn reclaim_asks_each_container_for_its_inactive_pages() {
        let d = tempfile::tempdir().unwrap();
        for (name, file, anon) in [("c1", 4096, 8192), ("c2", 0, 0)] {
            let cg = d.path().join(name);
            std::fs::create_dir_all(&cg).unwrap();
            std::fs::write(
                cg.join("memory.stat"),
                format!("anon 1\ninactive_anon {anon}\ninactive_file {file}\n"),
            )
            .unwrap();
        }
        assert_eq!(reclaim_once(d.path(), false), 4096);
        assert_eq!(
            std::fs::read_to_string(d.path().join("c1/memory.reclaim")).unwrap(),
            "4096"
        );
        assert!(
            !d.path().join("c2/memory.reclaim").exists(),
            "nothing to reclaim"
        );
        assert_eq!(reclaim_once(d.path(), true), 4096 + 8192);
        let g = GuestFs::new(d.path());
        assert!(
            compact_once(&g).is_err(),
            "no /proc/sys/vm in the fake root"
        );
        std::fs::create_dir_all(d.path().join("proc/sys/vm")).unwrap();
        compact_once(&g).unwrap();
    }
}
