//! The IPC and UTS namespaces a sandbox's containers share.
//!
//! Kata's agent gives each sandbox one IPC and one UTS namespace, and puts
//! every container whose spec asks for those namespaces into them (so the
//! containers of a pod share SysV IPC and the pod's hostname). They must
//! outlive any one container, so they are created by a short-lived thread
//! and kept alive by bind-mounting its namespace files under the run
//! directory.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

use crate::error::{internal, os, Result};

#[derive(Debug)]
pub struct SharedNamespaces {
    pub ipc: PathBuf,
    pub uts: PathBuf,
}

impl SharedNamespaces {
    /// New IPC and UTS namespaces pinned at `dir/ipc` and `dir/uts`; the UTS
    /// one gets `hostname` (the sandbox's), when there is one.
    pub fn create(dir: &Path, hostname: Option<&str>) -> Result<SharedNamespaces> {
        fs::create_dir_all(dir).map_err(|e| os(format!("creating {}", dir.display()), e))?;
        let ns = SharedNamespaces {
            ipc: dir.join("ipc"),
            uts: dir.join("uts"),
        };
        for f in [&ns.ipc, &ns.uts] {
            fs::File::create(f).map_err(|e| os(format!("creating {}", f.display()), e))?;
        }
        let (ipc, uts) = (ns.ipc.clone(), ns.uts.clone());
        let hostname = hostname.map(str::to_string);
        // unshare() in a thread of its own changes only that thread's
        // namespaces; the bind mounts keep them once it has exited.
        let made = std::thread::spawn(move || -> Result<()> {
            unshare(CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
                .map_err(|e| os("unshare(CLONE_NEWIPC|CLONE_NEWUTS)", e))?;
            if let Some(h) = &hostname {
                nix::unistd::sethostname(h).map_err(|e| os(format!("sethostname({h})"), e))?;
            }
            for (kind, target) in [("ipc", &ipc), ("uts", &uts)] {
                let src = format!("/proc/thread-self/ns/{kind}");
                mount(
                    Some(src.as_str()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| {
                    os(
                        format!("pinning the {kind} namespace at {}", target.display()),
                        e,
                    )
                })?;
            }
            Ok(())
        })
        .join()
        .map_err(|_| internal("the namespace thread panicked"))?;
        if let Err(e) = made {
            ns.release();
            return Err(e);
        }
        Ok(ns)
    }

    /// Unpins both namespaces (they end with their last process).
    pub fn release(&self) {
        for f in [&self.ipc, &self.uts] {
            let _ = umount2(f, MntFlags::MNT_DETACH);
            let _ = fs::remove_file(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_namespaces_differ_from_ours_and_carry_the_hostname() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let ns = SharedNamespaces::create(d.path(), Some("pod-a")).unwrap();
        let ours = fs::metadata("/proc/self/ns/uts").unwrap();
        let pinned = fs::metadata(&ns.uts).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_ne!(ours.ino(), pinned.ino(), "a new UTS namespace");
        assert_ne!(
            fs::metadata("/proc/self/ns/ipc").unwrap().ino(),
            fs::metadata(&ns.ipc).unwrap().ino()
        );
        // Join it in a thread and read the hostname there.
        let uts = ns.uts.clone();
        let name = std::thread::spawn(move || {
            nix::sched::setns(fs::File::open(uts).unwrap(), CloneFlags::CLONE_NEWUTS).unwrap();
            nix::unistd::gethostname().unwrap().into_string().unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(name, "pod-a");
        ns.release();
        assert!(!ns.uts.exists());
    }
}
