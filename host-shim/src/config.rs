//! Shim configuration: typed, with built-in defaults, optionally overridden by a
//! TOML file (`--config`), validated once before anything starts. Keys follow
//! the `[hypervisor.qemu]` section Kata users know.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct ShimConfig {
    #[serde(default)]
    pub hypervisor: Hypervisor,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub vsock: VsockSection,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Hypervisor {
    #[serde(default)]
    pub qemu: QemuSection,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    /// QEMU binary; empty means `qemu-system-<arch>` from PATH.
    #[serde(default)]
    pub path: String,
    /// Machine type; empty means the arch's default (q35, virt, pseries, s390-ccw-virtio).
    #[serde(default)]
    pub machine_type: String,
    /// "auto" (KVM when usable, else TCG), "kvm" or "tcg".
    #[serde(default = "default_accel")]
    pub accel: String,
    #[serde(default = "default_vcpus")]
    pub default_vcpus: u32,
    /// vCPUs the VM may have after hot-plugging (`-smp N,maxcpus=M`); 0
    /// means `default_vcpus` (no room to hot-plug).
    #[serde(default)]
    pub default_maxvcpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub default_memory: u32,
    /// Memory in MiB the VM may have after hot-plugging DIMMs (`-m
    /// N,slots=S,maxmem=M`); 0 means `default_memory` (no room). x86_64 q35 only.
    #[serde(default)]
    pub default_maxmemory: u32,
    /// DIMM slots for memory hot-plug when `default_maxmemory` leaves room.
    #[serde(default = "default_memory_slots")]
    pub memory_slots: u32,
    /// Extra kernel parameters appended to the image's command line.
    #[serde(default)]
    pub kernel_params: String,
    /// Give block devices their own IOThreads (see `indep_iothreads`).
    #[serde(default)]
    pub enable_iothreads: bool,
    /// Number of independent IOThreads `indep_iothread_0..N-1` that live as long
    /// as the VM; hot-plugged virtio-blk disks attach to `indep_iothread_0`.
    /// 0 keeps QEMU's default (no dedicated IOThreads).
    #[serde(default)]
    pub indep_iothreads: u32,
    /// Shared filesystem for container rootfs: "virtio-fs" or "none".
    #[serde(default = "default_shared_fs")]
    pub shared_fs: String,
    /// The virtio-fs daemon binary.
    #[serde(default = "default_virtiofsd")]
    pub virtio_fs_daemon: String,
    /// Extra arguments for the virtio-fs daemon.
    #[serde(default)]
    pub virtio_fs_extra_args: Vec<String>,
    /// Host uid/gid that guest root is on the shared directory (guest ids
    /// 0..65535 become this..+65535): a container's rootfs is re-owned into
    /// that range before the guest sees it, so nothing the guest makes or
    /// chmods there is setuid root or owned by a host user. 0 keeps guest
    /// root host root, as Kata does. Only a shim running as root maps: an
    /// unprivileged virtiofsd cannot make a file anyone else's.
    #[serde(default = "default_id_map_base")]
    pub virtio_fs_id_map_base: u32,
    /// PCIe root ports reserved for hot-plugging (disks, VFIO devices).
    #[serde(default = "default_hotplug_ports")]
    pub hotplug_root_ports: u32,
    /// A file to attach as a persistent-memory device (the guest's
    /// /dev/pmem0): `-device nvdimm` on x86_64 q35 and aarch64 virt (through
    /// UEFI), its size a multiple of 2 MiB; `spapr-nvdimm` on ppc64le pseries,
    /// 256 MiB blocks followed by kiln's namespace labels
    /// (`kiln_disk::nslabel`). Guest writes reach the file. Empty means none.
    #[serde(default)]
    pub pmem_file: String,
    /// UEFI firmware to boot through (`-bios`; the kernel still comes from
    /// `-kernel`); empty: a direct kernel boot. On aarch64 it gives the guest
    /// ACPI, and with it NVDIMMs (DAX); an aarch64 NVDIMM without it uses
    /// Debian's edk2 (`crate::qemu::AARCH64_EDK2`, package qemu-efi-aarch64).
    #[serde(default)]
    pub firmware: String,
    /// Where the guest's root filesystem comes from (see [`ROOTFS_MODES`]).
    #[serde(default = "default_rootfs")]
    pub rootfs: String,
    /// dm-verity for a rootfs image that has a hash tree (see [`VERITY_MODES`]).
    #[serde(default = "default_rootfs_verity")]
    pub rootfs_verity: String,
    /// The guest's network link (see [`NETWORK_MODES`]).
    #[serde(default = "default_network")]
    pub network: String,
    /// QEMU's seccomp filter (`-sandbox` options), as Kata's `seccompsandbox`;
    /// "off" runs QEMU without one. On by default: QEMU parses what an
    /// untrusted guest sends, and never needs to exec, setuid or re-nice.
    #[serde(default = "default_seccomp_sandbox")]
    pub seccomp_sandbox: String,
}

/// QEMU's `-sandbox` default: its seccomp filter, denying obsolete calls,
/// privilege changes, fork/exec and scheduler/resource control.
pub const SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Values of `hypervisor.qemu.network`:
/// - "none": no NIC (the default; the agent is reached over vsock);
/// - "user": one virtio-net NIC on QEMU's user-mode network (IPv4 10.0.2.0/24
///   and IPv6 fec0::/64, the host reachable at 10.0.2.2 and fec0::2), its
///   addresses and routes left to UpdateInterface/UpdateRoutes.
pub const NETWORK_MODES: &[&str] = &["none", "user"];

/// Checks a network mode (from the config or a command-line flag).
pub fn check_network_mode(key: &str, value: &str) -> anyhow::Result<crate::qemu::Network> {
    match value {
        "none" => Ok(crate::qemu::Network::None),
        "user" => Ok(crate::qemu::Network::User),
        _ => anyhow::bail!(
            "{key} = `{value}`: use one of \"{}\"",
            NETWORK_MODES.join("\", \"")
        ),
    }
}

/// Values of `hypervisor.qemu.rootfs`:
/// - "initrd": the image's initrd (the default);
/// - "image": the image's rootfs.img, as an NVDIMM with DAX where the machine
///   has one (x86_64 q35; aarch64 virt when `firmware` is set), else as a
///   virtio-blk disk; the log says which;
/// - "nvdimm": rootfs.img as an NVDIMM with DAX, and an error where there is none;
/// - "virtio-blk": rootfs.img as a read-only virtio-blk disk, no DAX.
pub const ROOTFS_MODES: &[&str] = &["initrd", "image", "nvdimm", "virtio-blk"];

/// Values of `hypervisor.qemu.rootfs_verity`:
/// - "auto" (the default): verify the root through dm-verity when the image's
///   manifest records a hash tree; on an NVDIMM that means no DAX, since
///   dm-verity does not pass DAX through;
/// - "on": the same, and an error for an image without a tree;
/// - "off": mount the partition directly (DAX on an NVDIMM), unverified.
pub const VERITY_MODES: &[&str] = &["auto", "on", "off"];

/// Checks a verity mode (from the config or a command-line flag).
pub fn check_verity_mode(key: &str, value: &str) -> anyhow::Result<()> {
    if !VERITY_MODES.contains(&value) {
        anyhow::bail!(
            "{key} = `{value}`: use one of \"{}\"",
            VERITY_MODES.join("\", \"")
        );
    }
    Ok(())
}

/// Checks a rootfs mode (from the config or a command-line flag).
pub fn check_rootfs_mode(key: &str, value: &str) -> anyhow::Result<()> {
    if !ROOTFS_MODES.contains(&value) {
        anyhow::bail!(
            "{key} = `{value}`: use one of \"{}\"",
            ROOTFS_MODES.join("\", \"")
        );
    }
    Ok(())
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// vsock port the agent listens on.
    #[serde(default = "default_agent_port")]
    pub port: u32,
    /// Seconds from QEMU launch until the agent must answer `Check`.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: u64,
    /// Seconds for one RPC.
    #[serde(default = "default_rpc_timeout")]
    pub rpc_timeout: u64,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct VsockSection {
    /// The vhost-user vsock backend binary.
    #[serde(default = "default_vsock_backend")]
    pub backend: String,
}

fn default_accel() -> String {
    "auto".into()
}
fn default_shared_fs() -> String {
    "virtio-fs".into()
}
fn default_virtiofsd() -> String {
    "virtiofsd".into()
}
fn default_rootfs() -> String {
    "initrd".into()
}
fn default_rootfs_verity() -> String {
    "auto".into()
}
fn default_network() -> String {
    "none".into()
}
fn default_seccomp_sandbox() -> String {
    SECCOMP_SANDBOX.into()
}
/// 0x70000000: the start of 65536 ids no distribution gives a user
/// (podman's `--userns=auto` picks from a similar high range).
pub const DEFAULT_ID_MAP_BASE: u32 = 1_879_048_192;
fn default_id_map_base() -> u32 {
    DEFAULT_ID_MAP_BASE
}
fn default_hotplug_ports() -> u32 {
    2
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory() -> u32 {
    512
}
fn default_memory_slots() -> u32 {
    10
}
fn default_agent_port() -> u32 {
    1024
}
fn default_boot_timeout() -> u64 {
    180
}
fn default_rpc_timeout() -> u64 {
    30
}
fn default_vsock_backend() -> String {
    "vhost-device-vsock".into()
}

impl Default for QemuSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}
impl Default for AgentSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}
impl Default for VsockSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults deserialize")
    }
}

impl ShimConfig {
    /// Built-in defaults, then `path` if given.
    pub fn load(path: Option<&Path>) -> anyhow::Result<ShimConfig> {
        let cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                Self::parse(&text).with_context(|| format!("in config {}", p.display()))?
            }
            None => ShimConfig::default(),
        };
        Ok(cfg)
    }

    pub fn parse(text: &str) -> anyhow::Result<ShimConfig> {
        let cfg: ShimConfig = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let q = &self.hypervisor.qemu;
        if !["auto", "kvm", "tcg"].contains(&q.accel.as_str()) {
            anyhow::bail!(
                "hypervisor.qemu.accel = `{}`: use \"auto\", \"kvm\" or \"tcg\"",
                q.accel
            );
        }
        if q.default_vcpus == 0 || q.default_vcpus > 256 {
            anyhow::bail!(
                "hypervisor.qemu.default_vcpus = {}: use 1 to 256",
                q.default_vcpus
            );
        }
        if q.default_maxvcpus != 0
            && (q.default_maxvcpus < q.default_vcpus || q.default_maxvcpus > 256)
        {
            anyhow::bail!(
                "hypervisor.qemu.default_maxvcpus = {}: use 0 (no hot-plug) or {} (default_vcpus) to 256",
                q.default_maxvcpus,
                q.default_vcpus
            );
        }
        if q.default_maxmemory != 0 && q.default_maxmemory < q.default_memory {
            anyhow::bail!(
                "hypervisor.qemu.default_maxmemory = {} MiB is below default_memory = {} MiB: use 0 (no hot-plug) or at least default_memory",
                q.default_maxmemory,
                q.default_memory
            );
        }
        if q.memory_slots == 0 || q.memory_slots > 256 {
            anyhow::bail!(
                "hypervisor.qemu.memory_slots = {}: use 1 to 256",
                q.memory_slots
            );
        }
        if q.default_memory < 64 {
            anyhow::bail!(
                "hypervisor.qemu.default_memory = {} MiB: use at least 64",
                q.default_memory
            );
        }
        if !["virtio-fs", "none"].contains(&q.shared_fs.as_str()) {
            anyhow::bail!(
                "hypervisor.qemu.shared_fs = `{}`: use \"virtio-fs\" or \"none\"",
                q.shared_fs
            );
        }
        if q.indep_iothreads > 0 && !q.enable_iothreads {
            anyhow::bail!(
                "hypervisor.qemu.indep_iothreads = {} needs hypervisor.qemu.enable_iothreads = true",
                q.indep_iothreads
            );
        }
        if q.indep_iothreads > 64 {
            anyhow::bail!(
                "hypervisor.qemu.indep_iothreads = {}: use 0 to 64",
                q.indep_iothreads
            );
        }
        check_rootfs_mode("hypervisor.qemu.rootfs", &q.rootfs)?;
        check_verity_mode("hypervisor.qemu.rootfs_verity", &q.rootfs_verity)?;
        check_network_mode("hypervisor.qemu.network", &q.network)?;
        let base = q.virtio_fs_id_map_base;
        if base != 0
            && !(crate::virtiofs::ID_RANGE..=u32::MAX - 2 * crate::virtiofs::ID_RANGE)
                .contains(&base)
        {
            anyhow::bail!(
                "hypervisor.qemu.virtio_fs_id_map_base = {base}: use 0 (off) or a host id from 65536 \
                 to {}, the start of 65536 ids no host user has, e.g. 1879048192",
                u32::MAX - 2 * crate::virtiofs::ID_RANGE
            );
        }
        let sandbox = q.seccomp_sandbox.as_str();
        if !(sandbox == "off" || sandbox == "on" || sandbox.starts_with("on,"))
            || sandbox.contains(char::is_whitespace)
        {
            anyhow::bail!(
                "hypervisor.qemu.seccomp_sandbox = `{sandbox}`: use \"off\" or QEMU's -sandbox options \
                 starting with \"on\", e.g. \"{SECCOMP_SANDBOX}\""
            );
        }
        if !q.pmem_file.trim().is_empty() && q.rootfs == "nvdimm" {
            anyhow::bail!(
                "hypervisor.qemu.pmem_file and hypervisor.qemu.rootfs = \"nvdimm\" both attach an NVDIMM; \
                 the root must be /dev/pmem0, so use one of them"
            );
        }
        if q.hotplug_root_ports > 16 {
            anyhow::bail!(
                "hypervisor.qemu.hotplug_root_ports = {}: use 0 to 16",
                q.hotplug_root_ports
            );
        }
        if self.agent.boot_timeout == 0 {
            anyhow::bail!("agent.boot_timeout = 0: give seconds (TCG boots take a few)");
        }
        Ok(())
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.agent.boot_timeout)
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_secs(self.agent.rpc_timeout)
    }

    pub fn vsock_backend(&self) -> PathBuf {
        PathBuf::from(&self.vsock.backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = ShimConfig::parse("").unwrap();
        assert_eq!(c.hypervisor.qemu.accel, "auto");
        assert_eq!(c.agent.port, 1024);
        assert_eq!(c.hypervisor.qemu.default_memory, 512);
    }

    #[test]
    fn overrides_and_unknown_keys() {
        let c = ShimConfig::parse("[hypervisor.qemu]\ndefault_memory = 1024\naccel = \"tcg\"\n")
            .unwrap();
        assert_eq!(c.hypervisor.qemu.default_memory, 1024);
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\ndefault_memroy = 1\n").unwrap_err()
        );
        assert!(e.contains("default_memroy"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\naccel = \"hvf\"\n").unwrap_err()
        );
        assert!(e.contains("hypervisor.qemu.accel"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\nindep_iothreads = 2\n").unwrap_err()
        );
        assert!(e.contains("enable_iothreads"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\nshared_fs = \"9p\"\n").unwrap_err()
        );
        assert!(e.contains("shared_fs"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\ndefault_vcpus = \"two\"\n").unwrap_err()
        );
        assert!(e.contains("default_vcpus"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\nrootfs = \"pmem\"\n").unwrap_err()
        );
        assert!(
            e.contains("hypervisor.qemu.rootfs") && e.contains("nvdimm"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\ndefault_vcpus = 2\ndefault_maxvcpus = 1\n")
                .unwrap_err()
        );
        assert!(e.contains("default_maxvcpus = 1"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\ndefault_maxmemory = 256\n").unwrap_err()
        );
        assert!(e.contains("default_maxmemory = 256"), "{e}");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\nmemory_slots = 0\n").unwrap_err()
        );
        assert!(e.contains("memory_slots"), "{e}");
        let c = ShimConfig::parse(
            "[hypervisor.qemu]\ndefault_maxvcpus = 4\ndefault_maxmemory = 2048\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.hypervisor.qemu.default_maxvcpus,
                c.hypervisor.qemu.default_maxmemory
            ),
            (4, 2048)
        );
        let c = ShimConfig::parse("[hypervisor.qemu]\nrootfs = \"virtio-blk\"\n").unwrap();
        assert_eq!(c.hypervisor.qemu.rootfs, "virtio-blk");
        assert_eq!(c.hypervisor.qemu.rootfs_verity, "auto");
        let e = format!(
            "{:#}",
            ShimConfig::parse("[hypervisor.qemu]\nrootfs_verity = \"yes\"\n").unwrap_err()
        );
        assert!(e.contains("rootfs_verity") && e.contains("\"off\""), "{e}");
        assert_eq!(
            ShimConfig::parse("").unwrap().hypervisor.qemu.rootfs,
            "initrd"
        );
        assert_eq!(
            ShimConfig::parse("").unwrap().hypervisor.qemu.network,
            "none"
        );
        assert_eq!(
            ShimConfig::parse("")
                .unwrap()
                .hypervisor
                .qemu
                .virtio_fs_id_map_base,
            DEFAULT_ID_MAP_BASE
        );
        for bad in ["1000", "4294967295"] {
            let e = ShimConfig::parse(&format!(
                "[hypervisor.qemu]\nvirtio_fs_id_map_base = {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("virtio_fs_id_map_base"), "{e}");
        }
        assert_eq!(
            ShimConfig::parse("")
                .unwrap()
                .hypervisor
                .qemu
                .seccomp_sandbox,
            SECCOMP_SANDBOX
        );
        for bad in ["yes", "on spawn=deny", ""] {
            let e = ShimConfig::parse(&format!("[hypervisor.qemu]\nseccomp_sandbox = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("seccomp_sandbox") && e.contains("\"off\""),
                "{e}"
            );
        }
        let c = ShimConfig::parse("[hypervisor.qemu]\nnetwork = \"user\"\n").unwrap();
        assert_eq!(c.hypervisor.qemu.network, "user");
        let e = ShimConfig::parse("[hypervisor.qemu]\nnetwork = \"tap\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("hypervisor.qemu.network") && e.contains("\"user\""),
            "{e}"
        );
    }
}

#[cfg(test)]
mod shipped_file {
    use super::*;

    /// The configuration packages install is valid and equals the built-in defaults.
    #[test]
    fn shipped_configuration_is_the_defaults() {
        let text = include_str!("../configuration.toml");
        let shipped = ShimConfig::parse(text).unwrap();
        let defaults = ShimConfig::default();
        assert_eq!(
            toml::to_string(&shipped).unwrap(),
            toml::to_string(&defaults).unwrap()
        );
    }
}
