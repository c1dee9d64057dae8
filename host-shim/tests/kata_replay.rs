//! End-to-end: a Kubernetes pod's life replayed against kiln-agent with the
//! requests Kata's runtimes send, in their order and with their field values
//! (see /work/shared/reviews/runtime-rpcs.md; the Go runtime's files are
//! virtcontainers/kata_agent.go, sandbox.go, container.go, network.go and
//! containerd-shim-v2's delete.go, wait.go).
//!
//! First the Go runtime (containerd-shim-kata-v2, its default QEMU config):
//! a pod with a pause container and an app container that has a CPU and a
//! memory limit with swap, the k8s bind mounts shared over virtio-fs, a
//! configMap (`watchable-bind`) and a memory emptyDir with fsGroup
//! (`ephemeral` with `fsgid`), a vCPU and a DIMM hot-plugged through QMP; the
//! app is stopped and removed, a second container is created and deleted
//! without being started, then the pod goes. Then the steps where runtime-rs
//! differs (SetPolicy first, OnlineCPUMem{total, cpu_only=false} on every
//! container, no RemoveStaleVirtiofsShareMounts, UpdateEphemeralMounts or
//! DestroySandbox), in the same VM if the agent takes a second sandbox,
//! else in a second boot.
//!
//! Every step is recorded and the test goes on after a failed one where the
//! pod still makes sense, so one run shows every step that disagrees with
//! Kata; the test fails at the end if any did.
//!
//! `cargo xtask test` builds the image and runs this with KILN_E2E_MANIFEST.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{agent, oci, types};
use kiln_shim::client::AgentClient;
use kiln_shim::config::ShimConfig;
use kiln_shim::vm::{BootOptions, Vm};
use kiln_testsupport::vm::{bind, manifest};
use protobuf::MessageField;

/// Kata's guest paths.
const SHARED: &str = "/run/kata-containers/shared/containers";
const SANDBOX_SHM: &str = "/run/kata-containers/sandbox/shm";
const EPHEMERAL: &str = "/run/kata-containers/sandbox/ephemeral";

/// containerd ids are 64 hex digits; the pause container's is the sandbox's.
const POD: &str = "5b2d7c9e0f41a3b6c8d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a";
const APP: &str = "a1c3e5f7092b4d6f8a0c2e4b6d8f0a1c3e5f7092b4d6f8a0c2e4b6d8f0a1c3e5";
const NEVER: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
/// runtime-rs's pod (same VM or a second boot).
const RS_POD: &str = "7e6d5c4b3a291807f6e5d4c3b2a190807e6d5c4b3a291807f6e5d4c3b2a19080";
const RS_APP: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

const HOSTNAME: &str = "replay-pod";
const POD_UID: &str = "3c8e6a52-1d7b-4f0e-9a2c-5b6d7e8f9a0b";
/// The app's limits (k8s resources.limits: cpu 1, memory 256Mi).
const APP_MEMORY: i64 = 256 << 20;
/// What the Go runtime hot-plugs for it: one vCPU, the memory limit.
const DIMM_MIB: u64 = 256;
const BOOT_MIB: u32 = 512;
/// The sandbox shm size containerd asks for (64 MiB).
const SHM_BYTES: u64 = 64 << 20;
/// The memory emptyDir's volume name and the pod's fsGroup.
const CACHE_VOLUME: &str = "cache-volume";
const FS_GROUP: u32 = 2000;
const CONFIG_CONTENT: &str = "lives=3\nenemies=aliens\n";
const NIC_MAC: &str = "02:42:0a:58:00:05";
const IFF_NOARP: u32 = 0x80;
const RTNH_F_ONLINK: u32 = 0x4;
const NUD_PERMANENT: i32 = 0x80;
const RT_SCOPE_LINK: u32 = 253;

/// What each step gave; printed as a table at the end.
#[derive(Default)]
struct Steps {
    rows: Vec<(String, Result<String, String>)>,
    started: Option<Instant>,
}

impl Steps {
    /// Records `r` under `name`; true when it passed.
    fn record<T: Into<String>>(&mut self, name: &str, r: anyhow::Result<T>) -> bool {
        let at = self.started.get_or_insert_with(Instant::now).elapsed();
        let r = r.map(Into::into).map_err(|e| format!("{e:#}"));
        match &r {
            Ok(note) => eprintln!("[{:6.1} s] PASS {name}: {note}", at.as_secs_f64()),
            Err(e) => eprintln!("[{:6.1} s] FAIL {name}: {e}", at.as_secs_f64()),
        }
        let ok = r.is_ok();
        self.rows.push((name.to_string(), r));
        ok
    }

    fn failed(&self) -> Vec<&str> {
        self.rows
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn summary(&self) -> String {
        let mut s = String::from("\nstep | result\n---|---\n");
        for (name, r) in &self.rows {
            match r {
                Ok(note) => s.push_str(&format!("{name} | pass: {note}\n")),
                Err(e) => s.push_str(&format!("{name} | FAIL: {}\n", e.replace('\n', " "))),
            }
        }
        s
    }
}

/// A ttrpc error's code and message, for asserts on what the runtime checks.
fn status(e: &ttrpc::Error) -> Option<(ttrpc::Code, String)> {
    match e {
        ttrpc::Error::RpcStatus(s) => Some((s.code(), s.message().to_string())),
        _ => None,
    }
}

fn unimplemented(e: &ttrpc::Error) -> bool {
    matches!(status(e), Some((ttrpc::Code::UNIMPLEMENTED, _)))
}

fn long() -> ttrpc::context::Context {
    kiln_testsupport::vm::long()
}

fn rpc<T>(what: &str, r: ttrpc::Result<T>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: {e:?}"))
}

/// The booted VM, the agent, and the host side of the virtio-fs share.
struct Guest {
    vm: Vm,
    client: AgentClient,
    /// The host directory virtiofsd shares (`kataShared`).
    shared: PathBuf,
    /// The pause container's rootfs, bind-mounted into the share by the shim.
    _pause_rootfs: tempfile::TempDir,
    _run_base: tempfile::TempDir,
}

impl Guest {
    async fn boot(cfg: &ShimConfig) -> Guest {
        let run_base = tempfile::tempdir().unwrap();
        std::env::set_var("KILN_RUN_DIR", run_base.path());
        let pause_rootfs = tempfile::tempdir().unwrap();
        kiln_testsupport::vm::write_busybox_rootfs(pause_rootfs.path()).unwrap();
        let image = kiln_shim::image::BootImage::load(&manifest()).unwrap();
        let opts = BootOptions {
            share_rootfs: Some((POD.into(), pause_rootfs.path().to_path_buf())),
            ..Default::default()
        };
        let mut vm = Vm::launch(&image, cfg, &opts).unwrap_or_else(|e| panic!("{e:#}"));
        let ready = match vm.wait_ready(cfg).await {
            Ok(r) => r,
            Err(e) => panic!("the agent never answered: {e:#}"),
        };
        eprintln!(
            "agent ready after {:.2} s ({})",
            ready.elapsed.as_secs_f64(),
            vm.accel_note
        );
        let shared = vm.run_dir.path().join("shared");
        Guest {
            vm,
            client: ready.client,
            shared,
            _pause_rootfs: pause_rootfs,
            _run_base: run_base,
        }
    }

    fn agent(&self) -> &kiln_protocol::agent_ttrpc::AgentServiceClient {
        &self.client.agent
    }

    fn ctx(&self) -> ttrpc::context::Context {
        self.client.ctx()
    }

    /// A container rootfs in the share, where ShareRootFilesystem puts it:
    /// `<share>/<cid>/rootfs`, the guest's `SHARED/<cid>/rootfs`.
    fn share_rootfs(&self, cid: &str) -> anyhow::Result<()> {
        let root = self.shared.join(cid).join("rootfs");
        if !root.join("bin/busybox").exists() {
            kiln_testsupport::vm::write_busybox_rootfs(&root)?;
        }
        // As a runtime must with the (default) guest id map: into the range.
        self.vm.hand_to_guest(&self.shared.join(cid))?;
        Ok(())
    }

    /// ShareFile: `<cid>-<16 hex>-<basename of the destination>` at the top
    /// of the share. Returns the guest path.
    fn share_file(&self, cid: &str, hex: &str, dest: &str, content: &str) -> String {
        let name = format!("{cid}-{hex}-{}", base(dest));
        std::fs::write(self.shared.join(&name), content).unwrap();
        self.vm.hand_to_guest(&self.shared.join(&name)).unwrap();
        format!("{SHARED}/{name}")
    }

    async fn exec_with(
        &self,
        cid: &str,
        exec_id: &str,
        p: oci::Process,
    ) -> anyhow::Result<(i32, String, String)> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        let terminal = p.Terminal;
        req.process = MessageField::some(p);
        rpc(
            "ExecProcess",
            self.agent().exec_process(self.ctx(), &req).await,
        )?;
        let out = self.read_all(cid, exec_id, false).await?;
        let err = if terminal {
            String::new()
        } else {
            self.read_all(cid, exec_id, true).await?
        };
        Ok((self.wait(cid, exec_id).await?, out, err))
    }

    /// ExecProcess of `args` as the Go runtime sends it (cmdToKataProcess:
    /// user, args, env, cwd; no capabilities), to its end.
    async fn sh(&self, cid: &str, exec_id: &str, args: &[&str]) -> anyhow::Result<String> {
        let (st, out, err) = self.exec_with(cid, exec_id, process(args)).await?;
        if st != 0 {
            anyhow::bail!("{args:?} exited {st}: {err}{out}");
        }
        Ok(out)
    }

    async fn read_all(&self, cid: &str, exec_id: &str, stderr: bool) -> anyhow::Result<String> {
        let mut req = agent::ReadStreamRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        req.len = 64 * 1024;
        let mut out = Vec::new();
        loop {
            let r = if stderr {
                self.agent().read_stderr(long(), &req).await
            } else {
                self.agent().read_stdout(long(), &req).await
            };
            let data = rpc(if stderr { "ReadStderr" } else { "ReadStdout" }, r)?.data;
            if data.is_empty() {
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend(data);
        }
    }

    async fn wait(&self, cid: &str, exec_id: &str) -> anyhow::Result<i32> {
        let mut req = agent::WaitProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        Ok(rpc("WaitProcess", self.agent().wait_process(long(), &req).await)?.status)
    }

    async fn signal(&self, cid: &str, exec_id: &str, sig: u32) -> ttrpc::Result<()> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = cid.into();
        req.exec_id = exec_id.into();
        req.signal = sig;
        self.agent()
            .signal_process(self.ctx(), &req)
            .await
            .map(|_| ())
    }

    async fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool) -> anyhow::Result<()> {
        let mut req = agent::OnlineCPUMemRequest::new();
        req.wait = false;
        req.nb_cpus = nb_cpus;
        req.cpu_only = cpu_only;
        rpc(
            &format!("OnlineCPUMem{{nb_cpus={nb_cpus}, cpu_only={cpu_only}}}"),
            self.agent().online_cpu_mem(long(), &req).await,
        )?;
        Ok(())
    }

    /// UpdateEphemeralMounts as updateResources sends it; UNIMPLEMENTED is
    /// what the Go runtime ignores ("agent does not support updateMounts").
    async fn update_ephemeral_mounts(
        &self,
        storages: Vec<agent::Storage>,
    ) -> anyhow::Result<String> {
        let mut req = agent::UpdateEphemeralMountsRequest::new();
        let n = storages.len();
        req.storages = storages;
        match self.agent().update_ephemeral_mounts(self.ctx(), &req).await {
            Ok(_) => Ok(format!("{n} storages, OK")),
            Err(e) if unimplemented(&e) => Ok(format!(
                "{n} storages, UNIMPLEMENTED (the Go runtime ignores it)"
            )),
            Err(e) => Err(anyhow::anyhow!("UpdateEphemeralMounts: {e:?}")),
        }
    }

    async fn create(&self, req: &agent::CreateContainerRequest) -> anyhow::Result<()> {
        rpc(
            &format!("CreateContainer {}", short(&req.container_id)),
            self.agent().create_container(long(), req).await,
        )?;
        Ok(())
    }

    async fn start(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = cid.into();
        rpc(
            "StartContainer",
            self.agent().start_container(self.ctx(), &req).await,
        )?;
        Ok(())
    }

    /// RemoveContainer as kata_agent.go:stopContainer sends it (no timeout).
    async fn remove(&self, cid: &str) -> anyhow::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = cid.into();
        rpc(
            "RemoveContainer",
            self.agent().remove_container(long(), &req).await,
        )?;
        Ok(())
    }

    async fn remove_stale_virtiofs_share_mounts(&self) -> anyhow::Result<()> {
        rpc(
            "RemoveStaleVirtiofsShareMounts",
            self.agent()
                .remove_stale_virtiofs_share_mounts(
                    self.ctx(),
                    &agent::RemoveStaleVirtiofsShareMountsRequest::new(),
                )
                .await,
        )?;
        Ok(())
    }

    /// container.go:stop: SIGKILL to all (exec_id ""), WaitProcess, then
    /// RemoveContainer and RemoveStaleVirtiofsShareMounts (both fatal without
    /// force). Returns the init's status.
    async fn go_stop(&self, cid: &str) -> anyhow::Result<i32> {
        if let Err(e) = self.signal(cid, "", 9).await {
            // kill() errors are ignored; the ESRCH text is expected.
            eprintln!(
                "  SignalProcess(SIGKILL, all) {}: {e:?} (ignored)",
                short(cid)
            );
        }
        let st = tokio::time::timeout(Duration::from_secs(60), self.wait(cid, cid))
            .await
            .map_err(|_| anyhow::anyhow!("WaitProcess did not answer within the stop's 60 s"))??;
        self.remove(cid).await?;
        self.remove_stale_virtiofs_share_mounts().await?;
        Ok(st)
    }
}

fn short(cid: &str) -> &str {
    &cid[..cid.len().min(12)]
}

fn base(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

fn process(args: &[&str]) -> oci::Process {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|s| s.to_string()).collect();
    p.Env = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        format!("HOSTNAME={HOSTNAME}"),
    ];
    p.Cwd = "/".into();
    p.User = MessageField::some(oci::User::new());
    p
}

/// The OCI spec containerd's CRI plugin gives a container of this pod, after
/// Kata's Go runtime has rewritten it for the agent: rootfs on the share,
/// /dev/shm a bind of the sandbox shm (handleShm), the shim's own
/// constrainGRPCSpec (pid namespace removed; `sandbox_pidns` stays false),
/// and, as the Go runtime (unlike runtime-rs and kiln-shim) does, no cgroup
/// namespace either.
fn go_spec(cid: &str, args: &[&str], container_type: &str, go: bool) -> oci::Spec {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut s =
        kiln_shim::spec::default_spec(&args, &[format!("HOSTNAME={HOSTNAME}")], false).unwrap();
    s.set_hostname(Some(HOSTNAME.into()));
    let (mut p, _) = kiln_shim::spec::to_protocol(&s).unwrap();
    p.Root.mut_or_insert_default().Path = format!("{SHARED}/{cid}/rootfs");
    p.Root.mut_or_insert_default().Readonly = false;
    for m in p.Mounts.iter_mut().filter(|m| m.destination == "/dev/shm") {
        *m = bind("/dev/shm", SANDBOX_SHM, &["rbind"]);
    }
    p.Annotations.insert(
        "io.kubernetes.cri.container-type".into(),
        container_type.into(),
    );
    p.Annotations.insert(
        "io.kubernetes.cri.sandbox-id".into(),
        if go { POD } else { RS_POD }.into(),
    );
    p.Annotations.insert(
        "io.kubernetes.cri.sandbox-namespace".into(),
        "default".into(),
    );
    let linux = p.Linux.mut_or_insert_default();
    linux.CgroupsPath = format!("/kubepods/burstable/pod{POD_UID}/{cid}");
    assert!(
        linux.Namespaces.iter().any(|n| n.Type == "pid"),
        "the CRI spec has a pid namespace before the rewrite"
    );
    let sandbox_pidns = kiln_shim::spec::constrain_for_agent(&mut p);
    assert!(!sandbox_pidns, "no shareProcessNamespace in this pod");
    if go {
        p.Linux
            .mut_or_insert_default()
            .Namespaces
            .retain(|n| n.Type != "cgroup");
    }
    p
}

fn create_request(
    cid: &str,
    spec: oci::Spec,
    storages: Vec<agent::Storage>,
) -> agent::CreateContainerRequest {
    let mut req = agent::CreateContainerRequest::new();
    req.container_id = cid.into();
    req.exec_id = cid.into();
    req.storages = storages;
    req.OCI = MessageField::some(spec);
    req.sandbox_pidns = false;
    req
}

/// kata_agent.go:setupStorages: the virtio-fs share (no options: no dax
/// with virtio_fs_cache_size = 0) and the sandbox shm.
fn sandbox_storages() -> Vec<agent::Storage> {
    let mut share = agent::Storage::new();
    share.driver = "virtio-fs".into();
    share.source = "kataShared".into();
    share.fstype = "virtiofs".into();
    share.mount_point = format!("{SHARED}/");
    let mut shm = agent::Storage::new();
    shm.driver = "ephemeral".into();
    shm.source = "shm".into();
    shm.fstype = "tmpfs".into();
    shm.mount_point = SANDBOX_SHM.into();
    shm.options = ["noexec", "nosuid", "nodev", "mode=1777"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("size={SHM_BYTES}")])
        .collect();
    vec![share, shm]
}

fn create_sandbox_request(id: &str) -> agent::CreateSandboxRequest {
    let mut req = agent::CreateSandboxRequest::new();
    req.hostname = HOSTNAME.into();
    req.dns = vec![
        "nameserver 10.96.0.10".into(),
        "search default.svc.cluster.local svc.cluster.local cluster.local".into(),
        "options ndots:5".into(),
    ];
    req.storages = sandbox_storages();
    req.sandbox_pidns = false;
    req.sandbox_id = id.into();
    req.guest_hook_path = String::new();
    req.kernel_modules = vec![];
    req
}

/// The memory emptyDir's storage (handleEphemeralStorage: the host volume's
/// gid is the fsGroup, so `fsgid=N`) and its remount in updateResources.
fn cache_storage(options: Vec<String>) -> agent::Storage {
    let mut s = agent::Storage::new();
    s.driver = "ephemeral".into();
    s.source = "tmpfs".into();
    s.fstype = "tmpfs".into();
    s.mount_point = format!("{EPHEMERAL}/{CACHE_VOLUME}");
    s.options = options;
    s
}

fn ephemeral_remount(total_mib: u64) -> Vec<agent::Storage> {
    vec![cache_storage(vec![
        "remount".into(),
        format!("size={total_mib}M"),
        format!("fsgid={FS_GROUP}"),
    ])]
}

/// A k8s configMap volume as kubelet writes it (`..data` and the keys are
/// symlinks into a timestamped directory), shared as
/// `<cid>-<hex>-<volume>`; returns its guest path.
fn share_config_map(g: &Guest, cid: &str, hex: &str, volume: &str) -> String {
    let name = format!("{cid}-{hex}-{volume}");
    let dir = g.shared.join(&name);
    let stamp = "..2026_12_06_14_00_00.123456789";
    std::fs::create_dir_all(dir.join(stamp)).unwrap();
    std::fs::write(dir.join(stamp).join("game.properties"), CONFIG_CONTENT).unwrap();
    std::os::unix::fs::symlink(stamp, dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/game.properties", dir.join("game.properties")).unwrap();
    g.vm.hand_to_guest(&dir).unwrap();
    format!("{SHARED}/{name}")
}

/// The value `name` has in /proc/meminfo text, in KiB.
fn meminfo_kib(text: &str, name: &str) -> anyhow::Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/meminfo: {text}"))
}

/// The total size in KiB `df -k` reports for the one filesystem listed.
fn df_kib(out: &str) -> anyhow::Result<u64> {
    out.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected df output: {out}"))
}

fn shim_config() -> ShimConfig {
    let mut cfg = ShimConfig::default();
    let q = &mut cfg.hypervisor.qemu;
    q.default_vcpus = 1;
    q.default_maxvcpus = 2;
    q.default_memory = BOOT_MIB;
    q.default_maxmemory = BOOT_MIB + 512;
    q.memory_slots = 2;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through cargo xtask test"]
async fn kata_pod_lifecycle_replay() {
    let t0 = Instant::now();
    let cfg = shim_config();
    let g = Guest::boot(&cfg).await;
    let mut s = Steps::default();

    let go = go_replay(&g, &mut s).await;
    eprintln!(
        "Go runtime replay done at {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // runtime-rs: in the same VM when the agent takes a new sandbox after
    // DestroySandbox (Kata's runtimes power the VM off instead: a refusal is
    // no disagreement), else in a second boot.
    set_policy(&g, &mut s).await;
    let second_boot;
    let (rs, vcpus) = match g
        .agent()
        .create_sandbox(long(), &create_sandbox_request(RS_POD))
        .await
    {
        Ok(_) => {
            s.record(
                "runtime-rs: CreateSandbox (same VM, after DestroySandbox)",
                anyhow::Ok("OK"),
            );
            (&g, go.vcpus_online)
        }
        Err(e) => {
            eprintln!(
                "the agent takes no second sandbox after DestroySandbox ({e:?}); runtime-rs gets a second boot"
            );
            let mut one = cfg.clone();
            one.hypervisor.qemu.default_maxvcpus = 0;
            one.hypervisor.qemu.default_maxmemory = 0;
            second_boot = Guest::boot(&one).await;
            let g2 = &second_boot;
            s.record(
                "runtime-rs: Check",
                g2.client.check().await.map(|st| format!("{st:?}")),
            );
            set_policy(g2, &mut s).await;
            s.record(
                "runtime-rs: CreateSandbox (second boot)",
                rpc(
                    "CreateSandbox",
                    g2.agent()
                        .create_sandbox(long(), &create_sandbox_request(RS_POD))
                        .await,
                )
                .map(|_| "OK"),
            );
            (g2, 1)
        }
    };
    rs_replay_containers(rs, &mut s, vcpus).await;
    eprintln!(
        "runtime-rs replay done at {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    eprintln!("{}", s.summary());
    eprintln!(
        "figure: Kata pod-lifecycle replay took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let diag = g.vm.diagnostics();
    drop(g.client);
    g.vm.shutdown();
    let failed = s.failed();
    assert!(
        failed.is_empty(),
        "{} steps disagree with Kata: {failed:?}{diag}",
        failed.len()
    );
}

struct GoOutcome {
    /// vCPUs online in the guest at the end (2 after the hot-plug).
    vcpus_online: u32,
}

/// The Go runtime's pod, from Check to DestroySandbox.
async fn go_replay(g: &Guest, s: &mut Steps) -> GoOutcome {
    // --- startSandbox
    s.record(
        "Check",
        async {
            let st = g.client.check().await?;
            anyhow::ensure!(
                st == kiln_protocol::health::health_check_response::ServingStatus::SERVING,
                "{st:?}"
            );
            Ok("SERVING")
        }
        .await,
    );
    // The NIC the Go runtime cold-plugs; here hot-plugged before the agent
    // is asked about it (the harness waits, the runtime does not need to).
    s.record(
        "UpdateInterface for a missing link says \"Link not found\" (the runtime's retry condition)",
        async {
            let mut req = agent::UpdateInterfaceRequest::new();
            req.interface = MessageField::some(interface());
            match g.agent().update_interface(g.ctx(), &req).await {
                Ok(r) => anyhow::bail!("UpdateInterface for an absent NIC answered {r:?}"),
                Err(e) => {
                    let text = format!("{e:?}");
                    anyhow::ensure!(text.contains("Link not found"), "{text}");
                    Ok(text)
                }
            }
        }
        .await,
    );
    let nic = plug_nic(g).await;
    let have_nic = s.record(
        "virtio-net NIC plugged (the runtime's cold-plugged eth0)",
        nic,
    );
    if have_nic {
        s.record("UpdateInterface", update_interface(g).await);
        s.record("UpdateRoutes", update_routes(g).await);
        s.record("AddARPNeighbors", add_arp_neighbors(g).await);
    } else {
        eprintln!("no NIC: UpdateInterface/UpdateRoutes/AddARPNeighbors skipped");
    }
    let sandbox_ok = s.record(
        "CreateSandbox (virtio-fs kataShared + ephemeral shm, hostname, dns)",
        rpc(
            "CreateSandbox",
            g.agent()
                .create_sandbox(long(), &create_sandbox_request(POD))
                .await,
        )
        .map(|_| "OK"),
    );
    if !sandbox_ok {
        return GoOutcome { vcpus_online: 1 };
    }
    // GetOOMEvent: the shim's watchOOMEvents loop, running for the pod's
    // whole life; every other call must go on while it waits.
    let oom_events = Arc::new(Mutex::new(Vec::<String>::new()));
    let oom_task = {
        let agent = g.agent().clone();
        let events = oom_events.clone();
        tokio::spawn(async move {
            loop {
                match agent
                    .get_oom_event(
                        ttrpc::context::Context::default(),
                        &agent::GetOOMEventRequest::new(),
                    )
                    .await
                {
                    Ok(ev) => events.lock().unwrap().push(ev.container_id),
                    Err(e) => {
                        events.lock().unwrap().push(format!("error: {e:?}"));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    };

    let mut probe = false;
    s.record(
        "GetGuestDetails{mem_block_size, mem_hotplug_probe}",
        async {
            let mut req = agent::GuestDetailsRequest::new();
            req.mem_block_size = true;
            req.mem_hotplug_probe = true;
            let d = rpc(
                "GetGuestDetails",
                g.agent().get_guest_details(g.ctx(), &req).await,
            )?;
            let bs = d.mem_block_size_bytes;
            anyhow::ensure!(
                bs >= 1 << 20 && bs.is_power_of_two(),
                "mem_block_size_bytes {bs} is not a memory block size"
            );
            probe = d.support_mem_hotplug_probe;
            Ok(format!(
                "block {} MiB, probe {}",
                bs >> 20,
                d.support_mem_hotplug_probe
            ))
        }
        .await,
    );

    // --- the pause container (the sandbox's, created by CreateSandbox in the shim)
    let pause_ok = s.record(
        "CreateContainer pause (pid ns stripped)",
        g.create(&create_request(
            POD,
            go_spec(POD, &["sleep", "2147483647"], "sandbox", true),
            vec![],
        ))
        .await
        .map(|_| "OK"),
    );
    // updateResources: no CPU growth, memory unchanged: OnlineCPUMem{0,false}
    // and UpdateEphemeralMounts with nothing to resize.
    s.record(
        "pause: OnlineCPUMem{0, false}",
        g.online_cpu_mem(0, false).await.map(|_| "OK"),
    );
    s.record(
        "pause: UpdateEphemeralMounts([])",
        g.update_ephemeral_mounts(vec![]).await,
    );
    if pause_ok {
        s.record("StartContainer pause", g.start(POD).await.map(|_| "OK"));
    }
    s.record(
        "pause started: OnlineCPUMem{0, false} + UpdateEphemeralMounts([])",
        async {
            g.online_cpu_mem(0, false).await?;
            g.update_ephemeral_mounts(vec![]).await
        }
        .await,
    );
    let mem_before = g
        .sh(POD, "meminfo-before", &["cat", "/proc/meminfo"])
        .await
        .and_then(|t| meminfo_kib(&t, "MemTotal"));
    s.record(
        "pause: PID 1 is its own init (own pid ns)",
        async {
            let cmd = g.sh(POD, "pause-pid1", &["cat", "/proc/1/cmdline"]).await?;
            anyhow::ensure!(
                cmd == "sleep\u{0}2147483647\u{0}",
                "/proc/1/cmdline is {cmd:?}"
            );
            Ok("/proc/1 is sleep")
        }
        .await,
    );

    // --- the app container
    std::fs::create_dir_all(g.shared.join("watchable")).unwrap();
    g.vm.hand_to_guest(&g.shared.join("watchable")).unwrap();
    g.share_rootfs(APP).unwrap();
    let hosts = "127.0.0.1\tlocalhost\n10.88.0.5\treplay-pod\n";
    let mounts = [
        ("/etc/hosts", "9f86d081884c7d65", hosts),
        ("/dev/termination-log", "2c26b46b68ffc68f", ""),
        ("/etc/hostname", "fcde2b2edba56bf4", "replay-pod\n"),
        (
            "/etc/resolv.conf",
            "b5bb9d8014a0f9b1",
            "nameserver 10.96.0.10\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
        ),
    ];
    let mut spec = go_spec(APP, &["sleep", "1000000"], "container", true);
    for (dest, hex, content) in mounts {
        let src = g.share_file(APP, hex, dest, content);
        spec.Mounts
            .push(bind(dest, &src, &["rbind", "rprivate", "rw"]));
    }
    // configMap `game-config` at /etc/config: shared, then watchable-bind.
    let cm_source = share_config_map(g, APP, "7d865e959b246691", "config");
    let cm_mount = format!("{SHARED}/watchable/{}", base(&cm_source));
    let mut watchable = agent::Storage::new();
    watchable.driver = "watchable-bind".into();
    watchable.source = cm_source;
    watchable.fstype = "bind".into();
    watchable.mount_point = cm_mount.clone();
    watchable.options = vec!["rbind".into(), "rprivate".into(), "ro".into()];
    spec.Mounts
        .push(bind("/etc/config", &cm_mount, &["rbind", "rprivate", "ro"]));
    // The memory emptyDir: a bind of the ephemeral tmpfs storage.
    spec.Mounts.push(bind(
        "/cache",
        &format!("{EPHEMERAL}/{CACHE_VOLUME}"),
        &["rbind", "rprivate", "rw"],
    ));
    let cache = cache_storage(vec![format!("fsgid={FS_GROUP}")]);
    {
        let res = spec
            .Linux
            .mut_or_insert_default()
            .Resources
            .mut_or_insert_default();
        let mem = res.Memory.mut_or_insert_default();
        mem.Limit = APP_MEMORY;
        // containerd's CRI: Swap = Limit when the host has a swap controller.
        mem.Swap = APP_MEMORY;
        let cpu = res.CPU.mut_or_insert_default();
        cpu.Quota = 100_000;
        cpu.Period = 100_000;
        cpu.Shares = 1024;
    }
    let app_ok = s.record(
        "CreateContainer app (share rootfs, k8s binds, watchable-bind configMap, ephemeral fsgid emptyDir, memory+swap, pid ns stripped)",
        g.create(&create_request(APP, spec, vec![watchable, cache]))
            .await
            .map(|_| "OK"),
    );

    // updateResources after the app: one more vCPU, 256 MiB more memory.
    // Whether the guest kernel can take a vCPU at all: Linux 6.12 counts
    // QEMU's not-yet-present (Enabled=0) LAPICs as hot-pluggable only under
    // a hypervisor it detects (acpi_is_processor_usable), and TCG is none,
    // so under TCG `possible` stays at the boot vCPUs. Then the replay still
    // plugs the vCPU and sends OnlineCPUMem, and wants a clear error (Kata's
    // agent fails it too) instead of the nproc check.
    let possible = g
        .sh(
            POD,
            "cpu-possible",
            &["cat", "/sys/devices/system/cpu/possible"],
        )
        .await
        .unwrap_or_default();
    let hotpluggable = possible.trim() != "0";
    let cpu_plugged = g.vm.hotplug_vcpu(1);
    let mut cpu_ok = s.record(
        "QMP: vCPU hot-plugged (query-hotpluggable-cpus, device_add)",
        cpu_plugged.map(|slot| format!("{} {:?}", slot.driver, slot.props)),
    );
    if cpu_ok && hotpluggable {
        s.record(
            "OnlineCPUMem{nb_cpus=2 (total), cpu_only=true}",
            g.online_cpu_mem(2, true).await.map(|_| "OK"),
        );
    } else if cpu_ok {
        eprintln!(
            "the guest's possible CPUs are {:?}: its kernel takes no hot-plugged vCPU here (no hypervisor detected under TCG)",
            possible.trim()
        );
        s.record(
            "OnlineCPUMem{nb_cpus=2, cpu_only=true} where no vCPU can appear: a clear error, no hang (SKIPPED the nproc check: TCG)",
            match g.online_cpu_mem(2, true).await {
                Ok(()) => Err(anyhow::anyhow!(
                    "OnlineCPUMem{{2}} answered OK with 1 possible CPU"
                )),
                Err(e) => Ok(format!("{e:#}")),
            },
        );
        cpu_ok = false;
    }
    let mem_ok = s.record(
        "QMP: 256 MiB DIMM hot-plugged (memory-backend-memfd share=on, pc-dimm)",
        g.vm.hotplug_memory(0, DIMM_MIB).map(|_| "OK"),
    );
    if mem_ok && probe {
        // The DIMM's guest-physical address: above 4 GiB's hole on q35 when
        // memory is below it, QEMU puts hot-plugged DIMMs from the device
        // memory region base; Kata reads it from QEMU too. Ask QMP.
        s.record("MemHotplugByProbe", mem_hotplug_by_probe(g).await);
    } else if mem_ok {
        eprintln!("the guest has no memory probe interface: MemHotplugByProbe not sent (as Kata)");
    }
    s.record(
        "OnlineCPUMem{0, cpu_only=false} onlines the DIMM",
        g.online_cpu_mem(0, false).await.map(|_| "OK"),
    );
    let total_mib = u64::from(BOOT_MIB) + DIMM_MIB;
    s.record(
        "UpdateEphemeralMounts(cache-volume: remount, size=768M, fsgid)",
        g.update_ephemeral_mounts(ephemeral_remount(total_mib))
            .await,
    );
    if app_ok {
        s.record("StartContainer app", g.start(APP).await.map(|_| "OK"));
    }
    s.record(
        "app started: OnlineCPUMem{0, false} + UpdateEphemeralMounts",
        async {
            g.online_cpu_mem(0, false).await?;
            g.update_ephemeral_mounts(ephemeral_remount(total_mib))
                .await
        }
        .await,
    );

    // What the pod sees.
    let mut vcpus_online = 1;
    if cpu_ok {
        s.record(
            "app: nproc is 2 after the vCPU hot-plug",
            async {
                let n = g.sh(APP, "nproc", &["nproc"]).await?;
                let online = g
                    .sh(
                        APP,
                        "cpu-online",
                        &[
                            "sh",
                            "-c",
                            "cd /sys/devices/system/cpu; echo online $(cat online) present $(cat present) possible $(cat possible); ls",
                        ],
                    )
                    .await?;
                anyhow::ensure!(n.trim() == "2", "nproc {n:?}, online {online:?}");
                vcpus_online = 2;
                Ok(format!("nproc 2, online {}", online.trim()))
            }
            .await,
        );
    }
    if mem_ok {
        s.record(
            "app: MemTotal grew by the DIMM",
            async {
                let before = mem_before.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                let after = meminfo_kib(
                    &g.sh(APP, "meminfo-after", &["cat", "/proc/meminfo"])
                        .await?,
                    "MemTotal",
                )?;
                let grew = after.saturating_sub(*before);
                anyhow::ensure!(
                    grew >= (DIMM_MIB * 1024) * 9 / 10,
                    "MemTotal {before} KiB -> {after} KiB: the {DIMM_MIB} MiB DIMM is not online"
                );
                Ok(format!("MemTotal +{} MiB", grew / 1024))
            }
            .await,
        );
    }
    s.record(
        "app: PID 1 is the app's init, the agent is invisible",
        async {
            let cmd = g.sh(APP, "pid1", &["cat", "/proc/1/cmdline"]).await?;
            anyhow::ensure!(
                cmd == "sleep\u{0}1000000\u{0}",
                "/proc/1/cmdline is {cmd:?}"
            );
            let comms = g
                .sh(APP, "comms", &["sh", "-c", "cat /proc/[0-9]*/comm"])
                .await?;
            let comms: Vec<&str> = comms.lines().collect();
            anyhow::ensure!(
                comms.iter().all(|c| ["sleep", "sh", "cat"].contains(c))
                    && comms.iter().filter(|c| **c == "sleep").count() == 1,
                "the container sees other processes: {comms:?}"
            );
            Ok(format!("processes seen: {comms:?}"))
        }
        .await,
    );
    s.record(
        "app: configMap file readable (watchable-bind)",
        async {
            let text = g
                .sh(APP, "configmap", &["cat", "/etc/config/game.properties"])
                .await?;
            anyhow::ensure!(text == CONFIG_CONTENT, "{text:?}");
            Ok("/etc/config/game.properties")
        }
        .await,
    );
    s.record(
        "app: shared /etc/hosts, /etc/hostname, hostname",
        async {
            let text = g.sh(APP, "hosts", &["cat", "/etc/hosts"]).await?;
            anyhow::ensure!(text == hosts, "/etc/hosts is {text:?}");
            let name = g.sh(APP, "hostname", &["hostname"]).await?;
            anyhow::ensure!(name.trim() == HOSTNAME, "hostname {name:?}");
            Ok("as shared")
        }
        .await,
    );
    s.record(
        "app: emptyDir has the fsGroup and the setgid bit, new files inherit the group",
        async {
            let out = g
                .sh(
                    APP,
                    "cache-perm",
                    &[
                        "sh",
                        "-c",
                        "stat -c '%g %a' /cache && touch /cache/f && stat -c %g /cache/f",
                    ],
                )
                .await?;
            let mut lines = out.lines();
            let dir = lines.next().unwrap_or_default();
            let file = lines.next().unwrap_or_default();
            let (gid, mode) = dir.split_once(' ').unwrap_or_default();
            let mode = u32::from_str_radix(mode, 8).unwrap_or(0);
            anyhow::ensure!(
                gid == FS_GROUP.to_string() && mode & 0o2000 != 0 && file == FS_GROUP.to_string(),
                "/cache: {out:?}"
            );
            Ok(format!(
                "/cache gid {gid} mode {mode:o}, new file gid {file}"
            ))
        }
        .await,
    );
    s.record(
        "app: emptyDir resized to the sandbox memory (UpdateEphemeralMounts)",
        async {
            let kib = df_kib(&g.sh(APP, "cache-df", &["df", "-k", "/cache"]).await?)?;
            anyhow::ensure!(
                kib == total_mib * 1024,
                "/cache is {kib} KiB, not {} KiB",
                total_mib * 1024
            );
            Ok(format!("{kib} KiB"))
        }
        .await,
    );
    s.record(
        "app: /dev/shm is the sandbox's shm",
        async {
            let kib = df_kib(&g.sh(APP, "shm-df", &["df", "-k", "/dev/shm"]).await?)?;
            anyhow::ensure!(kib == SHM_BYTES / 1024, "/dev/shm is {kib} KiB");
            Ok(format!("{kib} KiB"))
        }
        .await,
    );
    s.record(
        "app: memory.max and memory.swap.max (Swap = Limit: no swap)",
        async {
            let out = g
                .sh(
                    APP,
                    "swap",
                    &[
                        "sh",
                        "-c",
                        "d=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup); cat $d/memory.max $d/memory.swap.max",
                    ],
                )
                .await?;
            let v: Vec<&str> = out.lines().collect();
            anyhow::ensure!(
                v == [APP_MEMORY.to_string().as_str(), "0"],
                "memory.max, memory.swap.max: {v:?}"
            );
            Ok("268435456, 0")
        }
        .await,
    );
    if have_nic {
        s.record(
            "app: the pod network as UpdateInterface/Routes/ARPNeighbors set it",
            async {
                let out = g
                    .sh(
                        APP,
                        "net",
                        &[
                            "sh",
                            "-c",
                            "ip link show eth0; ip addr show eth0; ip route; ip neigh show dev eth0",
                        ],
                    )
                    .await?;
                for want in [
                    "NOARP",
                    "mtu 1450",
                    "10.88.0.5/16",
                    "default via 169.254.1.1 dev eth0 onlink",
                    "198.51.100.0/24 dev eth0 scope link",
                    "169.254.1.1 lladdr ee:ee:ee:ee:ee:ee",
                    "PERMANENT",
                ] {
                    anyhow::ensure!(
                        out.split_whitespace().collect::<Vec<_>>().join(" ")
                            .contains(&want.split_whitespace().collect::<Vec<_>>().join(" ")),
                        "no `{want}` in:\n{out}"
                    );
                }
                // busybox's ip prints no route metrics: the route MTU (and
                // the onlink flag again) as the agent lists them.
                let listed = rpc(
                    "ListRoutes",
                    g.agent()
                        .list_routes(g.ctx(), &agent::ListRoutesRequest::new())
                        .await,
                )?;
                let mtu = listed
                    .Routes
                    .iter()
                    .find(|r| r.dest == "198.51.100.0/24")
                    .map(|r| r.mtu);
                anyhow::ensure!(
                    mtu == Some(1400),
                    "ListRoutes gives the 198.51.100.0/24 route mtu {mtu:?}, not 1400: {:?}",
                    listed.Routes
                );
                Ok("NOARP, link mtu, address, onlink default, route mtu, neighbour")
            }
            .await,
        );
    }

    // crictl exec -it: a terminal, then the window size.
    s.record(
        "ExecProcess with a terminal + TtyWinResize",
        async {
            let exec_id = "e1c3b0a2-5d4f-4c38-9a61-7f0e2d9b8c11";
            let mut p = process(&[
                "sh",
                "-c",
                "read x; stty size; [ -t 0 ] && [ -t 1 ] && echo on-a-terminal",
            ]);
            p.Terminal = true;
            let mut req = agent::ExecProcessRequest::new();
            req.container_id = APP.into();
            req.exec_id = exec_id.into();
            req.process = MessageField::some(p);
            rpc("ExecProcess", g.agent().exec_process(g.ctx(), &req).await)?;
            let mut rs = agent::TtyWinResizeRequest::new();
            rs.container_id = APP.into();
            rs.exec_id = exec_id.into();
            rs.row = 40;
            rs.column = 120;
            rpc("TtyWinResize", g.agent().tty_win_resize(g.ctx(), &rs).await)?;
            let mut w = agent::WriteStreamRequest::new();
            w.container_id = APP.into();
            w.exec_id = exec_id.into();
            w.data = b"go\n".to_vec();
            rpc("WriteStdin", g.agent().write_stdin(g.ctx(), &w).await)?;
            let out = g.read_all(APP, exec_id, false).await?;
            let st = g.wait(APP, exec_id).await?;
            anyhow::ensure!(
                st == 0 && out.contains("40 120") && out.contains("on-a-terminal"),
                "status {st}, output {out:?}"
            );
            Ok("stty size 40 120, stdin and stdout a terminal")
        }
        .await,
    );
    s.record(
        "StatsContainer app",
        async {
            let mut req = agent::StatsContainerRequest::new();
            req.container_id = APP.into();
            let st = rpc(
                "StatsContainer",
                g.agent().stats_container(g.ctx(), &req).await,
            )?;
            let cg = st
                .cgroup_stats
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("no cgroup stats"))?;
            let limit = cg.memory_stats.usage.limit;
            anyhow::ensure!(
                limit == APP_MEMORY as u64 && cg.pids_stats.current >= 1,
                "memory limit {limit}, pids {}",
                cg.pids_stats.current
            );
            Ok(format!(
                "memory limit {limit}, pids {}, cpu {} ns",
                cg.pids_stats.current, cg.cpu_stats.cpu_usage.total_usage
            ))
        }
        .await,
    );
    s.record(
        "GetMetrics",
        async {
            let m = rpc(
                "GetMetrics",
                g.agent()
                    .get_metrics(g.ctx(), &agent::GetMetricsRequest::new())
                    .await,
            )?
            .metrics;
            anyhow::ensure!(m.lines().count() > 3, "{m:?}");
            Ok(format!("{} lines", m.lines().count()))
        }
        .await,
    );
    s.record(
        "GetOOMEvent pending all along does not hold other calls",
        async {
            anyhow::ensure!(!oom_task.is_finished(), "the watchOOMEvents loop ended");
            let ev = oom_events.lock().unwrap().clone();
            anyhow::ensure!(
                ev.iter().all(|e| !e.starts_with("error")),
                "GetOOMEvent failed: {ev:?}"
            );
            anyhow::ensure!(ev.is_empty(), "OOM events without an OOM: {ev:?}");
            // A call with a deadline, as a shim with a timeout would make.
            let r = g
                .agent()
                .get_oom_event(
                    ttrpc::context::with_timeout(Duration::from_secs(2).as_nanos() as i64),
                    &agent::GetOOMEventRequest::new(),
                )
                .await;
            Ok(format!("a 2 s call answered {r:?}"))
        }
        .await,
    );

    // --- stop the app (container.go:stop, then the shim's delete)
    let bg = "5a0e8c7d-1b2f-4e3a-8c9d-0e1f2a3b4c5d";
    let bg_started = {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = APP.into();
        req.exec_id = bg.into();
        req.process = MessageField::some(process(&["sleep", "100000"]));
        g.agent().exec_process(g.ctx(), &req).await.is_ok()
    };
    s.record(
        "stop app: SignalProcess(SIGKILL, exec_id \"\") + WaitProcess + RemoveContainer + RemoveStaleVirtiofsShareMounts",
        async {
            let st = g.go_stop(APP).await?;
            anyhow::ensure!(st == 137, "the app's init exited {st}, not by SIGKILL");
            Ok(format!("init status {st}"))
        }
        .await,
    );
    if bg_started {
        s.record(
            "stop app: the exec'd process died with the container",
            async {
                let st = tokio::time::timeout(Duration::from_secs(30), g.wait(APP, bg)).await;
                match st {
                    Ok(Ok(st)) => {
                        anyhow::ensure!(st == 137, "status {st}");
                        Ok(format!("status {st}"))
                    }
                    // The container is removed: the agent may have forgotten it.
                    Ok(Err(e)) => Ok(format!("gone with the container ({e:#})")),
                    Err(_) => anyhow::bail!("WaitProcess on the exec hangs"),
                }
            }
            .await,
        );
    }

    // --- a container deleted before it starts (delete.go, force=false)
    g.share_rootfs(NEVER).unwrap();
    let never_ok = s.record(
        "CreateContainer never-started",
        g.create(&create_request(
            NEVER,
            go_spec(NEVER, &["true"], "container", true),
            vec![],
        ))
        .await
        .map(|_| "OK"),
    );
    s.record(
        "never-started: OnlineCPUMem{0,false} + UpdateEphemeralMounts([])",
        async {
            g.online_cpu_mem(0, false).await?;
            g.update_ephemeral_mounts(vec![]).await
        }
        .await,
    );
    if never_ok {
        s.record(
            "delete never-started: SIGKILL all, WaitProcess, RemoveContainer, RemoveStaleVirtiofsShareMounts",
            async {
                // kill and wait errors are ignored for a container that never ran.
                let sig = g.signal(NEVER, "", 9).await;
                let wait = tokio::time::timeout(Duration::from_secs(60), g.wait(NEVER, NEVER)).await;
                let wait = match wait {
                    Ok(r) => format!("{r:?}"),
                    Err(_) => anyhow::bail!(
                        "WaitProcess on a created, never-started container hangs (the Go runtime's stop ctx is 60 s)"
                    ),
                };
                g.remove(NEVER).await?;
                g.remove_stale_virtiofs_share_mounts().await?;
                Ok(format!("signal {sig:?}, wait {wait}"))
            }
            .await,
        );
    }

    // --- StopPodSandbox: the pause container, then DestroySandbox.
    if pause_ok {
        s.record(
            "stop pause",
            g.go_stop(POD).await.map(|st| format!("init status {st}")),
        );
    }
    oom_task.abort();
    s.record(
        "DestroySandbox",
        rpc(
            "DestroySandbox",
            g.agent()
                .destroy_sandbox(long(), &agent::DestroySandboxRequest::new())
                .await,
        )
        .map(|_| "OK"),
    );
    GoOutcome { vcpus_online }
}

fn interface() -> types::Interface {
    let mut ifc = types::Interface::new();
    ifc.device = "eth0".into();
    ifc.name = "eth0".into();
    let mut a = types::IPAddress::new();
    a.address = "10.88.0.5".into();
    a.mask = "16".into();
    ifc.IPAddresses = vec![a];
    ifc.mtu = 1450;
    ifc.hwAddr = NIC_MAC.into();
    ifc.type_ = "veth".into();
    ifc.raw_flags = IFF_NOARP;
    ifc.devicePath = kiln_shim::qemu::root_port_device_path(0);
    ifc
}

async fn plug_nic(g: &Guest) -> anyhow::Result<String> {
    let mut qmp = g.vm.qmp()?;
    qmp.device_add(
        "virtio-net-pci",
        "kiln_nic0",
        Some(&kiln_shim::qemu::root_port_id(0)),
        &[("mac", serde_json::json!(NIC_MAC))],
    )?;
    drop(qmp);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = rpc(
            "ListInterfaces",
            g.agent()
                .list_interfaces(g.ctx(), &agent::ListInterfacesRequest::new())
                .await,
        )?;
        if let Some(i) = list.Interfaces.iter().find(|i| i.hwAddr == NIC_MAC) {
            return Ok(format!("{} {NIC_MAC}", i.name));
        }
        anyhow::ensure!(Instant::now() < deadline, "the NIC never showed: {list:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn update_interface(g: &Guest) -> anyhow::Result<String> {
    let mut req = agent::UpdateInterfaceRequest::new();
    req.interface = MessageField::some(interface());
    let got = rpc(
        "UpdateInterface",
        g.agent().update_interface(g.ctx(), &req).await,
    )?;
    anyhow::ensure!(
        got.name == "eth0"
            && got.mtu == 1450
            && got
                .IPAddresses
                .iter()
                .any(|a| a.address == "10.88.0.5" && a.mask == "16"),
        "{got:?}"
    );
    Ok(format!("eth0 raw_flags {:#x}", got.raw_flags))
}

async fn update_routes(g: &Guest) -> anyhow::Result<String> {
    // Calico's shape: an onlink default gateway, and a link route with an MTU.
    let mut default = types::Route::new();
    default.gateway = "169.254.1.1".into();
    default.device = "eth0".into();
    default.flags = RTNH_F_ONLINK;
    let mut link = types::Route::new();
    link.dest = "198.51.100.0/24".into();
    link.device = "eth0".into();
    link.scope = RT_SCOPE_LINK;
    link.mtu = 1400;
    let mut routes = agent::Routes::new();
    routes.Routes = vec![default, link];
    let mut req = agent::UpdateRoutesRequest::new();
    req.routes = MessageField::some(routes);
    let got = rpc("UpdateRoutes", g.agent().update_routes(g.ctx(), &req).await)?;
    Ok(format!("{} routes", got.Routes.len()))
}

async fn add_arp_neighbors(g: &Guest) -> anyhow::Result<String> {
    let mut n = types::ARPNeighbor::new();
    let mut to = types::IPAddress::new();
    to.address = "169.254.1.1".into();
    n.toIPAddress = MessageField::some(to);
    n.device = "eth0".into();
    n.lladdr = "ee:ee:ee:ee:ee:ee".into();
    n.state = NUD_PERMANENT;
    let mut list = agent::ARPNeighbors::new();
    list.ARPNeighbors = vec![n];
    let mut req = agent::AddARPNeighborsRequest::new();
    req.neighbors = MessageField::some(list);
    match g.agent().add_arp_neighbors(g.ctx(), &req).await {
        Ok(_) => Ok("OK".into()),
        Err(e) if unimplemented(&e) => Ok("UNIMPLEMENTED (ignored by the runtime)".into()),
        Err(e) => Err(anyhow::anyhow!("AddARPNeighbors: {e:?}")),
    }
}

/// MemHotplugByProbe with the DIMM's address, as QEMU reports it.
async fn mem_hotplug_by_probe(g: &Guest) -> anyhow::Result<String> {
    let addr =
        g.vm.qmp()?
            .qom_get("/machine/peripheral/kiln_dimm0", "addr")?
            .as_u64()
            .ok_or_else(|| anyhow::anyhow!("no address for the DIMM"))?;
    let mut req = agent::MemHotplugByProbeRequest::new();
    // kata_agent.go: one address per memory block of the DIMM.
    let mut d = agent::GuestDetailsRequest::new();
    d.mem_block_size = true;
    let block = rpc(
        "GetGuestDetails",
        g.agent().get_guest_details(g.ctx(), &d).await,
    )?
    .mem_block_size_bytes;
    let blocks = (DIMM_MIB << 20) / block.max(1);
    req.memHotplugProbeAddr = (0..blocks).map(|i| addr + i * block).collect();
    rpc(
        "MemHotplugByProbe",
        g.agent().mem_hotplug_by_probe(g.ctx(), &req).await,
    )?;
    Ok(format!("{blocks} blocks from {addr:#x}"))
}

/// runtime-rs's SetPolicy, sent before CreateSandbox (fatal there). An
/// agent without policy support answers UNIMPLEMENTED: accepted, and said.
async fn set_policy(g: &Guest, s: &mut Steps) {
    s.record(
        "runtime-rs: SetPolicy (allow-all) before CreateSandbox",
        async {
            let mut req = agent::SetPolicyRequest::new();
            req.policy = allow_all_policy();
            match g.agent().set_policy(g.ctx(), &req).await {
                Ok(_) => Ok("OK".to_string()),
                Err(e) if unimplemented(&e) => {
                    Ok("UNIMPLEMENTED (no policy support in this agent yet)".to_string())
                }
                Err(e) => Err(anyhow::anyhow!("SetPolicy: {e:?}")),
            }
        }
        .await,
    );
}

/// runtime-rs's containers: the pid namespace stripped (amend_spec), the
/// cgroup namespace kept, OnlineCPUMem{current total, cpu_only=false} on
/// every container add, stop without RemoveStaleVirtiofsShareMounts, and no
/// DestroySandbox.
async fn rs_replay_containers(g: &Guest, s: &mut Steps, vcpus: u32) {
    s.record(
        "runtime-rs: GetGuestDetails",
        async {
            let mut req = agent::GuestDetailsRequest::new();
            req.mem_block_size = true;
            req.mem_hotplug_probe = true;
            rpc(
                "GetGuestDetails",
                g.agent().get_guest_details(g.ctx(), &req).await,
            )?;
            Ok("OK")
        }
        .await,
    );
    g.share_rootfs(RS_POD).unwrap();
    g.share_rootfs(RS_APP).unwrap();
    let mut ok = true;
    for (cid, args) in [
        (RS_POD, &["sleep", "2147483647"][..]),
        (RS_APP, &["sleep", "1000000"][..]),
    ] {
        let ctype = if cid == RS_POD {
            "sandbox"
        } else {
            "container"
        };
        let created = s.record(
            &format!("runtime-rs: CreateContainer {}", short(cid)),
            g.create(&create_request(
                cid,
                go_spec(cid, args, ctype, false),
                vec![],
            ))
            .await
            .map(|_| "OK"),
        );
        s.record(
            &format!("runtime-rs: OnlineCPUMem{{nb_cpus={vcpus} (current total), cpu_only=false}}"),
            g.online_cpu_mem(vcpus, false).await.map(|_| "OK"),
        );
        if created {
            s.record(
                &format!("runtime-rs: StartContainer {}", short(cid)),
                g.start(cid).await.map(|_| "OK"),
            );
        }
        ok &= created;
    }
    if ok {
        s.record(
            "runtime-rs: app's PID 1, its own cgroup at /sys/fs/cgroup",
            async {
                let out = g
                    .sh(
                        RS_APP,
                        "rs-check",
                        &[
                            "sh",
                            "-c",
                            "cat /proc/1/cmdline; echo; cat /proc/self/cgroup",
                        ],
                    )
                    .await?;
                anyhow::ensure!(
                    out.starts_with("sleep\u{0}1000000\u{0}\n") && out.contains("0::/\n"),
                    "{out:?}"
                );
                Ok("PID 1 sleep, cgroup ns /")
            }
            .await,
        );
    }
    for cid in [RS_APP, RS_POD] {
        s.record(
            &format!(
                "runtime-rs: stop {} (SignalProcess SIGKILL, WaitProcess, RemoveContainer)",
                short(cid)
            ),
            async {
                g.signal(cid, "", 9)
                    .await
                    .map_err(|e| anyhow::anyhow!("SignalProcess: {e:?}"))?;
                let st = g.wait(cid, "").await?;
                g.remove(cid).await?;
                Ok(format!("status {st}"))
            }
            .await,
        );
    }
}

/// A policy allowing every request, in the shape Kata's agent policies
/// have (package agent_policy, one `default <Request> := true` rule each).
fn allow_all_policy() -> String {
    let requests = [
        "AddARPNeighborsRequest",
        "AddSwapRequest",
        "CloseStdinRequest",
        "CopyFileRequest",
        "CreateContainerRequest",
        "CreateSandboxRequest",
        "DestroySandboxRequest",
        "ExecProcessRequest",
        "GetDiagnosticDataRequest",
        "GetMetricsRequest",
        "GetOOMEventRequest",
        "GuestDetailsRequest",
        "ListInterfacesRequest",
        "ListRoutesRequest",
        "MemHotplugByProbeRequest",
        "OnlineCPUMemRequest",
        "PauseContainerRequest",
        "ReadStreamRequest",
        "RemoveContainerRequest",
        "RemoveStaleVirtiofsShareMountsRequest",
        "ReseedRandomDevRequest",
        "ResumeContainerRequest",
        "SetGuestDateTimeRequest",
        "SetPolicyRequest",
        "SignalProcessRequest",
        "StartContainerRequest",
        "StatsContainerRequest",
        "TtyWinResizeRequest",
        "UpdateContainerRequest",
        "UpdateEphemeralMountsRequest",
        "UpdateInterfaceRequest",
        "UpdateRoutesRequest",
        "WaitProcessRequest",
        "WriteStreamRequest",
    ];
    let mut p = String::from("package agent_policy\n\n");
    for r in requests {
        p.push_str(&format!("default {r} := true\n"));
    }
    p
}

#[test]
fn helpers_parse_what_busybox_prints() {
    assert_eq!(
        meminfo_kib("MemTotal:         494152 kB\nMemFree: 1 kB\n", "MemTotal").unwrap(),
        494152
    );
    assert!(meminfo_kib("MemFree: 1 kB\n", "MemTotal").is_err());
    let df = "Filesystem           1K-blocks      Used Available Use% Mounted on\ntmpfs                   786432         0    786432   0% /cache\n";
    assert_eq!(df_kib(df).unwrap(), 786432);
    assert!(allow_all_policy().contains("default SetPolicyRequest := true\n"));
    let _ = Path::new(SHARED);
}
