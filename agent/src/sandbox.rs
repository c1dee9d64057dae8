//! The sandbox: its containers, their processes and storages, and the
//! lifecycle RPCs on them. Maps are behind short std mutexes; slow work
//! (set-up, waiting, reading) happens outside them, on `Arc` handles.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_protocol::{agent, oci};
use nix::sys::signal::Signal;
use protobuf::MessageField;
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::container::cgroups::{Cgroup, CgroupTree};
use crate::container::spec::{ContainerSpec, ProcessSpec, Resources};
use crate::container::wire::{Config as LaunchConfig, LaunchKind};
use crate::container::{launch, seccomp, stdio, Container, Process, State};
use crate::error::{check_id, exists, invalid, not_found, os, precondition, timeout, Result};
use crate::guest::GuestFs;
use crate::reaper::Reaper;
use crate::storage::{StorageEnv, Storages};

/// Which pid namespace a new container's init gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PidNs {
    /// Its own.
    New,
    /// Its own, which later `sandbox_pidns` containers join.
    NewShared,
    /// That of this (sandbox pid namespace owner) init.
    Join(i32),
}

/// Most live exec processes per container.
const MAX_EXECS: usize = 1024;

/// Where the agent keeps things; overridable for tests and development.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// Kata's `/run/kata-containers`: storages, shared dirs, CopyFile target.
    pub run_dir: PathBuf,
    /// cgroup v2 mount; containers go under `kiln/<sandbox>/<container>`.
    pub cgroup_root: PathBuf,
    /// Always chroot instead of pivot_root.
    pub no_pivot: bool,
}

impl Default for AgentPaths {
    fn default() -> Self {
        AgentPaths {
            run_dir: "/run/kata-containers".into(),
            cgroup_root: "/sys/fs/cgroup".into(),
            no_pivot: false,
        }
    }
}

#[derive(Default)]
struct SandboxState {
    id: Option<String>,
    sandbox_pidns: bool,
    /// The init whose pid namespace containers share with `sandbox_pidns`
    /// (the first container created with it, as in Kata's agent).
    pidns_owner: Option<i32>,
    /// The sandbox's IPC and UTS namespaces (see `namespaces.rs`).
    shared_ns: Option<Arc<crate::namespaces::SharedNamespaces>>,
    containers: HashMap<String, Arc<Container>>,
    /// Ids being created right now (so two creates cannot race).
    creating: HashSet<String>,
    /// Storages held by the sandbox itself (CreateSandbox).
    storages: Vec<PathBuf>,
}

pub struct Sandbox {
    pub config: AgentConfig,
    pub guest: GuestFs,
    pub paths: AgentPaths,
    pub reaper: Reaper,
    pub init_daemon: bool,
    state: Mutex<SandboxState>,
    storages: tokio::sync::Mutex<Storages>,
    oom_tx: mpsc::Sender<String>,
    oom_rx: tokio::sync::Mutex<mpsc::Receiver<String>>,
    mem_agent: Arc<crate::mem_agent::MemAgent>,
    mem_agent_started: std::sync::Once,
    /// The cgroup holding the current sandbox's containers (mem-agent reads it).
    sandbox_cgroup: Arc<Mutex<Option<PathBuf>>>,
}

/// Removes an id from `creating` however creation ends.
struct Creating<'a> {
    sandbox: &'a Sandbox,
    id: String,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.sandbox.lock().creating.remove(&self.id);
    }
}

/// A container's seccomp profile, checked where errors still reach the
/// caller: the kernel takes filters, and the profile compiles for this
/// architecture (the helper compiles it again before exec). Names this
/// architecture does not have are skipped, and said so here.
fn check_seccomp(cid: &str, profile: &seccomp::Profile) -> Result<()> {
    let arch = <seccomp::Arch as seccomp::SeccompArch>::native().ok_or_else(|| {
        precondition("seccomp profiles are supported on x86_64, aarch64, ppc64le and s390x only")
    })?;
    if !seccomp::kernel_supports_filters() {
        return Err(precondition(
            "the OCI spec has a seccomp profile and the guest kernel has no seccomp filters (CONFIG_SECCOMP_FILTER)",
        ));
    }
    let filter = seccomp::compile(profile, arch)?;
    if !filter.skipped.is_empty() {
        tracing::info!(
            container = cid,
            "seccomp: syscalls unknown on {} skipped: {}",
            arch.name(),
            filter.skipped.join(", ")
        );
    }
    tracing::debug!(
        container = cid,
        "seccomp filter of {} instructions",
        filter.insns.len()
    );
    Ok(())
}

impl Sandbox {
    pub fn new(
        config: AgentConfig,
        guest: GuestFs,
        paths: AgentPaths,
        reaper: Reaper,
        init_daemon: bool,
    ) -> Self {
        let (oom_tx, oom_rx) = mpsc::channel(64);
        Sandbox {
            config,
            guest,
            paths,
            reaper,
            init_daemon,
            state: Mutex::new(SandboxState::default()),
            storages: tokio::sync::Mutex::new(Storages::default()),
            oom_tx,
            oom_rx: tokio::sync::Mutex::new(oom_rx),
            mem_agent: Arc::default(),
            mem_agent_started: std::sync::Once::new(),
            sandbox_cgroup: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SandboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mem-agent, its loops started on first use.
    pub fn mem_agent(&self) -> &crate::mem_agent::MemAgent {
        self.mem_agent_started.call_once(|| {
            let cg = self.sandbox_cgroup.clone();
            tokio::spawn(self.mem_agent.clone().run(self.guest.clone(), move || {
                cg.lock().unwrap_or_else(|p| p.into_inner()).clone()
            }));
        });
        &self.mem_agent
    }

    fn storage_env(&self) -> StorageEnv<'_> {
        StorageEnv {
            run_dir: &self.paths.run_dir,
            guest: &self.guest,
            hotplug_timeout: self.config.hotplug_timeout,
        }
    }

    fn cgroups(&self) -> CgroupTree {
        CgroupTree::new(&self.paths.cgroup_root)
    }

    pub fn container(&self, cid: &str) -> Result<Arc<Container>> {
        check_id("container id", cid)?;
        self.lock()
            .containers
            .get(cid)
            .cloned()
            .ok_or_else(|| not_found(format!("no container {cid:?} in this sandbox")))
    }

    fn process(&self, cid: &str, eid: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.container(cid)?;
        if !eid.is_empty() {
            check_id("exec id", eid)?;
        }
        let p = c
            .process(eid)
            .ok_or_else(|| not_found(format!("no process {eid:?} in container {cid:?}")))?;
        Ok((c, p))
    }

    pub fn container_count(&self) -> usize {
        self.lock().containers.len()
    }

    // ---- sandbox ----

    pub async fn create_sandbox(&self, req: &agent::CreateSandboxRequest) -> Result<()> {
        let id = if req.sandbox_id.is_empty() {
            "default".to_string()
        } else {
            req.sandbox_id.clone()
        };
        check_id("sandbox id", &id)?;
        {
            let mut st = self.lock();
            if let Some(existing) = &st.id {
                return Err(exists(format!(
                    "sandbox {existing:?} already exists; DestroySandbox first"
                )));
            }
            st.id = Some(id.clone());
        }
        let res = self.setup_sandbox(req).await;
        if res.is_err() {
            self.lock().id = None;
        }
        res
    }

    async fn setup_sandbox(&self, req: &agent::CreateSandboxRequest) -> Result<()> {
        if !req.hostname.is_empty() {
            let h = &req.hostname;
            // Kata accepts what the kernel does (64 bytes); kiln also keeps
            // out what could not be a name: separators, spaces and control bytes.
            if h.len() > 64 || !h.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
                return Err(invalid(format!("hostname {h:?} is not a valid hostname")));
            }
            if self.init_daemon {
                nix::unistd::sethostname(h).map_err(|e| os(format!("sethostname({h})"), e))?;
            } else {
                tracing::info!(hostname = %h, "not the guest's init: leaving the hostname alone");
            }
        }
        if !req.dns.is_empty() {
            if req.dns.len() > 64
                || req
                    .dns
                    .iter()
                    .any(|l| l.len() > 1024 || l.contains(['\0', '\n']))
            {
                return Err(invalid(
                    "CreateSandbox dns entries must be at most 64 single lines",
                ));
            }
            let text: String = req.dns.iter().map(|l| format!("{l}\n")).collect();
            let dir = self.paths.run_dir.join("sandbox");
            std::fs::create_dir_all(&dir)
                .map_err(|e| os(format!("creating {}", dir.display()), e))?;
            // Through the directory's fd and a rename: a symlink planted at
            // resolv.conf (CopyFile can make one) is replaced, not followed.
            crate::beneath::Dir::open(&dir)
                .and_then(|d| {
                    crate::beneath::replace_file(&d, "resolv.conf".as_ref(), text.as_bytes(), 0o644)
                })
                .map_err(|e| os(format!("writing {}/resolv.conf", dir.display()), e))?;
            if self.init_daemon {
                std::fs::write("/etc/resolv.conf", &text)
                    .map_err(|e| os("writing /etc/resolv.conf", e))?;
            }
        }
        for m in &req.kernel_modules {
            self.load_module(m).await?;
        }
        if !req.guest_hook_path.is_empty() {
            tracing::warn!(path = %req.guest_hook_path, "guest OCI hooks are not supported; ignoring guest_hook_path");
        }
        let mut added = Vec::new();
        {
            let env = self.storage_env();
            let mut storages = self.storages.lock().await;
            for s in &req.storages {
                match storages.add(&env, s).await {
                    Ok(p) => added.push(p),
                    Err(e) => {
                        for p in &added {
                            storages.release(p);
                        }
                        return Err(e);
                    }
                }
            }
        }
        // One IPC and one UTS namespace for the sandbox's containers.
        let hostname = (!req.hostname.is_empty()).then_some(req.hostname.as_str());
        let shared_ns = match crate::namespaces::SharedNamespaces::create(
            &self.paths.run_dir.join("sandbox/ns"),
            hostname,
        ) {
            Ok(ns) => Some(Arc::new(ns)),
            Err(e) => {
                tracing::warn!(
                    "no shared IPC/UTS namespaces for the sandbox ({}); each container gets its own",
                    e.message
                );
                None
            }
        };
        let sid = self.lock().id.clone().unwrap_or_default();
        *self
            .sandbox_cgroup
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(self.cgroups().sandbox_path(&sid));
        let mut st = self.lock();
        st.storages = added;
        st.sandbox_pidns = req.sandbox_pidns;
        st.shared_ns = shared_ns;
        Ok(())
    }

    async fn load_module(&self, m: &agent::KernelModule) -> Result<()> {
        let ok = |s: &str| {
            !s.is_empty() && s.len() <= 256 && !s.starts_with('-') && !s.contains(['\0', '/'])
        };
        if !ok(&m.name) || !m.parameters.iter().all(|p| ok(p)) {
            return Err(invalid(format!(
                "kernel module {:?} or its parameters are not valid",
                m.name
            )));
        }
        let release = nix::sys::utsname::uname()
            .map_err(|e| os("uname", e))?
            .release()
            .to_string_lossy()
            .into_owned();
        let (guest, name, params) = (self.guest.clone(), m.name.clone(), m.parameters.clone());
        // Reading and inserting a module is blocking file I/O.
        let loaded = tokio::task::spawn_blocking(move || {
            crate::kmod::load(&guest, &release, &name, &params)
        })
        .await
        .map_err(|e| precondition(format!("loading kernel module {}: {e}", m.name)))??;
        tracing::info!(module = %m.name, ?loaded, "kernel module");
        Ok(())
    }

    pub async fn destroy_sandbox(&self) -> Result<()> {
        let (id, containers, storages) = {
            let st = self.lock();
            let id = st
                .id
                .clone()
                .ok_or_else(|| precondition("there is no sandbox; CreateSandbox first"))?;
            (
                id,
                st.containers.keys().cloned().collect::<Vec<_>>(),
                st.storages.clone(),
            )
        };
        let mut first_err = None;
        for cid in containers {
            if let Err(e) = self.remove_container(&cid, 30).await {
                tracing::warn!(container = %cid, "removing at DestroySandbox: {e}");
                first_err.get_or_insert(e);
            }
        }
        {
            let mut s = self.storages.lock().await;
            for p in &storages {
                s.release(p);
            }
        }
        self.cgroups().remove_sandbox(&id);
        let mut st = self.lock();
        st.storages.clear();
        if st.containers.is_empty() {
            st.id = None;
            st.sandbox_pidns = false;
            st.pidns_owner = None;
            if let Some(ns) = st.shared_ns.take() {
                ns.release();
            }
            *self
                .sandbox_cgroup
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
        first_err.map_or(Ok(()), Err)
    }

    // ---- containers ----

    pub async fn create_container(&self, req: &agent::CreateContainerRequest) -> Result<()> {
        let cid = req.container_id.as_str();
        check_id("container id", cid)?;
        let exec_id = if req.exec_id.is_empty() {
            cid.to_string()
        } else {
            req.exec_id.clone()
        };
        check_id("exec id", &exec_id)?;
        let oci_spec = req
            .OCI
            .as_ref()
            .ok_or_else(|| invalid("CreateContainer has no OCI spec"))?;
        let mut oci_spec = oci_spec.clone();
        let spec = ContainerSpec::from_oci(&oci_spec)?;
        if let Some(profile) = &spec.seccomp {
            check_seccomp(cid, profile)?;
        }
        let (sandbox_id, pidns, shared_ns) = {
            let mut st = self.lock();
            let sid = st
                .id
                .clone()
                .ok_or_else(|| precondition("there is no sandbox; CreateSandbox first"))?;
            if st.containers.contains_key(cid) || st.creating.contains(cid) {
                return Err(exists(format!("container {cid:?} already exists")));
            }
            // Every container gets a pid namespace (Kata's runtimes strip it
            // from the spec, and Kata's agent adds one back): a new one, or,
            // with sandbox_pidns on the sandbox or the container, the one of
            // the first container that asked for sharing.
            let pidns = if req.sandbox_pidns || st.sandbox_pidns {
                match st.pidns_owner {
                    Some(pid) if st.containers.values().any(|c| c.init.pid == pid) => {
                        PidNs::Join(pid)
                    }
                    _ => PidNs::NewShared,
                }
            } else {
                PidNs::New
            };
            st.creating.insert(cid.to_string());
            (sid, pidns, st.shared_ns.clone())
        };
        let _creating = Creating {
            sandbox: self,
            id: cid.to_string(),
        };

        // Devices: wait for them, bind them, rewrite the spec's nodes and env.
        let pci_map = crate::devices::setup(
            &self.guest,
            self.config.hotplug_timeout,
            &req.devices,
            &mut oci_spec,
        )
        .await
        .map_err(|e| e.context(format!("devices of container {cid}")))?;
        let spec = if req.devices.is_empty() {
            spec
        } else {
            ContainerSpec::from_oci(&oci_spec)?
        };

        // Storages first: the rootfs may live on one of them.
        let mut held = Vec::new();
        {
            let env = self.storage_env();
            let mut storages = self.storages.lock().await;
            for s in &req.storages {
                match storages.add(&env, s).await {
                    Ok(p) => held.push(p),
                    Err(e) => {
                        for p in &held {
                            storages.release(p);
                        }
                        return Err(e);
                    }
                }
            }
        }
        let created = self
            .create_with_storages(
                req,
                cid,
                &exec_id,
                &sandbox_id,
                pidns,
                shared_ns.as_deref(),
                spec,
                oci_spec,
                pci_map,
                &held,
            )
            .await;
        match created {
            Ok(c) => {
                let mut st = self.lock();
                if pidns == PidNs::NewShared {
                    st.pidns_owner = Some(c.init.pid);
                }
                st.containers.insert(cid.to_string(), c);
                Ok(())
            }
            Err(e) => {
                let mut storages = self.storages.lock().await;
                for p in &held {
                    storages.release(p);
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_with_storages(
        &self,
        req: &agent::CreateContainerRequest,
        cid: &str,
        exec_id: &str,
        sandbox_id: &str,
        pidns: PidNs,
        shared_ns: Option<&crate::namespaces::SharedNamespaces>,
        spec: ContainerSpec,
        mut oci_spec: oci::Spec,
        pci_map: crate::devices::PciMap,
        held: &[PathBuf],
    ) -> Result<Arc<Container>> {
        let root = self.container_root(cid, &spec)?;
        if let Some(r) = oci_spec.Root.as_mut() {
            r.Path = root.to_string_lossy().into_owned();
        }
        set_namespaces(&mut oci_spec, pidns, shared_ns);
        let spec = ContainerSpec::from_oci(&oci_spec)?;
        let pidns_init = !matches!(pidns, PidNs::Join(_));

        let cgroup = self.container_cgroup(sandbox_id, cid, &spec.resources, &spec.device_rules)?;
        let cleanup_cgroup = |cg: &Option<Cgroup>| {
            if let Some(cg) = cg {
                cg.kill_all();
                let _ = cg.remove(Duration::from_secs(2));
            }
        };
        warn_unsupported(req, cid);
        let (parent, child) = match if spec.process.terminal {
            stdio::pty(spec.process.console_size)
        } else {
            stdio::pipes(self.config.container_pipe_size)
        } {
            Ok(io) => io,
            Err(e) => {
                cleanup_cgroup(&cgroup);
                return Err(e);
            }
        };
        let cfg = LaunchConfig {
            kind: LaunchKind::Init,
            no_pivot: self.paths.no_pivot,
            join_pid: 0,
            cgroup: cgroup.as_ref().map(|c| c.path().to_path_buf()),
            spec: oci_spec.clone(),
        };
        let launched = match launch::launch(&self.reaper, &cfg, child).await {
            Ok(l) => l,
            Err(e) => {
                cleanup_cgroup(&cgroup);
                return Err(e.context(format!("creating container {cid}")));
            }
        };
        let init = match Process::new(
            exec_id.to_string(),
            launched.pid,
            pidns_init,
            launched.exit,
            parent,
            self.config.output_buffer_size,
        ) {
            Ok(p) => p,
            Err(e) => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(launched.pid),
                    Signal::SIGKILL,
                );
                cleanup_cgroup(&cgroup);
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            id: cid.to_string(),
            init,
            cgroup,
            storages: held.to_vec(),
            spec: oci_spec,
            pci_map,
            state: Mutex::new(State::Created),
            control: tokio::sync::Mutex::new(Some(launched.control)),
            execs: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        });
        self.watch_oom(&container);
        tracing::info!(
            container = cid,
            pid = container.init.pid,
            "container created"
        );
        Ok(container)
    }

    /// The container's rootfs on the guest: `root.path` as given if absolute,
    /// else relative to the container's share directory (Kata's bundle).
    fn container_root(&self, cid: &str, spec: &ContainerSpec) -> Result<PathBuf> {
        let root = if spec.root.path.is_absolute() {
            spec.root.path.clone()
        } else {
            self.paths
                .run_dir
                .join("shared/containers")
                .join(cid)
                .join(&spec.root.path)
        };
        // Confined to the run directory, with no `..` and no symlink on the
        // way: `Root.Path = "../../../../"` or a CopyFile-planted
        // `<cid>/rootfs -> /` would make the guest's root the container's.
        let root =
            crate::paths::confined("Root.Path", &self.paths.run_dir, &root.to_string_lossy())?;
        if !root.is_dir() {
            return Err(precondition(format!(
                "container rootfs {} is not a directory (is its storage mounted?)",
                root.display()
            )));
        }
        Ok(root)
    }

    /// Watches the container's `memory.events` for OOM kills (GetOOMEvent).
    fn watch_oom(&self, container: &Arc<Container>) {
        if let Some(cg) = &container.cgroup {
            if cg.memory_events_path().exists() {
                let task = tokio::spawn(crate::oom::watch(
                    container.id.clone(),
                    cg.memory_events_path(),
                    self.oom_tx.clone(),
                ));
                container
                    .tasks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(task);
            }
        }
    }

    /// The container's cgroup, with its limits; `None` when the guest has no
    /// cgroup v2 at all and none were asked for.
    fn container_cgroup(
        &self,
        sandbox_id: &str,
        cid: &str,
        r: &Resources,
        devices: &[crate::container::devcg::DeviceRule],
    ) -> Result<Option<Cgroup>> {
        let tree = self.cgroups();
        if !tree.root().join("cgroup.controllers").exists() {
            if r.is_empty() {
                tracing::warn!(root = %tree.root().display(), "no cgroup v2 mounted; container runs without a cgroup, and without device confinement");
                return Ok(None);
            }
            return Err(precondition(format!(
                "resource limits need cgroup v2, and {} is not a cgroup2 mount",
                tree.root().display()
            )));
        }
        let cg = tree.create(sandbox_id, cid)?;
        if let Err(e) = cg
            .apply(r)
            .and_then(|_| crate::container::devcg::attach(cg.path(), devices))
        {
            let _ = cg.remove(Duration::from_secs(1));
            return Err(e);
        }
        Ok(Some(cg))
    }

    pub async fn start_container(&self, cid: &str) -> Result<()> {
        let c = self.container(cid)?;
        let mut control = c.control.lock().await;
        let mut sock = control
            .take()
            .ok_or_else(|| precondition(format!("container {cid:?} was already started")))?;
        launch::start(&mut sock)
            .await
            .map_err(|e| e.context(format!("starting container {cid}")))?;
        c.set_state(State::Running);
        tracing::info!(container = cid, "container started");
        Ok(())
    }

    pub async fn remove_container(&self, cid: &str, timeout_secs: u32) -> Result<()> {
        let c = self.container(cid)?;
        if c.state() == State::Paused {
            if let Some(cg) = &c.cgroup {
                let _ = cg.set_frozen(false).await;
            }
        }
        // Killing the init of a pid namespace kills everything in it; the
        // cgroup catches processes outside one.
        let _ = c.init.signal(Signal::SIGKILL);
        let execs: Vec<Arc<Process>> = c
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        for p in &execs {
            let _ = p.signal(Signal::SIGKILL);
        }
        if let Some(cg) = &c.cgroup {
            cg.kill_all();
        }
        let wait_all = async {
            c.init.wait().await;
            for p in &execs {
                p.wait().await;
            }
        };
        if timeout_secs == 0 {
            wait_all.await;
        } else if tokio::time::timeout(Duration::from_secs(timeout_secs.into()), wait_all)
            .await
            .is_err()
        {
            return Err(timeout(format!(
                "container {cid:?} processes did not exit within {timeout_secs} s"
            )));
        }
        self.lock().containers.remove(cid);
        {
            let mut storages = self.storages.lock().await;
            for p in &c.storages {
                storages.release(p);
            }
        }
        if let Some(cg) = &c.cgroup {
            if let Err(e) = cg.remove(Duration::from_secs(5)) {
                tracing::warn!(container = cid, "{e}");
            }
        }
        tracing::info!(container = cid, "container removed");
        Ok(())
    }

    // ---- processes ----

    pub async fn exec_process(&self, req: &agent::ExecProcessRequest) -> Result<()> {
        let c = self.container(&req.container_id)?;
        check_id("exec id", &req.exec_id)?;
        let p = req
            .process
            .as_ref()
            .ok_or_else(|| invalid("ExecProcess has no process"))?;
        let pspec = ProcessSpec::from_oci(p)?;
        if c.init.exit_code().is_some() {
            return Err(precondition(format!(
                "container {:?} has stopped; cannot exec in it",
                c.id
            )));
        }
        if c.state() == State::Created {
            return Err(precondition(format!(
                "container {:?} is not started yet",
                c.id
            )));
        }
        if c.process(&req.exec_id).is_some() {
            return Err(exists(format!(
                "exec id {:?} is already in use in container {:?}",
                req.exec_id, c.id
            )));
        }
        if c.exec_count() >= MAX_EXECS {
            return Err(precondition(format!(
                "container {:?} already has {MAX_EXECS} exec processes",
                c.id
            )));
        }
        let mut spec = c.spec.clone();
        let mut p = p.clone();
        crate::devices::rewrite_pci_env(&mut p.Env, &c.pci_map);
        spec.Process = MessageField::some(p);
        let (parent, child) = if pspec.terminal {
            stdio::pty(pspec.console_size)?
        } else {
            stdio::pipes(self.config.container_pipe_size)?
        };
        let cfg = LaunchConfig {
            kind: LaunchKind::Exec,
            no_pivot: self.paths.no_pivot,
            join_pid: c.init.pid,
            cgroup: c.cgroup.as_ref().map(|cg| cg.path().to_path_buf()),
            spec,
        };
        let mut launched = launch::launch(&self.reaper, &cfg, child)
            .await
            .map_err(|e| e.context(format!("exec {}", req.exec_id)))?;
        let proc = Process::new(
            req.exec_id.clone(),
            launched.pid,
            false,
            launched.exit,
            parent,
            self.config.output_buffer_size,
        )?;
        if let Err(e) = launch::start(&mut launched.control).await {
            let _ = proc.signal(Signal::SIGKILL);
            return Err(e.context(format!("exec {}", req.exec_id)));
        }
        c.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.exec_id.clone(), proc);
        Ok(())
    }

    pub fn signal_process(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        let sig = i32::try_from(req.signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| {
                invalid(format!(
                    "signal {} is not a valid signal number",
                    req.signal
                ))
            })?;
        // Kata's runtimes say "every process of the container" with an empty
        // exec id and SIGKILL (containerd sends SIGTERM with an empty id for
        // the init alone).
        if req.exec_id.is_empty() && sig == Signal::SIGKILL {
            let _ = p.signal(sig);
            if let Some(cg) = &c.cgroup {
                cg.kill_all();
            }
            for e in c.execs.lock().unwrap_or_else(|p| p.into_inner()).values() {
                let _ = e.signal(sig);
            }
            return Ok(());
        }
        p.signal(sig)
    }

    /// GetDiagnosticData: `termination_log` is the container's Kubernetes
    /// termination message, read from the guest side of the mount at the
    /// path its annotation names (at most 4 KiB, as Kubernetes keeps).
    pub async fn diagnostic_data(&self, req: &agent::GetDiagnosticDataRequest) -> Result<String> {
        match req.log_type.as_str() {
            "termination_log" => {}
            other => {
                return Err(invalid(format!(
                    "diagnostic log_type {other:?} is not supported (termination_log)"
                )))
            }
        }
        let c = self.container(&req.container_id)?;
        let dest = c
            .spec
            .Annotations
            .get("io.kubernetes.container.terminationMessagePath")
            .ok_or_else(|| {
                not_found(format!(
                    "container {:?} has no io.kubernetes.container.terminationMessagePath annotation",
                    c.id
                ))
            })?;
        let source = c
            .spec
            .Mounts
            .iter()
            .find(|m| &m.destination == dest)
            .map(|m| m.source.clone())
            .ok_or_else(|| not_found(format!("no mount at the termination message path {dest}")))?;
        let src =
            crate::paths::confined("termination log mount source", &self.paths.run_dir, &source)?;
        match tokio::fs::read(&src).await {
            Ok(mut b) => {
                b.truncate(4096);
                Ok(String::from_utf8_lossy(&b).into_owned())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(os(format!("reading {}", src.display()), e)),
        }
    }

    /// UpdateEphemeralMounts.
    pub async fn update_ephemeral_mounts(&self, list: &[agent::Storage]) -> Result<()> {
        let env = self.storage_env();
        self.storages.lock().await.update_ephemeral(&env, list)
    }

    pub async fn wait_process(&self, req: &agent::WaitProcessRequest) -> Result<i32> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        let code = p.wait().await;
        if !Arc::ptr_eq(&p, &c.init) {
            c.reap_exec_if_finished(&p.exec_id);
        }
        Ok(code)
    }

    pub async fn read_stream(
        &self,
        req: &agent::ReadStreamRequest,
        stderr: bool,
    ) -> Result<Vec<u8>> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        let data = p.read_output(stderr, req.len).await?;
        if data.is_empty() && !Arc::ptr_eq(&p, &c.init) {
            c.reap_exec_if_finished(&p.exec_id);
        }
        Ok(data)
    }

    pub async fn write_stdin(&self, req: &agent::WriteStreamRequest) -> Result<u32> {
        let (_, p) = self.process(&req.container_id, &req.exec_id)?;
        if req.data.is_empty() {
            // Kata's runtime-rs sends an empty write for stdin EOF.
            p.close_stdin().await;
            return Ok(0);
        }
        Ok(p.write_stdin(&req.data).await? as u32)
    }

    pub async fn close_stdin(&self, req: &agent::CloseStdinRequest) -> Result<()> {
        let (_, p) = self.process(&req.container_id, &req.exec_id)?;
        p.close_stdin().await;
        Ok(())
    }

    pub fn tty_win_resize(&self, req: &agent::TtyWinResizeRequest) -> Result<()> {
        let (_, p) = self.process(&req.container_id, &req.exec_id)?;
        p.resize(req.row, req.column)
    }

    // ---- resources ----

    fn cgroup_of(&self, cid: &str) -> Result<(Arc<Container>, Cgroup)> {
        let c = self.container(cid)?;
        let cg = c.cgroup.clone().ok_or_else(|| {
            precondition(format!(
                "container {cid:?} has no cgroup (no cgroup v2 in the guest)"
            ))
        })?;
        Ok((c, cg))
    }

    pub fn update_container(&self, req: &agent::UpdateContainerRequest) -> Result<()> {
        let (_, cg) = self.cgroup_of(&req.container_id)?;
        let r = match req.resources.as_ref() {
            Some(r) => Resources::from_oci(r)?,
            None => return Ok(()),
        };
        cg.apply(&r)
    }

    pub fn stats_container(&self, cid: &str) -> Result<agent::StatsContainerResponse> {
        let (_, cg) = self.cgroup_of(cid)?;
        let mut resp = agent::StatsContainerResponse::new();
        resp.cgroup_stats = MessageField::some(cg.stats());
        for (name, v) in self.guest.net_dev() {
            let mut n = agent::NetworkStats::new();
            n.name = name;
            [
                n.rx_bytes,
                n.rx_packets,
                n.rx_errors,
                n.rx_dropped,
                n.tx_bytes,
                n.tx_packets,
                n.tx_errors,
                n.tx_dropped,
            ] = v;
            resp.network_stats.push(n);
        }
        Ok(resp)
    }

    pub async fn set_paused(&self, cid: &str, paused: bool) -> Result<()> {
        let (c, cg) = self.cgroup_of(cid)?;
        match (c.state(), paused) {
            (State::Running, true) | (State::Paused, false) => {}
            (s, _) => {
                return Err(precondition(format!(
                    "container {cid:?} is {s:?}; cannot {}",
                    if paused { "pause" } else { "resume" }
                )))
            }
        }
        cg.set_frozen(paused).await?;
        c.set_state(if paused {
            State::Paused
        } else {
            State::Running
        });
        Ok(())
    }

    /// Waits for the next container OOM kill.
    pub async fn next_oom_event(&self) -> Result<String> {
        let mut rx = self.oom_rx.lock().await;
        rx.recv()
            .await
            .ok_or_else(|| precondition("OOM event channel closed"))
    }

    /// Sum of live execs, for metrics.
    pub fn process_count(&self) -> usize {
        self.lock()
            .containers
            .values()
            .map(|c| 1 + c.exec_count())
            .sum()
    }

    pub fn run_dir(&self) -> &Path {
        &self.paths.run_dir
    }
}

/// The namespaces the agent decides: the container's pid namespace (new, or
/// the sandbox's to join), whatever path the request named; the sandbox's
/// shared IPC and UTS namespaces where the spec lists them.
fn set_namespaces(
    oci_spec: &mut oci::Spec,
    pidns: PidNs,
    shared_ns: Option<&crate::namespaces::SharedNamespaces>,
) {
    let linux = oci_spec.Linux.mut_or_insert_default();
    // A pid namespace path in the request would name a namespace of the
    // guest (the agent's own, at worst): the agent decides, not the spec.
    linux.Namespaces.retain(|n| n.Type != "pid");
    let mut ns = oci::LinuxNamespace::new();
    ns.Type = "pid".into();
    if let PidNs::Join(pid) = pidns {
        ns.Path = format!("/proc/{pid}/ns/pid");
    }
    linux.Namespaces.push(ns);
    if let Some(shared) = shared_ns {
        for n in linux.Namespaces.iter_mut() {
            match n.Type.as_str() {
                "ipc" => n.Path = shared.ipc.to_string_lossy().into_owned(),
                "uts" => n.Path = shared.uts.to_string_lossy().into_owned(),
                _ => {}
            }
        }
    }
}

/// CreateContainer fields kiln does not support: logged, then ignored.
fn warn_unsupported(req: &agent::CreateContainerRequest, cid: &str) {
    if !req.shared_mounts.is_empty() {
        tracing::warn!(
            container = cid,
            shared_mounts = req.shared_mounts.len(),
            "CreateContainer shared_mounts are not supported yet and were ignored"
        );
    }
    if req.stdin_port != 0 || req.stdout_port != 0 || req.stderr_port != 0 {
        tracing::warn!(
            container = cid,
            "passfd stdio ports are not supported; stdio goes through ReadStdout/WriteStdin"
        );
    }
}
