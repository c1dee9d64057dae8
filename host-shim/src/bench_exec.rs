//! `kiln-shim bench-exec`: exec round trips and the agent's memory in one VM,
//! the figures `cargo xtask bench` reports for the agent.
//!
//! Boots the image with a rootfs shared over virtio-fs, reads the agent's RSS
//! and open fds from GetMetrics while idle, starts one long-running
//! container, then times `count` sequential ExecProcess + WaitProcess round
//! trips of `true` in it (each exec's streams are drained to EOF afterwards,
//! untimed, so the agent forgets it) and reads the metrics again.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_protocol::{agent, oci};
use serde::Serialize;

use crate::client::AgentClient;
use crate::config::ShimConfig;
use crate::image::BootImage;
use crate::vm::{BootOptions, Vm};

const CONTAINER: &str = "bench";

#[derive(Debug, Serialize)]
pub struct BenchExecReport {
    pub agent_ready_seconds: f64,
    pub idle_rss_bytes: u64,
    pub idle_fds: u64,
    /// With the sandbox and one running container, before any exec.
    pub container_rss_bytes: u64,
    pub container_fds: u64,
    pub execs: usize,
    pub after_rss_bytes: u64,
    pub after_fds: u64,
    pub exec_p50_ms: f64,
    pub exec_p99_ms: f64,
    pub exec_min_ms: f64,
    pub exec_max_ms: f64,
}

/// Agent RSS and open fds from GetMetrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentUsage {
    pub rss_bytes: u64,
    pub fds: u64,
}

/// The value of the sample `name` in GetMetrics' Prometheus text.
fn metric(metrics: &str, name: &str) -> anyhow::Result<u64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .with_context(|| format!("GetMetrics has no {name}"))
}

impl AgentUsage {
    /// Reads `kiln_agent_resident_memory_bytes` and `kiln_agent_open_fds`
    /// from Prometheus text.
    pub fn parse(metrics: &str) -> anyhow::Result<AgentUsage> {
        Ok(AgentUsage {
            rss_bytes: metric(metrics, "kiln_agent_resident_memory_bytes")?,
            fds: metric(metrics, "kiln_agent_open_fds")?,
        })
    }
}

/// The guest's memory from GetMetrics (its /proc/meminfo).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuestMemory {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl GuestMemory {
    /// Reads `kiln_guest_memory_total_bytes` and
    /// `kiln_guest_memory_available_bytes` from Prometheus text.
    pub fn parse(metrics: &str) -> anyhow::Result<GuestMemory> {
        Ok(GuestMemory {
            total_bytes: metric(metrics, "kiln_guest_memory_total_bytes")?,
            available_bytes: metric(metrics, "kiln_guest_memory_available_bytes")?,
        })
    }

    /// MemTotal − MemAvailable: what the kernel and userspace hold.
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes.saturating_sub(self.available_bytes)
    }

    /// Asks the agent.
    pub async fn read(c: &AgentClient) -> anyhow::Result<GuestMemory> {
        let m = c
            .agent
            .get_metrics(c.ctx(), &agent::GetMetricsRequest::new())
            .await
            .context("GetMetrics")?;
        GuestMemory::parse(&m.metrics)
    }
}

/// Nearest-rank percentile `p` (0 < p <= 100) of sorted `v`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn run(
    cfg: &ShimConfig,
    image: &BootImage,
    rootfs: &Path,
    count: usize,
) -> anyhow::Result<BenchExecReport> {
    if !rootfs.join("bin").is_dir() {
        anyhow::bail!(
            "{} does not look like a root filesystem (no bin/); give a busybox tree",
            rootfs.display()
        );
    }
    let opts = BootOptions {
        share_rootfs: Some((CONTAINER.into(), rootfs.canonicalize()?)),
        ..Default::default()
    };
    let mut vm = Vm::launch(image, cfg, &opts)?;
    let ready = vm.wait_ready(cfg).await?;
    let result = measure(&ready.client, count, ready.elapsed).await;
    drop(ready);
    vm.shutdown();
    result
}

async fn usage(c: &AgentClient) -> anyhow::Result<AgentUsage> {
    let m = c
        .agent
        .get_metrics(c.ctx(), &agent::GetMetricsRequest::new())
        .await
        .context("GetMetrics")?;
    AgentUsage::parse(&m.metrics)
}

async fn measure(
    c: &AgentClient,
    count: usize,
    ready: Duration,
) -> anyhow::Result<BenchExecReport> {
    let idle = usage(c).await?;

    crate::run::start_idle_container(c, CONTAINER, "kiln-bench").await?;
    let with_container = usage(c).await?;

    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let exec_id = format!("x{i}");
        let t = Instant::now();
        exec_true(c, &exec_id).await?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        drain(c, &exec_id).await?;
    }
    let after = usage(c).await?;

    c.remove_container(CONTAINER, 10)
        .await
        .context("RemoveContainer")?;
    c.destroy_sandbox().await.context("DestroySandbox")?;

    times.sort_by(|a, b| a.total_cmp(b));
    Ok(BenchExecReport {
        agent_ready_seconds: ready.as_secs_f64(),
        idle_rss_bytes: idle.rss_bytes,
        idle_fds: idle.fds,
        container_rss_bytes: with_container.rss_bytes,
        container_fds: with_container.fds,
        execs: count,
        after_rss_bytes: after.rss_bytes,
        after_fds: after.fds,
        exec_p50_ms: percentile(&times, 50.0),
        exec_p99_ms: percentile(&times, 99.0),
        exec_min_ms: times.first().copied().unwrap_or_default(),
        exec_max_ms: times.last().copied().unwrap_or_default(),
    })
}

/// ExecProcess of `true`, then WaitProcess; fails unless it exits 0.
async fn exec_true(c: &AgentClient, exec_id: &str) -> anyhow::Result<()> {
    let mut p = oci::Process::new();
    p.Args = vec!["true".into()];
    p.Env = vec!["PATH=/bin:/usr/bin".into()];
    p.Cwd = "/".into();
    c.exec_process(CONTAINER, exec_id, p)
        .await
        .with_context(|| format!("ExecProcess {exec_id}"))?;
    let status = c
        .wait_process(CONTAINER, exec_id)
        .await
        .with_context(|| format!("WaitProcess {exec_id}"))?;
    if status != 0 {
        anyhow::bail!("exec {exec_id} (`true`) exited with {status}");
    }
    Ok(())
}

/// Reads stdout and stderr to EOF, after which the agent forgets the exec.
async fn drain(c: &AgentClient, exec_id: &str) -> anyhow::Result<()> {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = CONTAINER.into();
    req.exec_id = exec_id.into();
    req.len = 4096;
    for stderr in [false, true] {
        loop {
            let r = if stderr {
                c.agent.read_stderr(c.ctx(), &req).await
            } else {
                c.agent.read_stdout(c.ctx(), &req).await
            };
            if r.with_context(|| format!("reading exec {exec_id}"))?
                .data
                .is_empty()
            {
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 100.0);
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&v, 100.0), 200.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn guest_memory_from_metrics() {
        let m = "# HELP kiln_guest_memory_total_bytes Guest MemTotal.\n\
                 kiln_guest_memory_total_bytes 1000\n\
                 kiln_guest_memory_available_bytes 600\n";
        let g = GuestMemory::parse(m).unwrap();
        assert_eq!(
            (g.total_bytes, g.available_bytes, g.used_bytes()),
            (1000, 600, 400)
        );
        assert!(GuestMemory::parse("kiln_guest_memory_total_bytes 1\n").is_err());
    }

    #[test]
    fn agent_usage_from_metrics() {
        let text = "# HELP kiln_agent_resident_memory_bytes x\n# TYPE kiln_agent_resident_memory_bytes gauge\nkiln_agent_resident_memory_bytes 4194304\nkiln_agent_open_fds 12\nkiln_agent_open_fds_extra 99\n";
        assert_eq!(
            AgentUsage::parse(text).unwrap(),
            AgentUsage {
                rss_bytes: 4 << 20,
                fds: 12
            }
        );
        assert!(AgentUsage::parse("kiln_agent_open_fds 3\n").is_err());
    }
}
