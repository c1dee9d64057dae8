//! The OCI spec from a request (`oci::Spec`, protobuf) as kiln's own typed,
//! validated view. Everything the container code acts on comes from here, so
//! a bad request fails once, up front, with a message naming the field.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use kiln_protocol::oci;
use nix::mount::MsFlags;
use nix::sys::resource::Resource;

use super::seccomp::Profile;
use crate::error::{invalid, Result};

/// Upper bounds on list sizes; the ttrpc frame limit bounds bytes, these bound work.
const MAX_ARGS: usize = 4096;
const MAX_ENV: usize = 4096;
const MAX_MOUNTS: usize = 1024;
const MAX_DEVICES: usize = 1024;
const MAX_PATHS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub root: RootSpec,
    pub hostname: Option<String>,
    pub process: ProcessSpec,
    pub mounts: Vec<MountSpec>,
    pub namespaces: Vec<NamespaceSpec>,
    pub resources: Resources,
    pub devices: Vec<DeviceSpec>,
    /// `linux.resources.devices` (or the default list) plus the spec's devices.
    pub device_rules: Vec<super::devcg::DeviceRule>,
    pub sysctl: BTreeMap<String, String>,
    pub masked_paths: Vec<PathBuf>,
    pub readonly_paths: Vec<PathBuf>,
    /// Propagation of the container's `/`: `MS_SLAVE`, `MS_PRIVATE` or `MS_SHARED`.
    pub rootfs_propagation: MsFlags,
    /// The path the runtime asked for; kiln places containers under its own
    /// cgroup tree and uses this only when the helper is told where to go.
    pub cgroups_path: String,
    /// `Linux.Seccomp`, validated; compiled per architecture by `seccomp`.
    pub seccomp: Option<Profile>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    pub path: PathBuf,
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: PathBuf,
    pub terminal: bool,
    /// (rows, columns)
    pub console_size: Option<(u16, u16)>,
    pub user: UserSpec,
    /// Empty sets when the spec names none, as runc: no capabilities unless granted.
    pub capabilities: CapabilitySpec,
    pub rlimits: Vec<RlimitSpec>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Resolved against the container's /etc/passwd when set.
    pub username: Option<String>,
}

/// Capability sets by name (`CAP_SYS_ADMIN`), validated against the known list.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapabilitySpec {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RlimitSpec {
    pub resource: Resource,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub destination: PathBuf,
    pub source: String,
    pub fstype: String,
    pub options: MountOptions,
}

/// Mount options split the way mount(2) wants them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    /// Flags to clear (e.g. `rw`, `suid`) when remounting a bind mount.
    pub clear: MsFlags,
    pub propagation: MsFlags,
    /// Filesystem-specific options, comma-joined (`size=64m,mode=755`).
    pub data: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            flags: MsFlags::empty(),
            clear: MsFlags::empty(),
            propagation: MsFlags::empty(),
            data: String::new(),
        }
    }
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags.contains(MsFlags::MS_BIND)
    }
    pub fn data(&self) -> Option<&str> {
        (!self.data.is_empty()).then_some(self.data.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NamespaceKind {
    Pid,
    Mount,
    Uts,
    Ipc,
    Cgroup,
}

impl NamespaceKind {
    /// Name of the file in `/proc/<pid>/ns/`.
    pub fn proc_name(self) -> &'static str {
        match self {
            NamespaceKind::Pid => "pid",
            NamespaceKind::Mount => "mnt",
            NamespaceKind::Uts => "uts",
            NamespaceKind::Ipc => "ipc",
            NamespaceKind::Cgroup => "cgroup",
        }
    }
    pub fn clone_flag(self) -> nix::sched::CloneFlags {
        use nix::sched::CloneFlags as F;
        match self {
            NamespaceKind::Pid => F::CLONE_NEWPID,
            NamespaceKind::Mount => F::CLONE_NEWNS,
            NamespaceKind::Uts => F::CLONE_NEWUTS,
            NamespaceKind::Ipc => F::CLONE_NEWIPC,
            NamespaceKind::Cgroup => F::CLONE_NEWCGROUP,
        }
    }
}

/// A namespace to create (no path) or join (path to an nsfs file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSpec {
    pub kind: NamespaceKind,
    pub path: Option<PathBuf>,
}

/// cgroup v2 resource settings, already in v2 units.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources {
    /// memory.max in bytes
    pub memory_max: Option<i64>,
    /// memory.low in bytes
    pub memory_low: Option<i64>,
    /// memory.swap.max in bytes (v1 "memory+swap" minus memory, as runc converts)
    pub memory_swap_max: Option<i64>,
    /// cpu.max: (quota µs or None for "max", period µs)
    pub cpu_max: Option<(Option<i64>, u64)>,
    /// cpu.weight 1..=10000, converted from v1 shares
    pub cpu_weight: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// pids.max; None = unset, Some(None) = "max"
    pub pids_max: Option<Option<i64>>,
    /// io.weight 1..=10000, converted from v1 blkio weight
    pub io_weight: Option<u64>,
    /// hugetlb.<size>.max
    pub hugetlb_max: Vec<(String, u64)>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub path: PathBuf,
    /// 'c', 'b' or 'p'
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl ContainerSpec {
    pub fn from_oci(spec: &oci::Spec) -> Result<ContainerSpec> {
        let root = RootSpec::from_oci(spec.Root.as_ref())?;
        let process = spec
            .Process
            .as_ref()
            .ok_or_else(|| invalid("OCI spec has no Process"))?;
        let process = ProcessSpec::from_oci(process)?;
        let hostname = hostname_from_oci(&spec.Hostname)?;
        if spec.Mounts.len() > MAX_MOUNTS {
            return Err(invalid(format!(
                "OCI spec has {} mounts; at most {MAX_MOUNTS}",
                spec.Mounts.len()
            )));
        }
        let mounts = spec
            .Mounts
            .iter()
            .map(MountSpec::from_oci)
            .collect::<Result<Vec<_>>>()?;
        let default_linux = oci::Linux::new();
        let linux = spec.Linux.as_ref().unwrap_or(&default_linux);
        if !linux.UIDMappings.is_empty() || !linux.GIDMappings.is_empty() {
            return Err(invalid("OCI spec asks for user-namespace id mappings; kiln-agent does not support user namespaces"));
        }
        let namespaces = namespaces_from_oci(&linux.Namespaces)?;
        let resources = match linux.Resources.as_ref() {
            Some(r) => Resources::from_oci(r)?,
            None => Resources::default(),
        };
        if linux.Devices.len() > MAX_DEVICES {
            return Err(invalid(format!(
                "OCI spec has {} devices; at most {MAX_DEVICES}",
                linux.Devices.len()
            )));
        }
        let devices = linux
            .Devices
            .iter()
            .map(DeviceSpec::from_oci)
            .collect::<Result<Vec<_>>>()?;
        let device_rules = super::devcg::rules_for(
            linux
                .Resources
                .as_ref()
                .map(|r| r.Devices.as_slice())
                .unwrap_or(&[]),
            &devices
                .iter()
                .map(|d| (d.kind, d.major, d.minor))
                .collect::<Vec<_>>(),
        )?;
        let sysctl = sysctl_from_oci(&linux.Sysctl)?;
        let paths = |what: &str, list: &[String]| -> Result<Vec<PathBuf>> {
            if list.len() > MAX_PATHS {
                return Err(invalid(format!(
                    "OCI spec {what} has {} entries; at most {MAX_PATHS}",
                    list.len()
                )));
            }
            list.iter().map(|p| abs_path(what, p)).collect()
        };
        let masked_paths = paths("Linux.MaskedPaths", &linux.MaskedPaths)?;
        let readonly_paths = paths("Linux.ReadonlyPaths", &linux.ReadonlyPaths)?;
        let rootfs_propagation = rootfs_propagation(&linux.RootfsPropagation)?;
        let seccomp = match linux.Seccomp.as_ref() {
            Some(s) => Profile::from_oci(s)?,
            None => None,
        };
        Ok(ContainerSpec {
            root,
            hostname,
            process,
            mounts,
            namespaces,
            resources,
            devices,
            device_rules,
            sysctl,
            masked_paths,
            readonly_paths,
            rootfs_propagation,
            cgroups_path: linux.CgroupsPath.clone(),
            seccomp,
        })
    }

    pub fn namespace(&self, kind: NamespaceKind) -> Option<&NamespaceSpec> {
        self.namespaces.iter().find(|n| n.kind == kind)
    }
}

impl RootSpec {
    fn from_oci(root: Option<&oci::Root>) -> Result<RootSpec> {
        let root = root.ok_or_else(|| invalid("OCI spec has no Root"))?;
        if root.Path.is_empty() {
            return Err(invalid("OCI spec Root.Path is empty"));
        }
        Ok(RootSpec {
            path: PathBuf::from(&root.Path),
            readonly: root.Readonly,
        })
    }
}

/// The hostname, if the spec sets one (at most 64 bytes, no NUL, no `/`).
fn hostname_from_oci(hostname: &str) -> Result<Option<String>> {
    let hostname = (!hostname.is_empty()).then(|| hostname.to_string());
    if let Some(h) = &hostname {
        if h.len() > 64 || h.contains('\0') || h.contains('/') {
            return Err(invalid(format!(
                "OCI spec Hostname {h:?} is not a valid hostname"
            )));
        }
    }
    Ok(hostname)
}

/// The namespaces to create or join, sorted by kind; `network` is skipped
/// (containers share the sandbox's), `user` refused.
fn namespaces_from_oci(list: &[oci::LinuxNamespace]) -> Result<Vec<NamespaceSpec>> {
    let mut namespaces: Vec<NamespaceSpec> = Vec::new();
    for ns in list {
        let kind = match ns.Type.as_str() {
            "pid" => NamespaceKind::Pid,
            "mount" => NamespaceKind::Mount,
            "uts" => NamespaceKind::Uts,
            "ipc" => NamespaceKind::Ipc,
            "cgroup" => NamespaceKind::Cgroup,
            // Containers share the sandbox's network, as in Kata.
            "network" => continue,
            "user" => return Err(invalid(
                "OCI spec asks for a user namespace; kiln-agent does not support user namespaces",
            )),
            other => {
                return Err(invalid(format!(
                    "OCI spec namespace type {other:?} is unknown"
                )))
            }
        };
        if namespaces.iter().any(|n| n.kind == kind) {
            return Err(invalid(format!(
                "OCI spec lists namespace {:?} twice",
                ns.Type
            )));
        }
        let path = if ns.Path.is_empty() {
            None
        } else {
            Some(abs_path("Linux.Namespaces.Path", &ns.Path)?)
        };
        namespaces.push(NamespaceSpec { kind, path });
    }
    namespaces.sort_by_key(|n| n.kind);
    Ok(namespaces)
}

/// Sysctl names checked (alphanumerics, `.`, `_`, `-`, `/`; no empty or `..`
/// component), values without NUL.
fn sysctl_from_oci(
    list: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut sysctl = BTreeMap::new();
    for (k, v) in list {
        let ok = !k.is_empty()
            && k.len() <= 256
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
            && !k.split(['.', '/']).any(|c| c.is_empty() || c == "..");
        if !ok || v.contains('\0') {
            return Err(invalid(format!(
                "OCI spec sysctl {k:?} is not a valid sysctl name"
            )));
        }
        sysctl.insert(k.clone(), v.clone());
    }
    Ok(sysctl)
}

/// The propagation of the container's root mount (default: slave).
fn rootfs_propagation(value: &str) -> Result<MsFlags> {
    Ok(match value {
        "" | "slave" | "rslave" => MsFlags::MS_SLAVE,
        "private" | "rprivate" => MsFlags::MS_PRIVATE,
        "shared" | "rshared" => MsFlags::MS_SHARED,
        other => {
            return Err(invalid(format!(
                "OCI spec RootfsPropagation {other:?} is unknown"
            )))
        }
    })
}

impl ProcessSpec {
    pub fn from_oci(p: &oci::Process) -> Result<ProcessSpec> {
        if p.Args.is_empty() || p.Args[0].is_empty() {
            return Err(invalid("Process.Args is empty: nothing to run"));
        }
        if p.Args.len() > MAX_ARGS || p.Env.len() > MAX_ENV {
            return Err(invalid(format!(
                "Process has {} args and {} env entries; at most {MAX_ARGS} each",
                p.Args.len(),
                p.Env.len()
            )));
        }
        if let Some(a) = p.Args.iter().find(|a| a.contains('\0')) {
            return Err(invalid(format!("Process.Args entry {a:?} contains NUL")));
        }
        for e in &p.Env {
            if e.contains('\0') || !e.contains('=') || e.starts_with('=') {
                return Err(invalid(format!(
                    "Process.Env entry {e:?} is not NAME=VALUE"
                )));
            }
        }
        let cwd = if p.Cwd.is_empty() {
            PathBuf::from("/")
        } else {
            abs_path("Process.Cwd", &p.Cwd)?
        };
        let console_size = p.ConsoleSize.as_ref().and_then(|b| {
            (b.Height > 0 && b.Width > 0).then(|| {
                (
                    b.Height.min(u16::MAX as u32) as u16,
                    b.Width.min(u16::MAX as u32) as u16,
                )
            })
        });
        let user = match p.User.as_ref() {
            Some(u) => UserSpec {
                uid: u.UID,
                gid: u.GID,
                additional_gids: u.AdditionalGids.clone(),
                username: (!u.Username.is_empty()).then(|| u.Username.clone()),
            },
            None => UserSpec::default(),
        };
        if user.additional_gids.len() > 256 {
            return Err(invalid(
                "Process.User.AdditionalGids has more than 256 entries",
            ));
        }
        let capabilities = match p.Capabilities.as_ref() {
            Some(c) => CapabilitySpec {
                bounding: cap_names("Bounding", &c.Bounding)?,
                effective: cap_names("Effective", &c.Effective)?,
                inheritable: cap_names("Inheritable", &c.Inheritable)?,
                permitted: cap_names("Permitted", &c.Permitted)?,
                ambient: cap_names("Ambient", &c.Ambient)?,
            },
            None => CapabilitySpec::default(),
        };
        let rlimits = p
            .Rlimits
            .iter()
            .map(RlimitSpec::from_oci)
            .collect::<Result<Vec<_>>>()?;
        let oom_score_adj = if p.OOMScoreAdj == 0 {
            None
        } else if (-1000..=1000).contains(&p.OOMScoreAdj) {
            Some(p.OOMScoreAdj as i32)
        } else {
            return Err(invalid(format!(
                "Process.OOMScoreAdj {} is outside -1000..=1000",
                p.OOMScoreAdj
            )));
        };
        Ok(ProcessSpec {
            args: p.Args.clone(),
            env: p.Env.clone(),
            cwd,
            terminal: p.Terminal,
            console_size,
            user,
            capabilities,
            rlimits,
            no_new_privileges: p.NoNewPrivileges,
            oom_score_adj,
        })
    }

    /// The value of `PATH` in the process environment, or the usual default.
    pub fn path_var(&self) -> &str {
        self.env
            .iter()
            .rev()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    }
}

fn cap_names(set: &str, names: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let upper = n.to_ascii_uppercase();
        let full = if upper.starts_with("CAP_") {
            upper
        } else {
            format!("CAP_{upper}")
        };
        if full.parse::<caps::Capability>().is_err() {
            return Err(invalid(format!(
                "Process.Capabilities.{set} names unknown capability {n:?}"
            )));
        }
        if !out.contains(&full) {
            out.push(full);
        }
    }
    Ok(out)
}

impl RlimitSpec {
    fn from_oci(r: &oci::POSIXRlimit) -> Result<RlimitSpec> {
        let resource = match r.Type.as_str() {
            "RLIMIT_AS" => Resource::RLIMIT_AS,
            "RLIMIT_CORE" => Resource::RLIMIT_CORE,
            "RLIMIT_CPU" => Resource::RLIMIT_CPU,
            "RLIMIT_DATA" => Resource::RLIMIT_DATA,
            "RLIMIT_FSIZE" => Resource::RLIMIT_FSIZE,
            "RLIMIT_LOCKS" => Resource::RLIMIT_LOCKS,
            "RLIMIT_MEMLOCK" => Resource::RLIMIT_MEMLOCK,
            "RLIMIT_MSGQUEUE" => Resource::RLIMIT_MSGQUEUE,
            "RLIMIT_NICE" => Resource::RLIMIT_NICE,
            "RLIMIT_NOFILE" => Resource::RLIMIT_NOFILE,
            "RLIMIT_NPROC" => Resource::RLIMIT_NPROC,
            "RLIMIT_RSS" => Resource::RLIMIT_RSS,
            "RLIMIT_RTPRIO" => Resource::RLIMIT_RTPRIO,
            "RLIMIT_RTTIME" => Resource::RLIMIT_RTTIME,
            "RLIMIT_SIGPENDING" => Resource::RLIMIT_SIGPENDING,
            "RLIMIT_STACK" => Resource::RLIMIT_STACK,
            other => {
                return Err(invalid(format!(
                    "Process.Rlimits type {other:?} is unknown"
                )))
            }
        };
        if r.Soft > r.Hard {
            return Err(invalid(format!(
                "Process.Rlimits {}: soft limit {} exceeds hard limit {}",
                r.Type, r.Soft, r.Hard
            )));
        }
        Ok(RlimitSpec {
            resource,
            soft: r.Soft,
            hard: r.Hard,
        })
    }
}

impl MountSpec {
    fn from_oci(m: &oci::Mount) -> Result<MountSpec> {
        let destination = abs_path("Mounts.destination", &m.destination)?;
        if m.source.contains('\0') || m.type_.contains('\0') {
            return Err(invalid(format!(
                "mount on {:?}: source or type contains NUL",
                m.destination
            )));
        }
        let options = parse_mount_options(&m.options)?;
        let fstype = if m.type_.is_empty() && options.is_bind() {
            "bind".to_string()
        } else {
            m.type_.clone()
        };
        if fstype.is_empty() {
            return Err(invalid(format!(
                "mount on {:?} has no type and is not a bind mount",
                m.destination
            )));
        }
        let mut options = options;
        if fstype == "bind" {
            options.flags |= MsFlags::MS_BIND;
        }
        Ok(MountSpec {
            destination,
            source: m.source.clone(),
            fstype,
            options,
        })
    }
}

/// Splits mount(8)-style options into flags and filesystem data.
pub fn parse_mount_options<S: AsRef<str>>(opts: &[S]) -> Result<MountOptions> {
    let mut o = MountOptions::default();
    for opt in opts {
        let opt = opt.as_ref();
        if opt.contains('\0') {
            return Err(invalid(format!("mount option {opt:?} contains NUL")));
        }
        let (set, clear) = match opt {
            "defaults" | "" => (MsFlags::empty(), MsFlags::empty()),
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty()),
            "nomand" => (MsFlags::empty(), MsFlags::MS_MANDLOCK),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "nostrictatime" => (MsFlags::empty(), MsFlags::MS_STRICTATIME),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let base = match opt.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                o.propagation = if opt.starts_with('r') {
                    base | MsFlags::MS_REC
                } else {
                    base
                };
                continue;
            }
            data => {
                if !o.data.is_empty() {
                    o.data.push(',');
                }
                o.data.push_str(data);
                continue;
            }
        };
        o.flags = (o.flags | set) & !clear;
        o.clear = (o.clear | clear) & !set;
    }
    Ok(o)
}

impl DeviceSpec {
    fn from_oci(d: &oci::LinuxDevice) -> Result<DeviceSpec> {
        let path = abs_path("Linux.Devices.Path", &d.Path)?;
        if !path.starts_with("/dev") {
            return Err(invalid(format!(
                "device path {:?} is not under /dev",
                d.Path
            )));
        }
        let kind = match d.Type.as_str() {
            "c" | "u" => 'c',
            "b" => 'b',
            "p" => 'p',
            other => {
                return Err(invalid(format!(
                    "device {:?} has unknown type {other:?}",
                    d.Path
                )))
            }
        };
        if d.Major < 0 || d.Minor < 0 {
            return Err(invalid(format!(
                "device {:?} has a negative major/minor number",
                d.Path
            )));
        }
        let mode = if d.FileMode == 0 {
            0o666
        } else {
            d.FileMode & 0o7777
        };
        Ok(DeviceSpec {
            path,
            kind,
            major: d.Major as u64,
            minor: d.Minor as u64,
            mode,
            uid: d.UID,
            gid: d.GID,
        })
    }
}

impl Resources {
    pub fn from_oci(r: &oci::LinuxResources) -> Result<Resources> {
        let mut out = Resources::default();
        if let Some(m) = r.Memory.as_ref() {
            out.memory_max = positive_or_max(m.Limit);
            out.memory_low = (m.Reservation > 0).then_some(m.Reservation);
            // OCI (v1) Swap is memory+swap; v2 swap.max is swap alone.
            out.memory_swap_max = match (m.Swap, m.Limit) {
                (0, _) => None,
                (s, _) if s < 0 => Some(-1),
                (s, l) if l > 0 && s >= l => Some(s - l),
                (s, l) if l > 0 => {
                    return Err(invalid(format!(
                        "Memory.Swap {s} is below Memory.Limit {l}"
                    )))
                }
                (s, _) => Some(s),
            };
        }
        if let Some(c) = r.CPU.as_ref() {
            if c.Quota != 0 || c.Period != 0 {
                let period = if c.Period == 0 { 100_000 } else { c.Period };
                if !(1000..=1_000_000).contains(&period) {
                    return Err(invalid(format!(
                        "CPU.Period {period} µs is outside 1000..=1000000"
                    )));
                }
                let quota = if c.Quota > 0 {
                    Some(c.Quota.max(1000))
                } else {
                    None
                };
                out.cpu_max = Some((quota, period));
            }
            if c.Shares > 0 {
                // runc's conversion of v1 shares (2..=262144) to v2 weight (1..=10000).
                let shares = c.Shares.clamp(2, 262_144);
                out.cpu_weight = Some(1 + ((shares - 2) * 9999) / 262_142);
            }
            out.cpuset_cpus = cpuset_list("CPU.Cpus", &c.Cpus)?;
            out.cpuset_mems = cpuset_list("CPU.Mems", &c.Mems)?;
        }
        if let Some(p) = r.Pids.as_ref() {
            out.pids_max = match p.Limit {
                0 => None,
                l if l < 0 => Some(None),
                l => Some(Some(l)),
            };
        }
        if let Some(b) = r.BlockIO.as_ref() {
            if b.Weight > 0 {
                let w = b.Weight.clamp(10, 1000) as u64;
                out.io_weight = Some(1 + (w - 10) * 9999 / 990);
            }
        }
        for h in &r.HugepageLimits {
            let ok = !h.Pagesize.is_empty()
                && h.Pagesize.len() <= 8
                && h.Pagesize.bytes().all(|b| b.is_ascii_alphanumeric());
            if !ok {
                return Err(invalid(format!(
                    "HugepageLimits page size {:?} is not like 2MB or 1GB",
                    h.Pagesize
                )));
            }
            out.hugetlb_max.push((h.Pagesize.clone(), h.Limit));
        }
        Ok(out)
    }
}

fn positive_or_max(v: i64) -> Option<i64> {
    match v {
        0 => None,
        v if v < 0 => Some(-1),
        v => Some(v),
    }
}

fn cpuset_list(what: &str, s: &str) -> Result<Option<String>> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > 256
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
    {
        return Err(invalid(format!(
            "{what} {s:?} is not a CPU/node list like 0-3,5"
        )));
    }
    Ok(Some(s.to_string()))
}

/// An absolute, NUL-free path without `..` components.
pub fn abs_path(what: &str, p: &str) -> Result<PathBuf> {
    if p.is_empty() || !p.starts_with('/') || p.contains('\0') || p.len() > 4096 {
        return Err(invalid(format!("{what} {p:?} must be an absolute path")));
    }
    if Path::new(p).components().any(|c| c == Component::ParentDir) {
        return Err(invalid(format!("{what} {p:?} must not contain '..'")));
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn busybox_spec(root: &str, args: &[&str]) -> oci::Spec {
        let mut spec = oci::Spec::new();
        let mut r = oci::Root::new();
        r.Path = root.into();
        spec.Root = Some(r).into();
        let mut p = oci::Process::new();
        p.Args = args.iter().map(|s| s.to_string()).collect();
        p.Env = vec!["PATH=/bin".into(), "HOME=/root".into()];
        p.Cwd = "/".into();
        spec.Process = Some(p).into();
        spec
    }

    #[test]
    fn minimal_spec_translates() {
        let spec = ContainerSpec::from_oci(&busybox_spec("/run/r", &["sh", "-c", "true"])).unwrap();
        assert_eq!(spec.root.path, PathBuf::from("/run/r"));
        assert_eq!(spec.process.args, ["sh", "-c", "true"]);
        assert_eq!(spec.process.path_var(), "/bin");
        assert!(spec.namespaces.is_empty() && spec.resources.is_empty());
        assert_eq!(spec.rootfs_propagation, MsFlags::MS_SLAVE);
    }

    #[test]
    fn namespaces_resources_and_process_fields() {
        let mut s = busybox_spec("/r", &["sleep", "1"]);
        let mut linux = oci::Linux::new();
        for (t, p) in [
            ("pid", ""),
            ("network", ""),
            ("mount", ""),
            ("ipc", "/proc/1/ns/ipc"),
        ] {
            let mut ns = oci::LinuxNamespace::new();
            ns.Type = t.into();
            ns.Path = p.into();
            linux.Namespaces.push(ns);
        }
        let mut res = oci::LinuxResources::new();
        let mut mem = oci::LinuxMemory::new();
        mem.Limit = 64 << 20;
        mem.Swap = 96 << 20;
        res.Memory = Some(mem).into();
        let mut cpu = oci::LinuxCPU::new();
        cpu.Quota = 50_000;
        cpu.Period = 100_000;
        cpu.Shares = 1024;
        cpu.Cpus = "0-1".into();
        res.CPU = Some(cpu).into();
        let mut pids = oci::LinuxPids::new();
        pids.Limit = 100;
        res.Pids = Some(pids).into();
        linux.Resources = Some(res).into();
        linux
            .Sysctl
            .insert("net.ipv4.ip_forward".into(), "1".into());
        s.Linux = Some(linux).into();
        let p = s.Process.as_mut().unwrap();
        p.Terminal = true;
        let mut b = oci::Box::new();
        b.Height = 40;
        b.Width = 120;
        p.ConsoleSize = Some(b).into();
        let mut caps = oci::LinuxCapabilities::new();
        caps.Bounding = vec!["CAP_CHOWN".into(), "net_raw".into()];
        p.Capabilities = Some(caps).into();
        let mut rl = oci::POSIXRlimit::new();
        rl.Type = "RLIMIT_NOFILE".into();
        rl.Soft = 1024;
        rl.Hard = 4096;
        p.Rlimits.push(rl);
        p.NoNewPrivileges = true;

        let c = ContainerSpec::from_oci(&s).unwrap();
        let kinds: Vec<_> = c.namespaces.iter().map(|n| n.kind).collect();
        assert_eq!(
            kinds,
            [NamespaceKind::Pid, NamespaceKind::Mount, NamespaceKind::Ipc],
            "network is shared, sorted"
        );
        assert_eq!(
            c.namespace(NamespaceKind::Ipc).unwrap().path.as_deref(),
            Some(Path::new("/proc/1/ns/ipc"))
        );
        assert_eq!(c.resources.memory_max, Some(64 << 20));
        assert_eq!(c.resources.memory_swap_max, Some(32 << 20));
        assert_eq!(c.resources.cpu_max, Some((Some(50_000), 100_000)));
        assert_eq!(c.resources.cpu_weight, Some(39));
        assert_eq!(c.resources.cpuset_cpus.as_deref(), Some("0-1"));
        assert_eq!(c.resources.pids_max, Some(Some(100)));
        assert_eq!(c.process.console_size, Some((40, 120)));
        assert_eq!(
            c.process.capabilities.bounding,
            ["CAP_CHOWN", "CAP_NET_RAW"]
        );
        assert_eq!(c.process.rlimits[0].resource, Resource::RLIMIT_NOFILE);
        assert!(c.process.no_new_privileges && c.process.terminal);
        assert_eq!(
            c.sysctl.get("net.ipv4.ip_forward").map(String::as_str),
            Some("1")
        );
    }

    #[test]
    fn bad_specs_name_the_field() {
        type Mutation = Box<dyn Fn(&mut oci::Spec)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|s| s.Process.as_mut().unwrap().Args.clear()),
                "Args",
            ),
            (
                Box::new(|s| s.Process.as_mut().unwrap().Cwd = "relative".into()),
                "Cwd",
            ),
            (
                Box::new(|s| s.Process.as_mut().unwrap().Env.push("NOEQUALS".into())),
                "Env",
            ),
            (Box::new(|s| s.Root.as_mut().unwrap().Path.clear()), "Root"),
            (
                Box::new(|s| {
                    let mut m = oci::Mount::new();
                    m.destination = "/a/../../etc".into();
                    m.type_ = "tmpfs".into();
                    s.Mounts.push(m);
                }),
                "..",
            ),
            (
                Box::new(|s| {
                    let mut l = oci::Linux::new();
                    let mut ns = oci::LinuxNamespace::new();
                    ns.Type = "user".into();
                    l.Namespaces.push(ns);
                    s.Linux = Some(l).into();
                }),
                "user namespace",
            ),
            (
                Box::new(|s| {
                    let mut c = oci::LinuxCapabilities::new();
                    c.Effective = vec!["CAP_FLY".into()];
                    s.Process.as_mut().unwrap().Capabilities = Some(c).into();
                }),
                "CAP_FLY",
            ),
            (
                Box::new(|s| {
                    let mut r = oci::POSIXRlimit::new();
                    r.Type = "RLIMIT_NOFILE".into();
                    r.Soft = 10;
                    r.Hard = 5;
                    s.Process.as_mut().unwrap().Rlimits.push(r);
                }),
                "soft limit",
            ),
            (
                Box::new(|s| {
                    let mut l = oci::Linux::new();
                    l.Sysctl.insert("../../etc/passwd".into(), "x".into());
                    s.Linux = Some(l).into();
                }),
                "sysctl",
            ),
        ];
        for (mutate, needle) in cases {
            let mut s = busybox_spec("/r", &["true"]);
            mutate(&mut s);
            let e = ContainerSpec::from_oci(&s).unwrap_err();
            assert_eq!(e.kind, crate::error::ErrorKind::InvalidArgument);
            assert!(e.message.contains(needle), "{needle}: {}", e.message);
        }
    }

    #[test]
    fn mount_options_split_into_flags_and_data() {
        let o = parse_mount_options(&[
            "nosuid",
            "noexec",
            "ro",
            "size=65536k",
            "mode=755",
            "rslave",
        ])
        .unwrap();
        assert!(o
            .flags
            .contains(MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY));
        assert_eq!(o.data, "size=65536k,mode=755");
        assert_eq!(o.propagation, MsFlags::MS_SLAVE | MsFlags::MS_REC);
        let o = parse_mount_options(&["rbind", "ro", "rw"]).unwrap();
        assert!(o.is_bind() && o.flags.contains(MsFlags::MS_REC));
        assert!(!o.flags.contains(MsFlags::MS_RDONLY) && o.clear.contains(MsFlags::MS_RDONLY));
        let mut m = oci::Mount::new();
        m.destination = "/data".into();
        m.source = "/run/x".into();
        m.options = vec!["bind".into()];
        assert_eq!(MountSpec::from_oci(&m).unwrap().fstype, "bind");
    }

    #[test]
    fn v1_resource_units_convert_to_v2() {
        let mut r = oci::LinuxResources::new();
        let mut cpu = oci::LinuxCPU::new();
        cpu.Shares = 2;
        cpu.Quota = -1;
        cpu.Period = 50_000;
        r.CPU = Some(cpu).into();
        let mut io = oci::LinuxBlockIO::new();
        io.Weight = 1000;
        r.BlockIO = Some(io).into();
        let mut pids = oci::LinuxPids::new();
        pids.Limit = -1;
        r.Pids = Some(pids).into();
        let v2 = Resources::from_oci(&r).unwrap();
        assert_eq!(v2.cpu_weight, Some(1));
        assert_eq!(v2.cpu_max, Some((None, 50_000)));
        assert_eq!(v2.io_weight, Some(10000));
        assert_eq!(v2.pids_max, Some(None));
    }
}
