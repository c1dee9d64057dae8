//! Storages (`agent.Storage`): the filesystems a sandbox or container needs,
//! mounted in the guest by driver, reference-counted by mount point.
//!
//! | driver | what happens |
//! | --- | --- |
//! | `virtio-fs` | the virtio-fs tag (`kataShared`) is mounted at the mount point, once |
//! | `local` | a directory is created (mode from `mode=`) |
//! | `ephemeral` | a tmpfs |
//! | `blk`, `virtio-blk`, `virtio-blk-pci` | the disk at the PCI path in `source` is awaited and mounted |
//! | `nvdimm`, `pmem` | the `/dev/pmemN` in `source` is awaited and mounted (`dax` when in the options) |
//!
//! Mount points must lie under the agent's run directory
//! (`/run/kata-containers`), with no `..` and no symlinks on the way.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::agent;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::container::spec::parse_mount_options;
use crate::error::{invalid, os, Result};
use crate::guest::GuestFs;
use crate::paths::confined;
use crate::pci::{self, PciPath};
use crate::uevent;

/// Drivers kiln handles (reported in GetGuestDetails).
pub const DRIVERS: &[&str] = &[
    "virtio-fs",
    "local",
    "ephemeral",
    "blk",
    "virtio-blk",
    "virtio-blk-pci",
    "nvdimm",
    "pmem",
];

/// What a storage needs from the rest of the agent.
pub struct StorageEnv<'a> {
    pub run_dir: &'a Path,
    pub guest: &'a GuestFs,
    pub hotplug_timeout: Duration,
}

#[derive(Debug)]
struct Entry {
    refs: usize,
    /// Something was mounted there (else: a plain directory).
    mounted: bool,
}

/// Every storage the agent has set up, by mount point.
#[derive(Debug, Default)]
pub struct Storages {
    entries: HashMap<PathBuf, Entry>,
}

impl Storages {
    /// Sets up `s` (or takes another reference on it); returns its mount point.
    pub async fn add(&mut self, env: &StorageEnv<'_>, s: &agent::Storage) -> Result<PathBuf> {
        let mount_point = confined("Storage.mount_point", env.run_dir, &s.mount_point)?;
        if let Some(e) = self.entries.get_mut(&mount_point) {
            e.refs += 1;
            return Ok(mount_point);
        }
        let mounted = setup(env, s, &mount_point)
            .await
            .map_err(|e| e.context(format!("storage {} ({})", s.mount_point, s.driver)))?;
        self.entries
            .insert(mount_point.clone(), Entry { refs: 1, mounted });
        Ok(mount_point)
    }

    /// Drops one reference; the last one unmounts.
    pub fn release(&mut self, mount_point: &Path) {
        let Some(e) = self.entries.get_mut(mount_point) else {
            return;
        };
        e.refs = e.refs.saturating_sub(1);
        if e.refs > 0 {
            return;
        }
        let mounted = e.mounted;
        self.entries.remove(mount_point);
        if mounted {
            if let Err(e) = umount2(mount_point, MntFlags::empty()) {
                tracing::warn!(mount_point = %mount_point.display(), "unmount failed ({e}); detaching");
                let _ = umount2(mount_point, MntFlags::MNT_DETACH);
            }
            let _ = fs::remove_dir(mount_point);
        }
    }

    #[cfg(test)]
    pub fn refs(&self, mount_point: &Path) -> usize {
        self.entries.get(mount_point).map_or(0, |e| e.refs)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn mkdirs(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| os(format!("creating {}", p.display()), e))
}

fn do_mount(source: &str, target: &Path, fstype: &str, options: &[String]) -> Result<()> {
    let o = parse_mount_options(options)?;
    let flags = o.flags & !MsFlags::MS_BIND;
    mount(Some(source), target, Some(fstype), flags, o.data()).map_err(|e| {
        os(
            format!(
                "mounting {source} ({fstype}) on {} with {options:?}",
                target.display()
            ),
            e,
        )
    })
}

/// Returns whether something was mounted.
async fn setup(env: &StorageEnv<'_>, s: &agent::Storage, mount_point: &Path) -> Result<bool> {
    if s.source.contains('\0') || s.fstype.contains('\0') {
        return Err(invalid("source or fstype contains NUL"));
    }
    match s.driver.as_str() {
        "virtio-fs" => {
            if s.source.is_empty() || s.source.len() > 36 || s.source.contains('/') {
                return Err(invalid(format!(
                    "virtio-fs tag {:?} is not a tag (like kataShared)",
                    s.source
                )));
            }
            mkdirs(mount_point)?;
            do_mount(&s.source, mount_point, "virtiofs", &s.options)?;
            Ok(true)
        }
        "local" => {
            mkdirs(mount_point)?;
            let o = parse_mount_options(&s.options)?;
            if let Some(mode) = o.data.split(',').find_map(|kv| kv.strip_prefix("mode=")) {
                let mode = u32::from_str_radix(mode, 8)
                    .map_err(|_| invalid(format!("local storage mode {mode:?} is not octal")))?;
                fs::set_permissions(mount_point, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| os(format!("chmod {}", mount_point.display()), e))?;
            }
            Ok(false)
        }
        "ephemeral" => {
            mkdirs(mount_point)?;
            let fstype = if s.fstype.is_empty() {
                "tmpfs"
            } else {
                s.fstype.as_str()
            };
            if fstype != "tmpfs" {
                return Err(invalid(format!(
                    "ephemeral storage fstype {fstype:?}: only tmpfs is supported"
                )));
            }
            do_mount("tmpfs", mount_point, "tmpfs", &s.options)?;
            Ok(true)
        }
        "blk" | "virtio-blk" | "virtio-blk-pci" => {
            let path: PciPath = s.source.parse()?;
            let _ = fs::write(env.guest.path("/sys/bus/pci/rescan"), "1");
            let guest = env.guest.clone();
            let dev = uevent::wait_for(
                &format!("virtio-blk disk at PCI path {}", s.source),
                env.hotplug_timeout,
                || pci::resolve(&guest, &path).and_then(|bdf| pci::block_device(&guest, &bdf)),
                |ev| ev.get("SUBSYSTEM") == "block" || ev.get("SUBSYSTEM") == "pci",
            )
            .await?;
            mount_block(s, &format!("/dev/{dev}"), mount_point)
        }
        "nvdimm" | "pmem" => {
            let name = s
                .source
                .strip_prefix("/dev/")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric()))
                .ok_or_else(|| {
                    invalid(format!("pmem source {:?} is not like /dev/pmem0", s.source))
                })?
                .to_string();
            let guest = env.guest.clone();
            let dev_path = guest.path("/dev").join(&name);
            uevent::wait_for(
                &format!("persistent-memory device {}", s.source),
                env.hotplug_timeout,
                || crate::pci::block_node_ready(&dev_path).then_some(()),
                |ev| ev.get("SUBSYSTEM") == "block" && ev.get("DEVNAME") == name,
            )
            .await?;
            mount_block(s, &s.source, mount_point)
        }
        "" => Err(invalid("Storage.driver is empty")),
        other => Err(invalid(format!(
            "storage driver {other:?} is not supported (supported: {})",
            DRIVERS.join(", ")
        ))),
    }
}

fn mount_block(s: &agent::Storage, dev: &str, mount_point: &Path) -> Result<bool> {
    if s.fstype.is_empty() {
        return Err(invalid(format!(
            "storage for {dev} has no fstype (ext4, xfs, ...)"
        )));
    }
    mkdirs(mount_point)?;
    do_mount(dev, mount_point, &s.fstype, &s.options)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(driver: &str, source: &str, mount_point: &str) -> agent::Storage {
        let mut s = agent::Storage::new();
        s.driver = driver.into();
        s.source = source.into();
        s.mount_point = mount_point.into();
        s
    }

    #[tokio::test]
    async fn local_storage_is_reference_counted_and_confined() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        fs::create_dir_all(&run).unwrap();
        let guest = GuestFs::new(dir.path());
        let env = StorageEnv {
            run_dir: &run,
            guest: &guest,
            hotplug_timeout: Duration::from_secs(1),
        };
        let mut st = Storages::default();
        let mp = format!("{}/sandbox/local/vol", run.display());
        let mut s = storage("local", "local", &mp);
        s.options = vec!["mode=0750".into()];
        let p = st.add(&env, &s).await.unwrap();
        assert!(p.is_dir());
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o750
        );
        st.add(&env, &s).await.unwrap();
        assert_eq!(st.refs(&p), 2);
        st.release(&p);
        assert_eq!(st.refs(&p), 1);
        st.release(&p);
        assert!(st.is_empty());

        for bad in [
            "/etc/x".to_string(),
            format!("{}/../x", run.display()),
            "rel".into(),
        ] {
            let e = st
                .add(&env, &storage("local", "local", &bad))
                .await
                .unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument, "{bad}");
        }
        let e = st.add(&env, &storage("9p", "x", &mp)).await.unwrap_err();
        assert!(e.message.contains("not supported"), "{}", e.message);
        let e = st
            .add(&env, &storage("blk", "zz/00", &mp))
            .await
            .unwrap_err();
        assert!(e.message.contains("PCI path"), "{}", e.message);
        let e = st
            .add(&env, &storage("pmem", "/dev/../etc/passwd", &mp))
            .await
            .unwrap_err();
        assert!(e.message.contains("pmem"), "{}", e.message);
    }

    #[tokio::test]
    async fn block_storage_found_by_pci_path_in_a_fake_tree() {
        if uevent::UeventListener::new().is_err() {
            eprintln!("skipping: no uevent socket (needs root)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        crate::pci::tests::fake_pci_tree(dir.path(), false);
        let run = dir.path().join("run");
        let guest = GuestFs::new(dir.path());
        let env = StorageEnv {
            run_dir: &run,
            guest: &guest,
            hotplug_timeout: Duration::from_millis(300),
        };
        let mut st = Storages::default();
        let mut s = storage("blk", "02/00", &format!("{}/c1/rootfs", run.display()));
        s.fstype = "ext4".into();
        let e = st.add(&env, &s).await.unwrap_err();
        assert_eq!(
            e.kind,
            crate::error::ErrorKind::DeadlineExceeded,
            "{}",
            e.message
        );
        assert!(e.message.contains("02/00"), "{}", e.message);
    }
}
