//! GetMetrics: a few Prometheus text-format metrics about the agent and the guest.

use std::fmt::Write;

use crate::guest::GuestFs;

/// What the agent knows about itself at the moment of asking.
pub struct AgentCounts {
    pub containers: usize,
    pub processes: usize,
}

/// Renders the metrics. Agent facts come from `proc_self` (normally
/// `/proc/self`), guest facts through the guest root.
pub fn render(guest: &GuestFs, proc_self: &std::path::Path, counts: &AgentCounts) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    let status = std::fs::read_to_string(proc_self.join("status")).unwrap_or_default();
    let kib = |key: &str, text: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|v| v * 1024.0)
    };
    if let Some(rss) = kib("VmRSS:", &status) {
        gauge(
            "kiln_agent_resident_memory_bytes",
            "Resident set size of kiln-agent.",
            rss,
        );
    }
    if let Some(t) = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        gauge("kiln_agent_threads", "Threads of kiln-agent.", t);
    }
    if let Ok(d) = std::fs::read_dir(proc_self.join("fd")) {
        gauge(
            "kiln_agent_open_fds",
            "Open file descriptors of kiln-agent.",
            d.count() as f64,
        );
    }
    gauge(
        "kiln_agent_containers",
        "Containers in the sandbox.",
        counts.containers as f64,
    );
    gauge(
        "kiln_agent_processes",
        "Container processes (inits and execs) the agent tracks.",
        counts.processes as f64,
    );
    let meminfo = std::fs::read_to_string(guest.path("/proc/meminfo")).unwrap_or_default();
    if let Some(v) = kib("MemTotal:", &meminfo) {
        gauge("kiln_guest_memory_total_bytes", "Guest MemTotal.", v);
    }
    if let Some(v) = kib("MemAvailable:", &meminfo) {
        gauge(
            "kiln_guest_memory_available_bytes",
            "Guest MemAvailable.",
            v,
        );
    }
    let cpus = guest.online_cpu_count();
    if cpus > 0 {
        gauge("kiln_guest_online_cpus", "Guest CPUs online.", cpus as f64);
    }
    let load = std::fs::read_to_string(guest.path("/proc/loadavg")).unwrap_or_default();
    if let Some(v) = load
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
    {
        gauge("kiln_guest_load1", "Guest 1-minute load average.", v);
    }
    let uptime = std::fs::read_to_string(guest.path("/proc/uptime")).unwrap_or_default();
    if let Some(v) = uptime
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
    {
        gauge("kiln_guest_uptime_seconds", "Guest uptime.", v);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text_from_fake_trees() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("proc/self/fd")).unwrap();
        std::fs::write(p.join("proc/self/fd/0"), "").unwrap();
        std::fs::write(
            p.join("proc/self/status"),
            "Name:\tkiln-agent\nVmRSS:\t    2048 kB\nThreads:\t3\n",
        )
        .unwrap();
        std::fs::write(
            p.join("proc/meminfo"),
            "MemTotal:  1000 kB\nMemAvailable: 500 kB\n",
        )
        .unwrap();
        std::fs::write(p.join("proc/loadavg"), "0.50 0.1 0.0 1/50 99\n").unwrap();
        std::fs::write(p.join("proc/uptime"), "12.5 20.0\n").unwrap();
        let text = render(
            &GuestFs::new(p),
            &p.join("proc/self"),
            &AgentCounts {
                containers: 2,
                processes: 5,
            },
        );
        for line in [
            "kiln_agent_resident_memory_bytes 2097152",
            "kiln_agent_threads 3",
            "kiln_agent_open_fds 1",
            "kiln_agent_containers 2",
            "kiln_agent_processes 5",
            "kiln_guest_memory_total_bytes 1024000",
            "kiln_guest_load1 0.5",
            "kiln_guest_uptime_seconds 12.5",
            "# TYPE kiln_agent_open_fds gauge",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
