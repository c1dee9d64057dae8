//! cgroup v2 for containers: `<root>/kiln/<sandbox>/<container>`.
//!
//! Everything goes through files under a root path (default `/sys/fs/cgroup`),
//! so the logic is tested against a plain temp directory. Only v2 is supported:
//! the guest kernel mounts nothing else.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_protocol::agent;

use super::spec::Resources;
use crate::error::{os, precondition, Result};

/// Controllers kiln enables for container cgroups when the kernel has them.
const CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids", "hugetlb"];

/// The cgroup v2 hierarchy kiln manages.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    root: PathBuf,
}

impl CgroupTree {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CgroupTree { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn sandbox_path(&self, sandbox: &str) -> PathBuf {
        self.root.join("kiln").join(sandbox)
    }

    /// Creates (or reuses) the container's cgroup, enabling controllers on the
    /// way down. Ids are validated by the caller (`error::check_id`).
    pub fn create(&self, sandbox: &str, container: &str) -> Result<Cgroup> {
        let kiln = self.root.join("kiln");
        let sb = kiln.join(sandbox);
        let path = sb.join(container);
        for (parent, child) in [(&self.root, &kiln), (&kiln, &sb), (&sb, &path)] {
            if !child.is_dir() {
                fs::create_dir(child)
                    .or_else(|e| if child.is_dir() { Ok(()) } else { Err(e) })
                    .map_err(|e| {
                        os(
                            format!(
                                "creating cgroup {} (is cgroup2 mounted at {}?)",
                                child.display(),
                                self.root.display()
                            ),
                            e,
                        )
                    })?;
            }
            enable_controllers(parent);
        }
        Ok(Cgroup { path })
    }

    /// Removes the sandbox's (now empty) cgroup directories.
    pub fn remove_sandbox(&self, sandbox: &str) {
        let sb = self.sandbox_path(sandbox);
        if let Ok(entries) = fs::read_dir(&sb) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = Cgroup { path: e.path() }.remove(Duration::from_secs(2));
                }
            }
        }
        let _ = fs::remove_dir(&sb);
    }
}

/// Writes `+controller` into `dir/cgroup.subtree_control` for every wanted
/// controller `dir` offers. Failures are logged: a missing controller only
/// matters when a limit for it is asked for, and that reports its own error.
fn enable_controllers(dir: &Path) {
    let Ok(available) = fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|c| CONTROLLERS.contains(c) && !enabled.split_whitespace().any(|e| e == *c))
        .map(|c| format!("+{c}"))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let file = dir.join("cgroup.subtree_control");
    // One write for all; if the kernel refuses one of them, try each alone.
    if write_existing(&file, &wanted.join(" ")).is_ok() {
        return;
    }
    for w in &wanted {
        if let Err(e) = write_existing(&file, w) {
            tracing::warn!(dir = %dir.display(), controller = %w, "cannot enable cgroup controller: {e}");
        }
    }
}

/// Writes to a file that must already exist (cgroupfs creates them; a
/// missing one means the controller is absent, not that we should create it).
fn write_existing(path: &Path, value: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(value.as_bytes())
}

/// One container's cgroup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    #[cfg(test)]
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Cgroup { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn set(&self, file: &str, value: &str, controller: &str) -> Result<()> {
        let p = self.path.join(file);
        write_existing(&p, value).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                precondition(format!(
                    "cannot set {file}={value}: the {controller} cgroup controller is not available in {} (the guest kernel needs it and it must be enabled in the parent's cgroup.subtree_control)",
                    self.path.display()
                ))
            } else {
                os(format!("writing {value:?} to {}", p.display()), e)
            }
        })
    }

    /// Applies every limit that is set; unset ones are left alone.
    pub fn apply(&self, r: &Resources) -> Result<()> {
        let max = |v: i64| {
            if v < 0 {
                "max".to_string()
            } else {
                v.to_string()
            }
        };
        // cpuset first: a later write can depend on it (cpu.max does not, but
        // tasks must have CPUs before they run).
        if let Some(c) = &r.cpuset_cpus {
            self.set("cpuset.cpus", c, "cpuset")?;
        }
        if let Some(m) = &r.cpuset_mems {
            self.set("cpuset.mems", m, "cpuset")?;
        }
        if let Some(v) = r.memory_low {
            self.set("memory.low", &v.to_string(), "memory")?;
        }
        if let Some(v) = r.memory_max {
            self.set("memory.max", &max(v), "memory")?;
        }
        if let Some(v) = r.memory_swap_max {
            self.set("memory.swap.max", &max(v), "memory")?;
        }
        if let Some((quota, period)) = r.cpu_max {
            let q = quota.map_or_else(|| "max".to_string(), |q| q.to_string());
            self.set("cpu.max", &format!("{q} {period}"), "cpu")?;
        }
        if let Some(w) = r.cpu_weight {
            self.set("cpu.weight", &w.to_string(), "cpu")?;
        }
        if let Some(p) = r.pids_max {
            self.set(
                "pids.max",
                &p.map_or_else(|| "max".to_string(), |v| v.to_string()),
                "pids",
            )?;
        }
        if let Some(w) = r.io_weight {
            self.set("io.weight", &format!("default {w}"), "io")?;
        }
        for (size, limit) in &r.hugetlb_max {
            self.set(
                &format!("hugetlb.{size}.max"),
                &limit.to_string(),
                "hugetlb",
            )?;
        }
        Ok(())
    }

    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process in the cgroup: `cgroup.kill` (Linux 5.14+), else
    /// SIGKILL to each listed pid.
    pub fn kill_all(&self) {
        if write_existing(&self.path.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        for pid in self.procs() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Freezes or thaws, then waits until `cgroup.events` says it happened.
    pub async fn set_frozen(&self, frozen: bool) -> Result<()> {
        let v = if frozen { "1" } else { "0" };
        self.set("cgroup.freeze", v, "core (cgroup.freeze, Linux 5.2+)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let events = fs::read_to_string(self.path.join("cgroup.events")).unwrap_or_default();
            if events.lines().any(|l| l.trim() == format!("frozen {v}")) || events.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(crate::error::timeout(format!(
                    "{} did not report frozen {v} within 10 s",
                    self.path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn memory_events_path(&self) -> PathBuf {
        self.path.join("memory.events")
    }

    /// Removes the directory, retrying while exiting processes leave it.
    pub fn remove(&self, patience: Duration) -> Result<()> {
        let deadline = Instant::now() + patience;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(os(format!("removing cgroup {}", self.path.display()), e)),
            }
        }
    }

    /// cgroup v2 statistics in Kata's (v1-shaped) message.
    pub fn stats(&self) -> agent::CgroupStats {
        let read = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let single = |f: &str| read(f).trim().parse::<u64>().ok();
        let mut st = agent::CgroupStats::new();

        let cpu_stat = read("cpu.stat");
        let mut usage = agent::CpuUsage::new();
        usage.total_usage = flat_keyed(&cpu_stat, "usage_usec").unwrap_or(0) * 1000;
        usage.usage_in_usermode = flat_keyed(&cpu_stat, "user_usec").unwrap_or(0) * 1000;
        usage.usage_in_kernelmode = flat_keyed(&cpu_stat, "system_usec").unwrap_or(0) * 1000;
        let mut thr = agent::ThrottlingData::new();
        thr.periods = flat_keyed(&cpu_stat, "nr_periods").unwrap_or(0);
        thr.throttled_periods = flat_keyed(&cpu_stat, "nr_throttled").unwrap_or(0);
        thr.throttled_time = flat_keyed(&cpu_stat, "throttled_usec").unwrap_or(0) * 1000;
        let mut cpu = agent::CpuStats::new();
        cpu.cpu_usage = Some(usage).into();
        cpu.throttling_data = Some(thr).into();
        st.cpu_stats = Some(cpu).into();

        let mut mem = agent::MemoryStats::new();
        let mem_stat = read("memory.stat");
        for l in mem_stat.lines() {
            if let Some((k, v)) = l.split_once(' ') {
                if let Ok(v) = v.trim().parse() {
                    mem.stats.insert(k.to_string(), v);
                }
            }
        }
        mem.cache = flat_keyed(&mem_stat, "file").unwrap_or(0);
        mem.use_hierarchy = true;
        let mut usage = agent::MemoryData::new();
        usage.usage = single("memory.current").unwrap_or(0);
        usage.max_usage = single("memory.peak").unwrap_or(0);
        usage.limit = single("memory.max").unwrap_or(u64::MAX);
        usage.failcnt = flat_keyed(&read("memory.events"), "max").unwrap_or(0);
        mem.usage = Some(usage).into();
        let mut swap = agent::MemoryData::new();
        swap.usage = single("memory.swap.current").unwrap_or(0);
        swap.limit = single("memory.swap.max").unwrap_or(u64::MAX);
        mem.swap_usage = Some(swap).into();
        st.memory_stats = Some(mem).into();

        let mut pids = agent::PidsStats::new();
        pids.current = single("pids.current").unwrap_or(self.procs().len() as u64);
        pids.limit = single("pids.max").unwrap_or(0);
        st.pids_stats = Some(pids).into();

        let mut blkio = agent::BlkioStats::new();
        for line in read("io.stat").lines() {
            let mut words = line.split_whitespace();
            let Some((major, minor)) = words.next().and_then(|d| d.split_once(':')) else {
                continue;
            };
            let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) else {
                continue;
            };
            for kv in words {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let Ok(value) = v.parse::<u64>() else {
                    continue;
                };
                let (list, op) = match k {
                    "rbytes" => (&mut blkio.io_service_bytes_recursive, "Read"),
                    "wbytes" => (&mut blkio.io_service_bytes_recursive, "Write"),
                    "rios" => (&mut blkio.io_serviced_recursive, "Read"),
                    "wios" => (&mut blkio.io_serviced_recursive, "Write"),
                    _ => continue,
                };
                let mut e = agent::BlkioStatsEntry::new();
                e.major = major;
                e.minor = minor;
                e.op = op.to_string();
                e.value = value;
                list.push(e);
            }
        }
        st.blkio_stats = Some(blkio).into();
        st
    }
}

/// Value of `key` in a flat-keyed cgroup file ("key value" per line).
pub fn flat_keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroupfs directory with the given interface files.
    fn fake_cgroup(files: &[(&str, &str)]) -> (tempfile::TempDir, Cgroup) {
        let dir = tempfile::tempdir().unwrap();
        for (f, v) in files {
            fs::write(dir.path().join(f), v).unwrap();
        }
        let cg = Cgroup::at(dir.path());
        (dir, cg)
    }

    #[test]
    fn limits_are_written_in_v2_syntax() {
        let files = [
            "memory.max",
            "memory.low",
            "memory.swap.max",
            "cpu.max",
            "cpu.weight",
            "pids.max",
            "io.weight",
            "cpuset.cpus",
            "hugetlb.2MB.max",
        ];
        let (dir, cg) = fake_cgroup(&files.iter().map(|f| (*f, "")).collect::<Vec<_>>());
        let r = Resources {
            memory_max: Some(64 << 20),
            memory_low: Some(1 << 20),
            memory_swap_max: Some(-1),
            cpu_max: Some((Some(50_000), 100_000)),
            cpu_weight: Some(100),
            pids_max: Some(None),
            io_weight: Some(500),
            cpuset_cpus: Some("0".into()),
            hugetlb_max: vec![("2MB".into(), 4 << 20)],
            ..Default::default()
        };
        cg.apply(&r).unwrap();
        let got = |f: &str| fs::read_to_string(dir.path().join(f)).unwrap();
        assert_eq!(got("memory.max"), "67108864");
        assert_eq!(got("memory.low"), "1048576");
        assert_eq!(got("memory.swap.max"), "max");
        assert_eq!(got("cpu.max"), "50000 100000");
        assert_eq!(got("cpu.weight"), "100");
        assert_eq!(got("pids.max"), "max");
        assert_eq!(got("io.weight"), "default 500");
        assert_eq!(got("cpuset.cpus"), "0");
        assert_eq!(got("hugetlb.2MB.max"), "4194304");
    }

    #[test]
    fn a_missing_controller_is_a_precondition_error_naming_it() {
        let (_dir, cg) = fake_cgroup(&[("cpu.max", "")]);
        let e = cg
            .apply(&Resources {
                memory_max: Some(1 << 20),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::FailedPrecondition);
        assert!(
            e.message.contains("memory cgroup controller"),
            "{}",
            e.message
        );
        // Nothing asked for, nothing written, no error.
        cg.apply(&Resources::default()).unwrap();
    }

    #[test]
    fn tree_creation_enables_available_controllers() {
        let root = tempfile::tempdir().unwrap();
        fs::write(
            root.path().join("cgroup.controllers"),
            "cpu memory pids rdma\n",
        )
        .unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let cg = CgroupTree::new(root.path()).create("sb1", "c1").unwrap();
        assert_eq!(cg.path(), root.path().join("kiln/sb1/c1"));
        assert!(cg.path().is_dir());
        // Only offered, wanted controllers, in one write.
        let written = fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap();
        assert_eq!(written, "+cpu +memory +pids");
        // Idempotent.
        CgroupTree::new(root.path()).create("sb1", "c1").unwrap();
    }

    #[test]
    fn stats_are_read_from_v2_files() {
        let (_d, cg) = fake_cgroup(&[
            ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 4\nnr_throttled 1\nthrottled_usec 20\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.stat", "anon 1024\nfile 2048\n"),
            ("memory.events", "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("pids.max", "100\n"),
            ("io.stat", "254:0 rbytes=512 wbytes=1024 rios=1 wios=2 dbytes=0 dios=0\n"),
        ]);
        let s = cg.stats();
        assert_eq!(s.cpu_stats.cpu_usage.total_usage, 1_500_000);
        assert_eq!(s.cpu_stats.throttling_data.throttled_periods, 1);
        assert_eq!(s.memory_stats.usage.usage, 4096);
        assert_eq!(s.memory_stats.usage.limit, u64::MAX);
        assert_eq!(s.memory_stats.usage.failcnt, 3);
        assert_eq!(s.memory_stats.cache, 2048);
        assert_eq!(s.memory_stats.stats.get("anon"), Some(&1024));
        assert_eq!(s.pids_stats.current, 2);
        assert_eq!(s.pids_stats.limit, 100);
        assert_eq!(s.blkio_stats.io_service_bytes_recursive.len(), 2);
        assert_eq!(s.blkio_stats.io_serviced_recursive[1].value, 2);
        assert_eq!(
            flat_keyed(
                &fs::read_to_string(cg.memory_events_path()).unwrap(),
                "oom_kill"
            ),
            Some(1)
        );
    }
}
