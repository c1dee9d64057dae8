//! The run directory's `state.json`: which shim owns the VM and which
//! processes and mounts it made. A shim killed with SIGKILL cannot clean up;
//! the next run (or `kiln-shim cleanup`) reads this file and does it instead.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "state.json";

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    /// Start time (clock ticks since boot, /proc/PID/stat field 22): a pid
    /// reused by another process has another start time.
    pub start_time: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub name: String,
    pub pid: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunState {
    #[serde(skip)]
    dir: PathBuf,
    pub owner: Owner,
    pub children: Vec<Child>,
    pub mounts: Vec<PathBuf>,
    /// Host devices bound to vfio-pci for this VM, to give back to their drivers.
    #[serde(default)]
    pub vfio: Vec<crate::vfio::BoundDevice>,
}

impl RunState {
    pub fn new(dir: &Path) -> RunState {
        let pid = std::process::id();
        RunState {
            dir: dir.to_path_buf(),
            owner: Owner {
                pid,
                start_time: start_time(pid).unwrap_or(0),
            },
            children: Vec::new(),
            mounts: Vec::new(),
            vfio: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &str, pid: Option<u32>) -> anyhow::Result<()> {
        if let Some(pid) = pid {
            self.children.push(Child {
                name: name.to_string(),
                pid,
            });
        }
        self.save()
    }

    pub fn add_mount(&mut self, path: &Path) -> anyhow::Result<()> {
        self.mounts.push(path.to_path_buf());
        self.save()
    }

    /// Recorded before the device is touched, so a crash mid-bind is undone too.
    pub fn add_vfio(&mut self, d: crate::vfio::BoundDevice) -> anyhow::Result<()> {
        self.vfio.push(d);
        self.save()
    }

    fn save(&self) -> anyhow::Result<()> {
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, self.dir.join(FILE)).context("saving the run state")?;
        Ok(())
    }

    pub fn load(dir: &Path) -> anyhow::Result<RunState> {
        let text = std::fs::read(dir.join(FILE))?;
        let mut s: RunState = serde_json::from_slice(&text)?;
        s.dir = dir.to_path_buf();
        Ok(s)
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it are plain.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(o: &Owner) -> bool {
    start_time(o.pid).is_some_and(|t| t == o.start_time)
}

/// Whether `pid` is a live process whose command line mentions `needle`
/// (so a recycled pid is never killed by mistake).
fn process_mentions(pid: u32, needle: &str) -> bool {
    let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    String::from_utf8_lossy(&cmd).contains(needle)
}

/// Whether `m` may be a mount the shim of run directory `dir` made: every
/// such mount lies inside `dir`. A planted or corrupt state.json must not
/// make cleanup unmount anything else.
fn own_mount(dir: &Path, m: &Path) -> bool {
    m.is_absolute()
        && m != dir
        && m.starts_with(dir)
        && m.components().all(|c| {
            !matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        })
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub removed_dirs: Vec<PathBuf>,
    pub killed: Vec<(String, u32)>,
    pub unmounted: Vec<PathBuf>,
    /// Host PCI devices given back from vfio-pci to their drivers.
    pub restored: Vec<crate::vfio::HostBdf>,
}

/// Cleans every run directory under `base` whose owning shim is gone.
pub fn cleanup_stale(base: &Path) -> anyhow::Result<CleanupReport> {
    let mut report = CleanupReport::default();
    let Ok(entries) = std::fs::read_dir(base) else {
        return Ok(report);
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let state = RunState::load(&dir);
        if let Err(e) = &state {
            if dir.join(FILE).exists() {
                tracing::warn!("{}: {e:#}; nothing it names is touched", dir.display());
            }
        }
        let Ok(state) = state else {
            // No state yet: a shim is between creating the dir and writing it,
            // or crashed right then. Leave young ones alone.
            let young = entry
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().map(|e| e.as_secs() < 60).unwrap_or(true))
                .unwrap_or(true);
            if !young && crate::process::remove_dir_if_unmounted(&dir) {
                report.removed_dirs.push(dir);
            }
            continue;
        };
        if owner_alive(&state.owner) {
            continue;
        }
        let needle = dir.display().to_string();
        for c in &state.children {
            if process_mentions(c.pid, &needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(c.pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                report.killed.push((c.name.clone(), c.pid));
            }
        }
        restore_vfio(Path::new("/"), &state.vfio, &mut report);
        for m in state.mounts.iter().rev() {
            if !own_mount(&dir, m) {
                tracing::warn!(
                    "{}: state.json names mount {} outside its run directory; left alone",
                    dir.display(),
                    m.display()
                );
                continue;
            }
            if nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH).is_ok() {
                report.unmounted.push(m.clone());
            }
        }
        if crate::process::remove_dir_if_unmounted(&dir) {
            report.removed_dirs.push(dir);
        }
    }
    Ok(report)
}

/// Gives devices a dead shim bound back to their drivers (QEMU was killed
/// just before; vfio-pci's unbind waits until it has let go).
fn restore_vfio(root: &Path, devices: &[crate::vfio::BoundDevice], report: &mut CleanupReport) {
    let host = crate::vfio::Host::new(root, &crate::vfio::RealWriter);
    for d in devices.iter().rev() {
        match host.restore(d) {
            Ok(()) => report.restored.push(d.bdf.clone()),
            Err(e) => tracing::warn!("giving {} back to its driver: {e:#}", d.bdf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_alive() {
        let me = Owner {
            pid: std::process::id(),
            start_time: start_time(std::process::id()).unwrap(),
        };
        assert!(owner_alive(&me));
        assert!(
            !owner_alive(&Owner {
                pid: me.pid,
                start_time: me.start_time + 1
            }),
            "recycled pid"
        );
    }

    #[test]
    fn only_mounts_inside_the_run_directory_are_undone() {
        let dir = Path::new("/run/kiln/vm-abc");
        assert!(own_mount(
            dir,
            Path::new("/run/kiln/vm-abc/shared/dev/rootfs")
        ));
        for foreign in [
            "/home",
            "/",
            "/run/kiln/vm-abc",
            "/run/kiln/vm-abcd/shared",
            "/run/kiln/vm-abc/../vm-other/shared",
            "run/kiln/vm-abc/shared",
        ] {
            assert!(!own_mount(dir, Path::new(foreign)), "{foreign}");
        }
    }

    #[test]
    fn stale_dir_is_cleaned_and_its_child_killed_but_live_one_kept() {
        let base = tempfile::tempdir().unwrap();
        // A dead owner: a finished process.
        let mut done = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = done.id();
        done.wait().unwrap();
        let stale = base.path().join("vm-stale");
        std::fs::create_dir(&stale).unwrap();
        // A child that mentions the run dir on its command line, like QEMU does.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60; true", &stale.display().to_string()])
            .spawn()
            .unwrap();
        let mut st = RunState::new(&stale);
        st.owner = Owner {
            pid: dead_pid,
            start_time: 1,
        };
        st.add("sleeper", Some(child.id())).unwrap();
        // Between fork and exec the child's cmdline is still ours: wait for
        // the exec, as a real stale child (long since started) would be.
        let needle = stale.display().to_string();
        for _ in 0..500 {
            if process_mentions(child.id(), &needle) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let live = base.path().join("vm-live");
        std::fs::create_dir(&live).unwrap();
        RunState::new(&live).add("none", None).unwrap();

        let report = cleanup_stale(base.path()).unwrap();
        assert_eq!(report.removed_dirs, vec![stale.clone()]);
        assert_eq!(report.killed, vec![("sleeper".to_string(), child.id())]);
        let status = child.wait().unwrap();
        assert!(!status.success(), "child was killed");
        assert!(!stale.exists() && live.exists());
    }
}
