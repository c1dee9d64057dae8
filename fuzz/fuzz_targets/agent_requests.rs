//! The agent's requests: the first byte picks an RPC (see `kiln_fuzz::Rpc`),
//! the rest is decoded as that RPC's protobuf request. Decoding must not
//! panic, and neither may the handler run on the decoded request.
//!
//! Handlers run against a test environment: an empty sandbox whose guest
//! root, run directory and cgroup root are one temporary directory. Those that
//! would change the host (mounting storages, loading kernel modules, starting
//! container processes, setting the clock, editing network interfaces) run
//! only up to what they validate first — the checks between a request and the
//! system: ids, spec conversion, storage and CopyFile path confinement, PCI
//! paths, device options, the `PCIDEVICE_*` env rewrite, addresses.
//!
//! Request paths under the guest's `/run/kata-containers` (what Kata sends)
//! are mapped onto the test run directory, so seeds and mutations reach the
//! code behind the confinement check.

#![no_main]

use std::path::{Component, Path};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kiln_agent::config::AgentConfig;
use kiln_agent::container::spec::{parse_mount_options, ContainerSpec, ProcessSpec, Resources};
use kiln_agent::guest::GuestFs;
use kiln_agent::pci::PciPath;
use kiln_agent::rpc::{AgentService, AgentState, HealthService};
use kiln_agent::sandbox::{AgentPaths, Sandbox};
use kiln_agent::storage::{StorageEnv, Storages};
use kiln_agent::{devices, network, paths, reaper};
use kiln_fuzz::Rpc;
use kiln_protocol::agent_ttrpc::AgentService as _;
use kiln_protocol::health_ttrpc::Health as _;
use kiln_protocol::{agent, health, kiln, oci};
use libfuzzer_sys::fuzz_target;
use protobuf::Message;
use ttrpc::r#async::TtrpcContext;

struct Env {
    /// Guest root, run directory and cgroup root, under `$TMPDIR` (statics
    /// are never dropped: `cargo xtask fuzz` points TMPDIR at a directory it
    /// removes afterwards).
    _root: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    svc: AgentService,
}

impl Env {
    fn new() -> Env {
        let root = tempfile::tempdir().expect("temporary directory");
        let guest = GuestFs::new(root.path());
        let sandbox = Sandbox::new(
            AgentConfig::default(),
            guest.clone(),
            AgentPaths {
                run_dir: root.path().join("run"),
                cgroup_root: root.path().join("cgroup"),
                no_pivot: true,
            },
            reaper::Reaper::default(),
            false,
        );
        let svc = AgentService {
            state: Arc::new(AgentState {
                config: AgentConfig::default(),
                guest,
                init_daemon: false,
                sandbox,
            }),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        Env {
            _root: root,
            rt,
            svc,
        }
    }

    fn run_dir(&self) -> &Path {
        &self.svc.state.sandbox.paths.run_dir
    }

    fn guest(&self) -> &GuestFs {
        &self.svc.state.guest
    }
}

/// The guest's run directory, as requests name it.
const GUEST_RUN_DIR: &str = "/run/kata-containers";

/// `p` with a leading `/run/kata-containers` replaced by the test run directory.
fn in_run_dir(env: &Env, p: &str) -> String {
    match p.strip_prefix(GUEST_RUN_DIR) {
        Some(rest) => format!("{}{rest}", env.run_dir().display()),
        None => p.to_string(),
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(Env::new)
}

fn decode<M: Message>(body: &[u8]) -> Option<M> {
    M::parse_from_bytes(body).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let env = env();
    env.rt.block_on(handle(env, Rpc::from_byte(sel), body));
});

async fn handle(env: &Env, rpc: Rpc, body: &[u8]) {
    let ctx = TtrpcContext::default();
    let svc = &env.svc;
    // Results are errors or values; only a panic is a finding.
    match rpc {
        Rpc::HealthCheck | Rpc::HealthVersion => {
            let Some(req) = decode::<health::CheckRequest>(body) else {
                return;
            };
            let _ = if rpc == Rpc::HealthCheck {
                HealthService.check(&ctx, req).await.map(|_| ())
            } else {
                HealthService.version(&ctx, req).await.map(|_| ())
            };
        }
        Rpc::GetGuestDetails => {
            if let Some(req) = decode::<agent::GuestDetailsRequest>(body) {
                let _ = svc.get_guest_details(&ctx, req).await;
            }
        }
        Rpc::CreateSandbox => {
            let Some(req) = decode::<agent::CreateSandboxRequest>(body) else {
                return;
            };
            for s in &req.storages {
                storage(env, s).await;
            }
            // Modules would run modprobe and storages mount: check those
            // above, run the rest (ids, hostname, dns) for real, then undo.
            let mut rest = req.clone();
            rest.kernel_modules.clear();
            rest.storages.clear();
            if svc.create_sandbox(&ctx, rest).await.is_ok() {
                let _ = svc
                    .destroy_sandbox(&ctx, agent::DestroySandboxRequest::new())
                    .await;
            }
        }
        Rpc::DestroySandbox => {
            if let Some(req) = decode::<agent::DestroySandboxRequest>(body) {
                let _ = svc.destroy_sandbox(&ctx, req).await;
            }
        }
        Rpc::CreateContainer => {
            let Some(req) = decode::<agent::CreateContainerRequest>(body) else {
                return;
            };
            if let Some(spec) = req.OCI.as_ref() {
                let _ = ContainerSpec::from_oci(spec);
                let mut spec = spec.clone();
                // An empty guest tree: valid devices time out at once.
                let _ = devices::setup(env.guest(), Duration::ZERO, &req.devices, &mut spec).await;
                if let Some(p) = req.OCI.Process.as_ref() {
                    pci_env(&req.devices, p);
                }
            }
            for s in &req.storages {
                storage(env, s).await;
            }
            // No sandbox exists (CreateSandbox above always destroys it),
            // so the handler validates and stops before starting anything.
            let _ = svc.create_container(&ctx, req).await;
        }
        Rpc::StartContainer => {
            if let Some(req) = decode(body) {
                let _ = svc.start_container(&ctx, req).await;
            }
        }
        Rpc::RemoveContainer => {
            if let Some(req) = decode(body) {
                let _ = svc.remove_container(&ctx, req).await;
            }
        }
        Rpc::ExecProcess => {
            let Some(req) = decode::<agent::ExecProcessRequest>(body) else {
                return;
            };
            if let Some(p) = req.process.as_ref() {
                let _ = ProcessSpec::from_oci(p);
                pci_env(&[], p);
            }
            let _ = svc.exec_process(&ctx, req).await;
        }
        Rpc::SignalProcess => {
            if let Some(req) = decode(body) {
                let _ = svc.signal_process(&ctx, req).await;
            }
        }
        Rpc::WaitProcess => {
            if let Some(req) = decode(body) {
                let _ = svc.wait_process(&ctx, req).await;
            }
        }
        Rpc::ReadStdout | Rpc::ReadStderr => {
            let Some(req) = decode::<agent::ReadStreamRequest>(body) else {
                return;
            };
            let _ = if rpc == Rpc::ReadStdout {
                svc.read_stdout(&ctx, req).await
            } else {
                svc.read_stderr(&ctx, req).await
            };
        }
        Rpc::WriteStdin => {
            if let Some(req) = decode(body) {
                let _ = svc.write_stdin(&ctx, req).await;
            }
        }
        Rpc::CloseStdin => {
            if let Some(req) = decode(body) {
                let _ = svc.close_stdin(&ctx, req).await;
            }
        }
        Rpc::TtyWinResize => {
            if let Some(req) = decode(body) {
                let _ = svc.tty_win_resize(&ctx, req).await;
            }
        }
        Rpc::UpdateContainer => {
            let Some(req) = decode::<agent::UpdateContainerRequest>(body) else {
                return;
            };
            if let Some(r) = req.resources.as_ref() {
                let _ = Resources::from_oci(r);
            }
            let _ = svc.update_container(&ctx, req).await;
        }
        Rpc::StatsContainer => {
            if let Some(req) = decode(body) {
                let _ = svc.stats_container(&ctx, req).await;
            }
        }
        Rpc::PauseContainer => {
            if let Some(req) = decode(body) {
                let _ = svc.pause_container(&ctx, req).await;
            }
        }
        Rpc::ResumeContainer => {
            if let Some(req) = decode(body) {
                let _ = svc.resume_container(&ctx, req).await;
            }
        }
        Rpc::GetOomEvent => {
            // The handler waits for the next OOM: decoding is all there is.
            let _ = decode::<agent::GetOOMEventRequest>(body);
        }
        Rpc::CopyFile => {
            let Some(mut req) = decode::<agent::CopyFileRequest>(body) else {
                return;
            };
            req.path = in_run_dir(env, &req.path);
            // The handler writes for real, so prove the confinement first.
            if let Ok(p) = paths::confined("CopyFile path", env.run_dir(), &req.path) {
                assert_inside(env.run_dir(), &p);
                let _ = svc.copy_file(&ctx, req).await;
            }
        }
        Rpc::SetGuestDateTime => {
            // Validation only: the handler would set the host's clock.
            if let Some(req) = decode::<agent::SetGuestDateTimeRequest>(body) {
                let _ = kiln_agent::rpc::guest_timespec(req.Sec, req.Usec);
            }
        }
        Rpc::OnlineCpuMem => {
            let Some(req) = decode::<agent::OnlineCPUMemRequest>(body) else {
                return;
            };
            // More CPUs than the fake tree has would retry for 2.5 s.
            if req.nb_cpus == 0 {
                let _ = svc.online_cpu_mem(&ctx, req).await;
            }
        }
        Rpc::MemHotplugByProbe => {
            if let Some(req) = decode(body) {
                let _ = svc.mem_hotplug_by_probe(&ctx, req).await;
            }
        }
        Rpc::GetMetrics => {
            if let Some(req) = decode(body) {
                let _ = svc.get_metrics(&ctx, req).await;
            }
        }
        Rpc::GetVolumeStats => {
            // statvfs only: reads, never writes.
            if let Some(req) = decode(body) {
                let _ = svc.get_volume_stats(&ctx, req).await;
            }
        }
        Rpc::UpdateInterface => {
            let Some(req) = decode::<agent::UpdateInterfaceRequest>(body) else {
                return;
            };
            // The handler changes the host's links: run its parsers only.
            if let Some(i) = req.interface.as_ref() {
                if let Ok(mac) = network::parse_mac(&i.hwAddr) {
                    // Accepted only as six pairs of hex digits.
                    assert!(
                        network::format_mac(&mac).eq_ignore_ascii_case(&i.hwAddr),
                        "{:?} accepted as a MAC",
                        i.hwAddr
                    );
                }
                for a in &i.IPAddresses {
                    if let Ok(ip) = a.address.parse() {
                        let _ = network::parse_mask(&a.mask, &ip);
                    }
                }
            }
        }
        Rpc::UpdateRoutes => {
            let Some(req) = decode::<agent::UpdateRoutesRequest>(body) else {
                return;
            };
            for r in req
                .routes
                .as_ref()
                .map(|r| r.Routes.as_slice())
                .unwrap_or(&[])
            {
                let _ = network::parse_cidr(&r.dest);
            }
        }
        Rpc::ListInterfaces => {
            let _ = decode::<agent::ListInterfacesRequest>(body);
        }
        Rpc::ListRoutes => {
            let _ = decode::<agent::ListRoutesRequest>(body);
        }
        Rpc::AddArpNeighbors => {
            let Some(req) = decode::<agent::AddARPNeighborsRequest>(body) else {
                return;
            };
            let list = req.neighbors.as_ref().map(|n| n.ARPNeighbors.as_slice());
            for n in list.unwrap_or(&[]) {
                let _ = network::parse_mac(&n.lladdr);
            }
        }
        Rpc::GuestFacts => {
            if let Some(req) = decode::<kiln::GuestFactsRequest>(body) {
                let _ = kiln_agent::facts::collect(env.guest(), &req);
            }
        }
        Rpc::KernelCmdline => {
            let (cfg, _warnings) = AgentConfig::from_cmdline(&String::from_utf8_lossy(body));
            assert!(cfg.hotplug_timeout <= Duration::from_secs(3600));
        }
    }
}

/// A storage's checks: mount point confinement, options, PCI path. Only the
/// `local` driver (a directory in the run directory) is set up for real.
async fn storage(env: &Env, s: &agent::Storage) {
    let mut s = s.clone();
    s.mount_point = in_run_dir(env, &s.mount_point);
    let Ok(mount_point) = paths::confined("Storage.mount_point", env.run_dir(), &s.mount_point)
    else {
        return;
    };
    assert_inside(env.run_dir(), &mount_point);
    let _ = parse_mount_options(&s.options);
    if let Ok(p) = s.source.parse::<PciPath>() {
        // Only hex slots, `.` functions, `/` and a root bus's `:`; printed,
        // it parses the same.
        assert!(
            s.source
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b'/' || c == b'.' || c == b':'),
            "{:?} accepted as a PCI path",
            s.source
        );
        assert_eq!(p.to_string().parse::<PciPath>().ok(), Some(p));
    }
    if s.driver == "local" {
        let senv = StorageEnv {
            run_dir: env.run_dir(),
            guest: env.guest(),
            hotplug_timeout: Duration::ZERO,
        };
        let mut storages = Storages::default();
        if let Ok(p) = storages.add(&senv, &s).await {
            storages.release(&p);
        }
    }
}

/// The `PCIDEVICE_*` rewrite with a map from the devices' host addresses.
fn pci_env(devs: &[agent::Device], p: &oci::Process) {
    let mut map = devices::PciMap::new();
    for (i, o) in devs.iter().flat_map(|d| &d.options).enumerate() {
        if let Some(host) = o.split_once('=').and_then(|(h, _)| devices::parse_bdf(h)) {
            map.insert(host, format!("0000:00:{:02x}.0", i % 32));
        }
    }
    for e in &p.Env {
        if let Some(b) = e.split_once('=').and_then(|(_, v)| devices::parse_bdf(v)) {
            map.entry(b).or_insert_with(|| "0000:00:1f.7".to_string());
        }
    }
    let mut env = p.Env.clone();
    devices::rewrite_pci_env(&mut env, &map);
    assert_eq!(env.len(), p.Env.len());
}

/// A confined path must be the base or below it, with no `..` on the way.
fn assert_inside(base: &Path, p: &Path) {
    assert!(
        p.starts_with(base),
        "{} escapes {}",
        p.display(),
        base.display()
    );
    assert!(
        !p.components().any(|c| c == Component::ParentDir),
        "{} has a .. component",
        p.display()
    );
}
