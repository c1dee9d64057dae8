//! Storages (`agent.Storage`): the filesystems a sandbox or container needs,
//! mounted in the guest by driver, reference-counted by mount point.
//!
//! | driver | what happens |
//! | --- | --- |
//! | `virtio-fs` | the virtio-fs tag (`kataShared`) is mounted at the mount point, once |
//! | `local` | a directory is created (mode from `mode=`) |
//! | `ephemeral` | a tmpfs (`fsgid=N`: owned by group N, setgid, as Kata does), or hugetlbfs with its pages reserved |
//! | `watchable-bind` | a small shared source copied under the watchable tmpfs and kept current (see `watchable.rs`) |
//! | `9p` | the virtio-9p tag in `source` is mounted (`trans=virtio`) |
//! | `blk`, `virtio-blk`, `virtio-blk-pci` | the disk at the PCI path in `source` is awaited and mounted |
//! | `blk-ccw` | the virtio-blk disk at the CCW bus id in `source` (`0.0.0005`, s390x) is awaited and mounted |
//! | `scsi` | the virtio-scsi disk at the SCSI address in `source` (`0:1`: target 0, LUN 1) is awaited and mounted |
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

use crate::ccw::CcwId;
use crate::container::spec::parse_mount_options;
use crate::error::{invalid, os, precondition, Result};
use crate::guest::GuestFs;
use crate::paths::confined;
use crate::pci::{self, PciPath};
use crate::uevent;

/// Drivers kiln handles (reported in GetGuestDetails).
pub const DRIVERS: &[&str] = &[
    "virtio-fs",
    "local",
    "ephemeral",
    "watchable-bind",
    "9p",
    "blk",
    "virtio-blk",
    "virtio-blk-pci",
    "blk-ccw",
    "scsi",
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
    /// A watchable storage's copy, kept current until released.
    watch: Option<tokio::task::JoinHandle<()>>,
}

/// What setting a storage up left to undo.
struct Made {
    mounted: bool,
    watch: Option<tokio::task::JoinHandle<()>>,
}

impl From<bool> for Made {
    fn from(mounted: bool) -> Self {
        Made {
            mounted,
            watch: None,
        }
    }
}

/// Every storage the agent has set up, by mount point.
#[derive(Debug, Default)]
pub struct Storages {
    entries: HashMap<PathBuf, Entry>,
}

/// Option Kata's runtime adds to `ephemeral`/`local` storages of pods with
/// an fsGroup: not a mount option, the group to give the directory.
const FSGID: &str = "fsgid=";

/// Splits `fsgid=N` out of storage options.
pub fn take_fsgid(options: &[String]) -> Result<(Vec<String>, Option<u32>)> {
    let mut gid = None;
    let mut rest = Vec::new();
    for o in options {
        // Kata's options may also come comma-joined in one string.
        for part in o.split(',') {
            match part.strip_prefix(FSGID) {
                Some(v) => {
                    gid = Some(v.parse::<u32>().map_err(|_| {
                        invalid(format!(
                            "storage option {part:?}: the group id is not a number"
                        ))
                    })?)
                }
                None if !part.is_empty() => rest.push(part.to_string()),
                None => {}
            }
        }
    }
    Ok((rest, gid))
}

/// Gives `dir` to group `gid` with the setgid bit, so files made in it
/// inherit the pod's fsGroup (what Kata's agent does for `fsgid=`).
fn give_to_group(dir: &Path, gid: u32) -> Result<()> {
    nix::unistd::chown(dir, None, Some(gid.into()))
        .map_err(|e| os(format!("chgrp {gid} {}", dir.display()), e))?;
    let mode = fs::metadata(dir)
        .map_err(|e| os(format!("stat {}", dir.display()), e))?
        .permissions()
        .mode();
    fs::set_permissions(dir, fs::Permissions::from_mode((mode & 0o7777) | 0o2000))
        .map_err(|e| os(format!("chmod g+s {}", dir.display()), e))
}

impl Storages {
    /// Sets up `s` (or takes another reference on it); returns its mount point.
    pub async fn add(&mut self, env: &StorageEnv<'_>, s: &agent::Storage) -> Result<PathBuf> {
        let mount_point = confined("Storage.mount_point", env.run_dir, &s.mount_point)?;
        if let Some(e) = self.entries.get_mut(&mount_point) {
            e.refs += 1;
            return Ok(mount_point);
        }
        if s.driver == "watchable-bind" {
            self.ensure_watchable_base(env)?;
        }
        let made = setup(env, s, &mount_point)
            .await
            .map_err(|e| e.context(format!("storage {} ({})", s.mount_point, s.driver)))?;
        self.entries.insert(
            mount_point.clone(),
            Entry {
                refs: 1,
                mounted: made.mounted,
                watch: made.watch,
            },
        );
        Ok(mount_point)
    }

    /// The tmpfs under which watchable storages are copied: the share it
    /// sits in is the host's directory, which the copies must not land in.
    fn ensure_watchable_base(&mut self, env: &StorageEnv<'_>) -> Result<()> {
        let base = env.run_dir.join(WATCHABLE_DIR);
        if self.entries.contains_key(&base) {
            return Ok(());
        }
        mkdirs(&base)?;
        do_mount(
            "tmpfs",
            &base,
            "tmpfs",
            &["nodev".into(), "nosuid".into(), "mode=755".into()],
        )?;
        // Held for the sandbox's life: never released by a container.
        self.entries.insert(
            base,
            Entry {
                refs: 1,
                mounted: true,
                watch: None,
            },
        );
        Ok(())
    }

    /// UpdateEphemeralMounts: ephemeral tmpfs storages remounted with new
    /// options (the runtime sends `remount,size=…` when a memory emptyDir's
    /// limit changes); `fsgid=` is dropped, as at creation.
    pub fn update_ephemeral(&self, env: &StorageEnv<'_>, list: &[agent::Storage]) -> Result<()> {
        for s in list {
            if s.driver != "ephemeral" {
                return Err(invalid(format!(
                    "UpdateEphemeralMounts: storage {} has driver {:?}; only ephemeral storages can be updated",
                    s.mount_point, s.driver
                )));
            }
            let mp = confined("Storage.mount_point", env.run_dir, &s.mount_point)?;
            if s.options.is_empty() {
                continue;
            }
            let (opts, _) = take_fsgid(&s.options)?;
            let fstype = if s.fstype.is_empty() {
                "tmpfs"
            } else {
                s.fstype.as_str()
            };
            let o = parse_mount_options(&opts)?;
            // A remount sets every flag anew: keep nodev,nosuid.
            let flags = hardened(&opts, o.flags & !MsFlags::MS_BIND);
            mount(Some("tmpfs"), &mp, Some(fstype), flags, o.data())
                .map_err(|e| os(format!("remounting {} with {opts:?}", mp.display()), e))?;
            tracing::info!(mount_point = %mp.display(), ?opts, "ephemeral storage updated");
        }
        Ok(())
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
        if let Some(w) = e.watch.take() {
            w.abort();
            let _ = fs::remove_dir_all(mount_point).or_else(|_| fs::remove_file(mount_point));
        }
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

/// Where watchable storages live, under the run directory.
pub const WATCHABLE_DIR: &str = "shared/containers/watchable";

fn mkdirs(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| os(format!("creating {}", p.display()), e))
}

/// Storage mounts are `nodev,nosuid` unless the request says `dev` or
/// `suid`: a device node or setuid file a workload left on a shared or
/// block volume (its image is untrusted) must not work as one in the guest.
fn hardened(options: &[String], flags: MsFlags) -> MsFlags {
    let has = |o: &str| options.iter().flat_map(|x| x.split(',')).any(|x| x == o);
    let mut f = flags;
    if !has("dev") {
        f |= MsFlags::MS_NODEV;
    }
    if !has("suid") {
        f |= MsFlags::MS_NOSUID;
    }
    f
}

fn do_mount(source: &str, target: &Path, fstype: &str, options: &[String]) -> Result<()> {
    let o = parse_mount_options(options)?;
    let flags = hardened(options, o.flags & !MsFlags::MS_BIND);
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

async fn setup(env: &StorageEnv<'_>, s: &agent::Storage, mount_point: &Path) -> Result<Made> {
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
            Ok(true.into())
        }
        "local" => {
            mkdirs(mount_point)?;
            let (opts, gid) = take_fsgid(&s.options)?;
            let o = parse_mount_options(&opts)?;
            if let Some(mode) = o.data.split(',').find_map(|kv| kv.strip_prefix("mode=")) {
                let mode = u32::from_str_radix(mode, 8)
                    .map_err(|_| invalid(format!("local storage mode {mode:?} is not octal")))?;
                fs::set_permissions(mount_point, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(|e| os(format!("chmod {}", mount_point.display()), e))?;
            }
            if let Some(gid) = gid {
                give_to_group(mount_point, gid)?;
            }
            Ok(false.into())
        }
        "ephemeral" => {
            mkdirs(mount_point)?;
            match s.fstype.as_str() {
                "" | "tmpfs" => {
                    let (opts, gid) = take_fsgid(&s.options)?;
                    do_mount("tmpfs", mount_point, "tmpfs", &opts)?;
                    if let Some(gid) = gid {
                        give_to_group(mount_point, gid)?;
                    }
                }
                "hugetlbfs" => {
                    reserve_hugepages(env.guest, &s.options)?;
                    do_mount("nodev", mount_point, "hugetlbfs", &s.options)
                        .map_err(|e| e.context("is CONFIG_HUGETLBFS in the guest kernel?"))?;
                }
                other => {
                    return Err(invalid(format!(
                        "ephemeral storage fstype {other:?}: tmpfs or hugetlbfs"
                    )))
                }
            }
            Ok(true.into())
        }
        "watchable-bind" => {
            let source = confined("watchable-bind source", env.run_dir, &s.source)?;
            if !mount_point.starts_with(env.run_dir.join(WATCHABLE_DIR)) {
                return Err(invalid(format!(
                    "watchable-bind mount point {} is not under {}",
                    mount_point.display(),
                    env.run_dir.join(WATCHABLE_DIR).display()
                )));
            }
            if let Some(parent) = mount_point.parent() {
                mkdirs(parent)?;
            }
            match crate::watchable::start(source, mount_point.to_path_buf()).await? {
                crate::watchable::Watch::Copied(task) => Ok(Made {
                    mounted: false,
                    watch: Some(task),
                }),
                crate::watchable::Watch::Bound => Ok(true.into()),
            }
        }
        "9p" => {
            if s.source.is_empty() || s.source.len() > 36 || s.source.contains('/') {
                return Err(invalid(format!(
                    "9p tag {:?} is not a tag (like kataShared)",
                    s.source
                )));
            }
            mkdirs(mount_point)?;
            let mut opts = s.options.clone();
            if !opts.iter().any(|o| o.starts_with("trans=")) {
                opts.push("trans=virtio".into());
            }
            do_mount(&s.source, mount_point, "9p", &opts)
                .map_err(|e| e.context("is CONFIG_9P_FS in the guest kernel?"))?;
            Ok(true.into())
        }
        "scsi" | "blk" | "virtio-blk" | "virtio-blk-pci" | "blk-ccw" => {
            let disk = Disk::parse(&s.driver, &s.source)?;
            let dev = disk.wait(env.guest, env.hotplug_timeout).await?;
            mount_block(s, &format!("/dev/{dev}"), mount_point).map(Into::into)
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
            mount_block(s, &s.source, mount_point).map(Into::into)
        }
        "" => Err(invalid("Storage.driver is empty")),
        other => Err(invalid(format!(
            "storage driver {other:?} is not supported (supported: {})",
            DRIVERS.join(", ")
        ))),
    }
}

/// A SCSI address as Kata writes it: `target:lun` (channel 0 of any host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiAddr {
    pub target: u32,
    pub lun: u32,
}

impl ScsiAddr {
    pub fn parse(s: &str) -> Result<ScsiAddr> {
        let bad = || invalid(format!("SCSI address {s:?} is not like 0:1 (target:lun)"));
        let (t, l) = s.split_once(':').ok_or_else(bad)?;
        Ok(ScsiAddr {
            target: t.parse().map_err(|_| bad())?,
            lun: l.parse().map_err(|_| bad())?,
        })
    }

    /// The `sdX` behind this address: `/sys/bus/scsi/devices/H:0:T:L/block/`.
    pub fn block_device(&self, guest: &GuestFs) -> Option<String> {
        let suffix = format!(":0:{}:{}", self.target, self.lun);
        let devs = fs::read_dir(guest.path("/sys/bus/scsi/devices")).ok()?;
        devs.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
            .find_map(|e| {
                fs::read_dir(e.path().join("block"))
                    .ok()?
                    .flatten()
                    .map(|b| b.file_name().to_string_lossy().into_owned())
                    .find(|n| crate::pci::block_node_ready(&guest.path("/dev").join(n)))
            })
    }
}

/// A hot-plugged disk as Kata names it: virtio-blk by guest PCI path (or by
/// CCW bus id on s390x), virtio-scsi by `target:lun`. Storages and
/// CreateContainer devices both wait for one the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disk {
    Pci(PciPath),
    Ccw(CcwId),
    Scsi(ScsiAddr),
}

impl Disk {
    /// `kind` is the storage driver or device type (`scsi`, `blk-ccw`, else
    /// virtio-blk on PCI).
    pub fn parse(kind: &str, at: &str) -> Result<Disk> {
        Ok(match kind {
            "scsi" => Disk::Scsi(ScsiAddr::parse(at)?),
            "blk-ccw" => Disk::Ccw(at.parse()?),
            _ => Disk::Pci(at.parse()?),
        })
    }

    /// Waits (rescanning the bus first) until the disk's node opens; its `sdX`/`vdX` name.
    pub async fn wait(&self, guest: &GuestFs, limit: Duration) -> Result<String> {
        let g = guest.clone();
        match self {
            Disk::Pci(path) => {
                let _ = fs::write(guest.path("/sys/bus/pci/rescan"), "1");
                let path = path.clone();
                uevent::wait_for(
                    &format!("virtio-blk disk at PCI path {path}"),
                    limit,
                    move || pci::resolve(&g, &path).and_then(|bdf| pci::block_device(&g, &bdf)),
                    |ev| ev.get("SUBSYSTEM") == "block" || ev.get("SUBSYSTEM") == "pci",
                )
                .await
            }
            Disk::Ccw(id) => {
                let id = *id;
                uevent::wait_for(
                    &format!("virtio-blk disk at CCW bus id {id}"),
                    limit,
                    move || id.block_device(&g),
                    |ev| ev.get("SUBSYSTEM") == "block" || ev.get("SUBSYSTEM") == "ccw",
                )
                .await
            }
            Disk::Scsi(addr) => {
                let addr = *addr;
                let _ = fs::write(guest.path("/sys/class/scsi_host/host0/scan"), "- - -");
                uevent::wait_for(
                    &format!(
                        "virtio-scsi disk at SCSI address {}:{}",
                        addr.target, addr.lun
                    ),
                    limit,
                    move || addr.block_device(&g),
                    |ev| ev.get("SUBSYSTEM") == "block" || ev.get("SUBSYSTEM") == "scsi",
                )
                .await
            }
        }
    }
}

/// Reserves the hugepages a hugetlbfs emptyDir needs (`pagesize=` and
/// `size=` in bytes, as Kata's runtime sends), and checks the kernel gave them.
fn reserve_hugepages(guest: &GuestFs, options: &[String]) -> Result<()> {
    let mut pagesize = None;
    let mut size = None;
    for kv in options.iter().flat_map(|o| o.split(',')) {
        if let Some(v) = kv.strip_prefix("pagesize=") {
            pagesize = Some(parse_bytes(v)?);
        } else if let Some(v) = kv.strip_prefix("size=") {
            size = Some(parse_bytes(v)?);
        }
    }
    let (Some(pagesize), Some(size)) = (pagesize, size) else {
        return Err(invalid(format!(
            "hugetlbfs storage options {options:?} need pagesize= and size="
        )));
    };
    if pagesize == 0 || size % pagesize != 0 {
        return Err(invalid(format!(
            "hugetlbfs size {size} is not a multiple of the page size {pagesize}"
        )));
    }
    let nr = guest.path(&format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/nr_hugepages",
        pagesize / 1024
    ));
    let want = size / pagesize;
    let have: u64 = fs::read_to_string(&nr)
        .map_err(|e| {
            os(
                format!(
                    "{} (no {} KiB hugepages: CONFIG_HUGETLBFS in the guest kernel?)",
                    nr.display(),
                    pagesize / 1024
                ),
                e,
            )
        })?
        .trim()
        .parse()
        .unwrap_or(0);
    // Several emptyDirs share the pool: only ever grow it.
    if have >= want {
        return Ok(());
    }
    fs::write(&nr, want.to_string()).map_err(|e| os(format!("writing {}", nr.display()), e))?;
    let got: u64 = fs::read_to_string(&nr)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if got < want {
        return Err(precondition(format!(
            "only {got} of {want} hugepages of {pagesize} bytes could be reserved (guest memory too small or fragmented)"
        )));
    }
    Ok(())
}

/// `2097152`, `2M`, `1G`, `64k`.
fn parse_bytes(v: &str) -> Result<u64> {
    let bad = || invalid(format!("{v:?} is not a size in bytes (like 2097152 or 2M)"));
    let (num, mult) = match v.chars().last() {
        Some('k' | 'K') => (&v[..v.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&v[..v.len() - 1], 1 << 20),
        Some('g' | 'G') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
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
        let e = st.add(&env, &storage("nfs", "x", &mp)).await.unwrap_err();
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

    #[test]
    fn storage_mounts_are_nodev_nosuid_unless_asked() {
        let f = hardened(&[], MsFlags::empty());
        assert!(f.contains(MsFlags::MS_NODEV | MsFlags::MS_NOSUID));
        let f = hardened(&["rw,dev".into()], MsFlags::empty());
        assert!(!f.contains(MsFlags::MS_NODEV) && f.contains(MsFlags::MS_NOSUID));
        let f = hardened(&["suid".into(), "dev".into()], MsFlags::MS_RDONLY);
        assert_eq!(f, MsFlags::MS_RDONLY);
    }

    #[test]
    fn fsgid_is_split_out_of_the_options() {
        let (rest, gid) = take_fsgid(&[
            "nodev".into(),
            "size=1M,fsgid=2000".into(),
            "fsgid=3000".into(),
        ])
        .unwrap();
        assert_eq!(rest, ["nodev", "size=1M"]);
        assert_eq!(gid, Some(3000));
        assert!(take_fsgid(&["fsgid=abc".into()]).is_err());
        assert_eq!(parse_bytes("2M").unwrap(), 2 << 20);
        assert_eq!(parse_bytes("2097152").unwrap(), 2 << 20);
        assert!(parse_bytes("2X").is_err());
    }

    #[test]
    fn scsi_address_resolves_in_a_fake_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let g = GuestFs::new(dir.path());
        let a = ScsiAddr::parse("0:1").unwrap();
        assert_eq!(a, ScsiAddr { target: 0, lun: 1 });
        assert!(ScsiAddr::parse("0").is_err() && ScsiAddr::parse("a:1").is_err());
        assert_eq!(a.block_device(&g), None);
        fs::create_dir_all(dir.path().join("sys/bus/scsi/devices/2:0:0:1/block/sdb")).unwrap();
        fs::create_dir_all(dir.path().join("sys/bus/scsi/devices/2:0:0:0/block/sda")).unwrap();
        fs::create_dir_all(dir.path().join("dev")).unwrap();
        // The node must exist (and open) before the disk counts as ready.
        assert_eq!(a.block_device(&g), None);
    }

    #[test]
    fn hugepages_are_reserved_and_only_ever_grown() {
        let dir = tempfile::tempdir().unwrap();
        let g = GuestFs::new(dir.path());
        let opts = vec!["pagesize=2097152,size=8388608".to_string()];
        let e = reserve_hugepages(&g, &opts).unwrap_err();
        assert!(e.message.contains("CONFIG_HUGETLBFS"), "{}", e.message);
        let nr = dir.path().join("sys/kernel/mm/hugepages/hugepages-2048kB");
        fs::create_dir_all(&nr).unwrap();
        fs::write(nr.join("nr_hugepages"), "0\n").unwrap();
        reserve_hugepages(&g, &opts).unwrap();
        assert_eq!(fs::read_to_string(nr.join("nr_hugepages")).unwrap(), "4");
        fs::write(nr.join("nr_hugepages"), "10\n").unwrap();
        reserve_hugepages(&g, &opts).unwrap();
        assert_eq!(fs::read_to_string(nr.join("nr_hugepages")).unwrap(), "10\n");
        assert!(reserve_hugepages(&g, &["size=3".to_string()]).is_err());
    }

    #[tokio::test]
    async fn ephemeral_with_fsgid_is_a_group_owned_setgid_tmpfs() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: mounting a tmpfs needs root");
            return;
        }
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
        let mut s = storage(
            "ephemeral",
            "tmpfs",
            &format!("{}/sandbox/ephemeral/cache", run.display()),
        );
        s.fstype = "tmpfs".into();
        s.options = vec!["fsgid=2000".into(), "size=1M".into()];
        let p = st.add(&env, &s).await.unwrap();
        let md = fs::metadata(&p).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(md.gid(), 2000);
        assert_ne!(md.mode() & 0o2000, 0, "setgid");
        // UpdateEphemeralMounts grows it; fsgid is not passed to tmpfs.
        s.options = vec!["remount".into(), "size=2M".into(), "fsgid=2000".into()];
        st.update_ephemeral(&env, &[s.clone()]).unwrap();
        let total = nix::sys::statvfs::statvfs(&p).unwrap();
        assert_eq!(
            total.blocks() as u64 * total.fragment_size() as u64,
            2 << 20
        );
        let mnt = nix::sys::statvfs::FsFlags::ST_NODEV | nix::sys::statvfs::FsFlags::ST_NOSUID;
        assert!(
            total.flags().contains(mnt),
            "still nodev,nosuid after the remount"
        );
        let mut bad = s.clone();
        bad.driver = "local".into();
        assert!(st.update_ephemeral(&env, &[bad]).is_err());
        st.release(&p);
        assert!(st.is_empty());
    }
}
