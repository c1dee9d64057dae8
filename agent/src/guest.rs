//! Facts about the guest that RPCs report, read through a root path so tests
//! can point them at a fake tree instead of the real /sys and /proc.

use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct GuestFs {
    root: PathBuf,
}

impl GuestFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        GuestFs { root: root.into() }
    }

    /// `p` (absolute, guest view) under the root.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Memory hotplug block size, from sysfs (hex without 0x). 0 when unknown.
    pub fn mem_block_size(&self) -> u64 {
        std::fs::read_to_string(self.path("/sys/devices/system/memory/block_size_bytes"))
            .ok()
            .and_then(|s| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok())
            .unwrap_or(0)
    }

    /// Whether memory can be hot-added through the probe interface.
    pub fn mem_hotplug_probe(&self) -> bool {
        self.path("/sys/devices/system/memory/probe").exists()
    }

    /// Brings offline CPUs online; returns how many it onlined. A CPU whose
    /// `online` file refuses the write is skipped (as Kata's agent does): the
    /// caller counts what is online afterwards.
    pub fn online_cpus(&self) -> std::io::Result<u32> {
        self.online_all("/sys/devices/system/cpu", "cpu", "online", "0", "1")
    }

    /// Brings offline memory blocks online; returns how many it onlined
    /// (blocks the kernel refuses to online are skipped, as Kata's agent does).
    pub fn online_memory(&self) -> std::io::Result<u32> {
        self.online_all(
            "/sys/devices/system/memory",
            "memory",
            "state",
            "offline",
            "online",
        )
    }

    /// CPUs that are online now, from `/sys/devices/system/cpu/online` ("0-3,5").
    pub fn online_cpu_count(&self) -> u32 {
        let s = std::fs::read_to_string(self.path("/sys/devices/system/cpu/online"))
            .unwrap_or_default();
        s.trim()
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| match r.split_once('-') {
                Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                    (Ok(a), Ok(b)) if b >= a => b - a + 1,
                    _ => 0,
                },
                None => u32::from(r.parse::<u32>().is_ok()),
            })
            .sum()
    }

    fn online_all(
        &self,
        dir: &str,
        prefix: &str,
        file: &str,
        off: &str,
        on: &str,
    ) -> std::io::Result<u32> {
        let mut n = 0;
        for e in std::fs::read_dir(self.path(dir))?.flatten() {
            let name = e.file_name();
            let Some(idx) = name.to_str().and_then(|s| s.strip_prefix(prefix)) else {
                continue;
            };
            if idx.is_empty() || !idx.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let f = e.path().join(file);
            if std::fs::read_to_string(&f)
                .map(|s| s.trim() == off)
                .unwrap_or(false)
            {
                match std::fs::write(&f, on) {
                    Ok(()) => n += 1,
                    Err(e) => tracing::debug!(file = %f.display(), "not onlined: {e}"),
                }
            }
        }
        Ok(n)
    }

    /// `/proc/net/dev` as (interface, rx bytes, rx packets, rx errs, rx drop,
    /// tx bytes, tx packets, tx errs, tx drop).
    pub fn net_dev(&self) -> Vec<(String, [u64; 8])> {
        let s = std::fs::read_to_string(self.path("/proc/net/dev")).unwrap_or_default();
        s.lines()
            .skip(2)
            .filter_map(|l| {
                let (name, rest) = l.split_once(':')?;
                let v: Vec<u64> = rest
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                (v.len() >= 12).then(|| {
                    (
                        name.trim().to_string(),
                        [v[0], v[1], v[2], v[3], v[8], v[9], v[10], v[11]],
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn onlines_cpus_and_memory_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("sys/devices/system/cpu");
        for (n, state) in [(1, "1"), (2, "0"), (3, "0")] {
            std::fs::create_dir_all(cpu.join(format!("cpu{n}"))).unwrap();
            std::fs::write(cpu.join(format!("cpu{n}/online")), state).unwrap();
        }
        std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
        std::fs::write(cpu.join("online"), "0-1,3\n").unwrap();
        let mem = dir.path().join("sys/devices/system/memory");
        for (n, state) in [(0, "online"), (1, "offline")] {
            std::fs::create_dir_all(mem.join(format!("memory{n}"))).unwrap();
            std::fs::write(mem.join(format!("memory{n}/state")), state).unwrap();
        }
        let g = GuestFs::new(dir.path());
        assert_eq!(g.online_cpu_count(), 3);
        assert_eq!(g.online_cpus().unwrap(), 2);
        assert_eq!(
            std::fs::read_to_string(cpu.join("cpu3/online")).unwrap(),
            "1"
        );
        assert_eq!(g.online_cpus().unwrap(), 0, "idempotent");
        assert_eq!(g.online_memory().unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(mem.join("memory1/state")).unwrap(),
            "online"
        );
    }

    #[test]
    fn net_dev_is_parsed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/net")).unwrap();
        std::fs::write(
            dir.path().join("proc/net/dev"),
            "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n    lo: 100 2 0 0 0 0 0 0 100 2 0 0 0 0 0 0\n  eth0: 5 6 7 8 0 0 0 0 9 10 11 12 0 0 0 0\n",
        )
        .unwrap();
        let v = GuestFs::new(dir.path()).net_dev();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1], ("eth0".to_string(), [5, 6, 7, 8, 9, 10, 11, 12]));
    }

    #[test]
    fn reads_block_size_from_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("sys/devices/system/memory");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("block_size_bytes"), "8000000\n").unwrap();
        let g = GuestFs::new(dir.path());
        assert_eq!(g.mem_block_size(), 0x800_0000);
        assert!(!g.mem_hotplug_probe());
        std::fs::write(mem.join("probe"), "").unwrap();
        assert!(g.mem_hotplug_probe());
    }

    #[test]
    fn missing_or_garbage_block_size_is_zero() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(GuestFs::new(dir.path()).mem_block_size(), 0);
        let mem = dir.path().join("sys/devices/system/memory");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("block_size_bytes"), "zz").unwrap();
        assert_eq!(GuestFs::new(dir.path()).mem_block_size(), 0);
    }
}
