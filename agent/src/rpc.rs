//! The ttrpc services: `grpc.Health` and `grpc.AgentService`.
//!
//! Every AgentService method is implemented; each handler asks the agent
//! policy first (`policy.rs`), as Kata's agent does.

use std::sync::Arc;
use std::time::Duration;

use kiln_protocol::{agent, csi, health, types};
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::r#async::TtrpcContext;

use crate::config::AgentConfig;
use crate::error::{invalid, os, precondition, Result};
use crate::guest::GuestFs;
use crate::sandbox::Sandbox;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by all RPC handlers.
pub struct AgentState {
    pub config: AgentConfig,
    pub guest: GuestFs,
    pub init_daemon: bool,
    pub sandbox: Sandbox,
}

/// Logs a failed RPC and turns the result into what ttrpc sends.
fn reply<T>(method: &str, r: Result<T>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        tracing::warn!(rpc = method, code = ?e.kind, "{}", e.message);
        e.into()
    })
}

pub fn unimplemented_status(method: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::UNIMPLEMENTED,
        format!("/grpc.AgentService/{method} is not implemented by kiln-agent {AGENT_VERSION}"),
    ))
}

pub struct HealthService;

#[async_trait::async_trait]
impl kiln_protocol::health_ttrpc::Health for HealthService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut resp = health::HealthCheckResponse::new();
        resp.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        let mut resp = health::VersionCheckResponse::new();
        resp.agent_version = AGENT_VERSION.to_string();
        // The ttrpc protocol revision Kata's runtime compares against.
        resp.grpc_version = "0.0.1".to_string();
        Ok(resp)
    }
}

pub struct AgentService {
    pub state: Arc<AgentState>,
}

impl AgentService {
    fn sb(&self) -> &Sandbox {
        &self.state.sandbox
    }

    pub fn guest_details(&self, req: &agent::GuestDetailsRequest) -> agent::GuestDetailsResponse {
        let g = &self.state.guest;
        let mut details = agent::AgentDetails::new();
        details.version = AGENT_VERSION.to_string();
        details.init_daemon = self.state.init_daemon;
        details.supports_seccomp = crate::container::seccomp::kernel_supports_filters();
        details.storage_handlers = crate::storage::DRIVERS
            .iter()
            .map(|d| d.to_string())
            .collect();
        let mut resp = agent::GuestDetailsResponse::new();
        if req.mem_block_size {
            resp.mem_block_size_bytes = g.mem_block_size();
        }
        if req.mem_hotplug_probe {
            resp.support_mem_hotplug_probe = g.mem_hotplug_probe();
        }
        resp.agent_details = MessageField::some(details);
        resp
    }
}

#[async_trait::async_trait]
impl kiln_protocol::agent_ttrpc::AgentService for AgentService {
    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        req: agent::GuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        crate::policy::check(&req)?;
        Ok(self.guest_details(&req))
    }

    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "CreateSandbox",
            self.sb().create_sandbox(&req).await.map(|_| Empty::new()),
        )
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&_req)?;
        reply(
            "DestroySandbox",
            self.sb().destroy_sandbox().await.map(|_| Empty::new()),
        )
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "CreateContainer",
            self.sb().create_container(&req).await.map(|_| Empty::new()),
        )
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "StartContainer",
            self.sb()
                .start_container(&req.container_id)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "RemoveContainer",
            self.sb()
                .remove_container(&req.container_id, req.timeout)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "ExecProcess",
            self.sb().exec_process(&req).await.map(|_| Empty::new()),
        )
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "SignalProcess",
            self.sb().signal_process(&req).map(|_| Empty::new()),
        )
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        crate::policy::check(&req)?;
        reply(
            "WaitProcess",
            self.sb().wait_process(&req).await.map(|status| {
                let mut r = agent::WaitProcessResponse::new();
                r.status = status;
                r
            }),
        )
    }

    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let resp = reply(
            "ReadStdout",
            self.sb().read_stream(&req, false).await.map(read_response),
        );
        crate::policy::redact_read(&req, resp)
    }

    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadStreamRequest,
    ) -> ttrpc::Result<agent::ReadStreamResponse> {
        let resp = reply(
            "ReadStderr",
            self.sb().read_stream(&req, true).await.map(read_response),
        );
        crate::policy::redact_read(&req, resp)
    }

    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WriteStreamRequest,
    ) -> ttrpc::Result<agent::WriteStreamResponse> {
        crate::policy::check(&req)?;
        reply(
            "WriteStdin",
            self.sb().write_stdin(&req).await.map(|len| {
                let mut r = agent::WriteStreamResponse::new();
                r.len = len;
                r
            }),
        )
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "CloseStdin",
            self.sb().close_stdin(&req).await.map(|_| Empty::new()),
        )
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: agent::TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "TtyWinResize",
            self.sb().tty_win_resize(&req).map(|_| Empty::new()),
        )
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "UpdateContainer",
            self.sb().update_container(&req).map(|_| Empty::new()),
        )
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        crate::policy::check(&req)?;
        reply(
            "StatsContainer",
            self.sb().stats_container(&req.container_id),
        )
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "PauseContainer",
            self.sb()
                .set_paused(&req.container_id, true)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "ResumeContainer",
            self.sb()
                .set_paused(&req.container_id, false)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetOOMEventRequest,
    ) -> ttrpc::Result<agent::OOMEvent> {
        crate::policy::check(&_req)?;
        reply(
            "GetOOMEvent",
            self.sb().next_oom_event().await.map(|id| {
                let mut e = agent::OOMEvent::new();
                e.container_id = id;
                e
            }),
        )
    }

    async fn copy_file(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CopyFileRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check_copy_file(&req)?;
        let run_dir = self.sb().run_dir().to_path_buf();
        let r = tokio::task::spawn_blocking(move || crate::copy_file::copy_file(&run_dir, &req))
            .await
            .unwrap_or_else(|e| Err(crate::error::internal(format!("CopyFile task failed: {e}"))));
        reply("CopyFile", r.map(|_| Empty::new()))
    }

    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "SetGuestDateTime",
            set_guest_time(req.Sec, req.Usec).map(|_| Empty::new()),
        )
    }

    async fn online_cpu_mem(
        &self,
        _ctx: &TtrpcContext,
        req: agent::OnlineCPUMemRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "OnlineCPUMem",
            online_cpu_mem(&self.state.guest, &req)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn mem_hotplug_by_probe(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MemHotplugByProbeRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "MemHotplugByProbe",
            mem_hotplug_by_probe(&self.state.guest, &req.memHotplugProbeAddr).map(|_| Empty::new()),
        )
    }

    async fn get_metrics(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetMetricsRequest,
    ) -> ttrpc::Result<agent::Metrics> {
        crate::policy::check(&_req)?;
        let counts = crate::metrics::AgentCounts {
            containers: self.sb().container_count(),
            processes: self.sb().process_count(),
        };
        let mut m = agent::Metrics::new();
        m.metrics = crate::metrics::render(
            &self.state.guest,
            std::path::Path::new("/proc/self"),
            &counts,
        );
        Ok(m)
    }

    async fn get_volume_stats(
        &self,
        _ctx: &TtrpcContext,
        req: agent::VolumeStatsRequest,
    ) -> ttrpc::Result<csi::VolumeStatsResponse> {
        crate::policy::check(&req)?;
        reply("GetVolumeStats", volume_stats(&req.volume_guest_path))
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        crate::policy::check(&req)?;
        reply(
            "UpdateInterface",
            crate::network::update_interface(req.interface.as_ref()).await,
        )
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        crate::policy::check(&req)?;
        reply(
            "UpdateRoutes",
            crate::network::update_routes(req.routes.as_ref()).await,
        )
    }

    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListInterfacesRequest,
    ) -> ttrpc::Result<agent::Interfaces> {
        crate::policy::check(&_req)?;
        reply("ListInterfaces", crate::network::list_interfaces().await)
    }

    async fn list_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        crate::policy::check(&_req)?;
        reply("ListRoutes", crate::network::list_routes().await)
    }

    async fn add_arp_neighbors(
        &self,
        _ctx: &TtrpcContext,
        req: agent::AddARPNeighborsRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "AddARPNeighbors",
            crate::network::add_arp_neighbors(req.neighbors.as_ref())
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn update_ephemeral_mounts(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateEphemeralMountsRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "UpdateEphemeralMounts",
            self.sb()
                .update_ephemeral_mounts(&req.storages)
                .await
                .map(|_| Empty::new()),
        )
    }

    async fn remove_stale_virtiofs_share_mounts(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveStaleVirtiofsShareMountsRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        let shared = self.sb().run_dir().join("shared");
        reply(
            "RemoveStaleVirtiofsShareMounts",
            touch_share_mounts(&shared).map(|_| Empty::new()),
        )
    }

    async fn get_diagnostic_data(
        &self,
        _ctx: &TtrpcContext,
        req: agent::GetDiagnosticDataRequest,
    ) -> ttrpc::Result<agent::GetDiagnosticDataResponse> {
        crate::policy::check(&req)?;
        reply(
            "GetDiagnosticData",
            self.sb().diagnostic_data(&req).await.map(|data| {
                let mut r = agent::GetDiagnosticDataResponse::new();
                r.data = data;
                r
            }),
        )
    }

    async fn get_ip_tables(
        &self,
        _ctx: &TtrpcContext,
        req: agent::GetIPTablesRequest,
    ) -> ttrpc::Result<agent::GetIPTablesResponse> {
        crate::policy::check(&req)?;
        reply(
            "GetIPTables",
            crate::iptables::get(&self.state.guest, &self.sb().reaper, req.is_ipv6)
                .await
                .map(|data| {
                    let mut r = agent::GetIPTablesResponse::new();
                    r.data = data;
                    r
                }),
        )
    }

    async fn set_ip_tables(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetIPTablesRequest,
    ) -> ttrpc::Result<agent::SetIPTablesResponse> {
        crate::policy::check(&req)?;
        reply(
            "SetIPTables",
            crate::iptables::set(&self.state.guest, &self.sb().reaper, req.is_ipv6, &req.data)
                .await
                .map(|data| {
                    let mut r = agent::SetIPTablesResponse::new();
                    r.data = data;
                    r
                }),
        )
    }

    async fn mem_agent_memcg_set(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MemAgentMemcgConfig,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "MemAgentMemcgSet",
            self.sb().mem_agent().set_memcg(&req).map(|_| Empty::new()),
        )
    }

    async fn mem_agent_compact_set(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MemAgentCompactConfig,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "MemAgentCompactSet",
            self.sb()
                .mem_agent()
                .set_compact(&req)
                .map(|_| Empty::new()),
        )
    }

    async fn reseed_random_dev(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReseedRandomDevRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        let dev = self.state.guest.path("/dev/random");
        reply(
            "ReseedRandomDev",
            crate::random::reseed(&dev, &req.data).map(|_| Empty::new()),
        )
    }

    async fn add_swap(
        &self,
        _ctx: &TtrpcContext,
        req: agent::AddSwapRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "AddSwap",
            crate::swap::add_disk(
                &self.state.guest,
                self.state.config.hotplug_timeout,
                &req.PCIPath,
            )
            .await
            .map(|_| Empty::new()),
        )
    }

    async fn add_swap_path(
        &self,
        _ctx: &TtrpcContext,
        req: agent::AddSwapPathRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        reply(
            "AddSwapPath",
            crate::swap::add_path(&req.path).map(|_| Empty::new()),
        )
    }

    async fn resize_volume(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ResizeVolumeRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::check(&req)?;
        let (path, size) = (req.volume_guest_path.clone(), req.size);
        let r = tokio::task::spawn_blocking(move || crate::volume::resize(&path, size))
            .await
            .unwrap_or_else(|e| Err(crate::error::internal(format!("resize task: {e}"))));
        reply("ResizeVolume", r.map(|_| Empty::new()))
    }

    async fn set_policy(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetPolicyRequest,
    ) -> ttrpc::Result<Empty> {
        crate::policy::set_policy(&req).map(|_| Empty::new())
    }
}

/// RemoveStaleVirtiofsShareMounts: stats every mount under the shared
/// directory, so virtiofsd drops its cached inodes of files the host removed
/// (what Kata's agent does; the Go runtime sends it on every container stop
/// and fails a non-forced stop on any error, so nothing here fails but an
/// unreadable mount table).
fn touch_share_mounts(shared: &std::path::Path) -> Result<usize> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| os("reading /proc/self/mountinfo", e))?;
    let mut n = 0;
    for line in mountinfo.lines() {
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let mp = std::path::Path::new(mp);
        if mp.starts_with(shared) {
            if let Err(e) = std::fs::metadata(mp) {
                tracing::info!(mount = %mp.display(), "stale share mount: {e}");
            }
            n += 1;
        }
    }
    Ok(n)
}

fn read_response(data: Vec<u8>) -> agent::ReadStreamResponse {
    let mut r = agent::ReadStreamResponse::new();
    r.data = data;
    r
}

/// Checks a wall-clock time from SetGuestDateTime.
pub fn guest_timespec(sec: i64, usec: i64) -> Result<libc::timespec> {
    if sec < 0 || !(0..1_000_000).contains(&usec) {
        return Err(invalid(format!(
            "date/time {sec} s {usec} µs is not a valid time (seconds >= 0, 0 <= µs < 1e6)"
        )));
    }
    Ok(libc::timespec {
        tv_sec: sec as _,
        tv_nsec: (usec * 1000) as _,
    })
}

fn set_guest_time(sec: i64, usec: i64) -> Result<()> {
    let ts = guest_timespec(sec, usec)?;
    // SAFETY: clock_settime reads the timespec we pass.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(os(
            "setting the guest clock",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// How long OnlineCPUMem waits for hot-plugged vCPUs to appear (Kata's
/// agent: 100 tries, 50 ms apart).
const ONLINE_TRIES: u32 = 100;
const ONLINE_PAUSE: Duration = Duration::from_millis(50);

/// `nb_cpus` is the total number of vCPUs the runtime expects online after
/// a hot-plug (0: no CPU work), not a number to add: the agent onlines offline
/// CPUs until that many are online, as Kata's agent does.
async fn online_cpu_mem(guest: &GuestFs, req: &agent::OnlineCPUMemRequest) -> Result<()> {
    if req.nb_cpus > 0 {
        let want = req.nb_cpus;
        let mut online = guest.online_cpu_count();
        let mut tries = 0;
        while online < want {
            if tries == ONLINE_TRIES {
                return Err(precondition(format!(
                    "{online} vCPUs are online and the runtime expects {want}: the hot-plugged \
                     vCPUs did not appear within {} ms (is CONFIG_HOTPLUG_CPU in the guest \
                     kernel, and did the VMM add them?)",
                    ONLINE_TRIES * ONLINE_PAUSE.as_millis() as u32
                )));
            }
            if tries > 0 {
                tokio::time::sleep(ONLINE_PAUSE).await;
            }
            guest.online_cpus().map_err(|e| os("onlining CPUs", e))?;
            online = guest.online_cpu_count();
            tries += 1;
        }
        tracing::info!(online, want, "vCPUs online");
    }
    if !req.cpu_only {
        guest
            .online_memory()
            .map_err(|e| os("onlining memory blocks", e))?;
    }
    Ok(())
}

fn mem_hotplug_by_probe(guest: &GuestFs, addrs: &[u64]) -> Result<()> {
    if addrs.len() > 4096 {
        return Err(invalid("too many memory probe addresses"));
    }
    let probe = guest.path("/sys/devices/system/memory/probe");
    for a in addrs {
        std::fs::write(&probe, format!("{a:#X}"))
            .map_err(|e| os(format!("writing {a:#X} to {}", probe.display()), e))?;
    }
    Ok(())
}

fn volume_stats(path: &str) -> Result<csi::VolumeStatsResponse> {
    let p = crate::container::spec::abs_path("volume_guest_path", path)?;
    let st = nix::sys::statvfs::statvfs(&p)
        .map_err(|e| crate::error::not_found(format!("statvfs {}: {e}", p.display())))?;
    let frag = st.fragment_size() as u64;
    let mut bytes = csi::VolumeUsage::new();
    bytes.unit = csi::volume_usage::Unit::BYTES.into();
    bytes.total = st.blocks() as u64 * frag;
    bytes.available = st.blocks_available() as u64 * frag;
    bytes.used = (st.blocks() as u64).saturating_sub(st.blocks_free() as u64) * frag;
    let mut inodes = csi::VolumeUsage::new();
    inodes.unit = csi::volume_usage::Unit::INODES.into();
    inodes.total = st.files() as u64;
    inodes.available = st.files_available() as u64;
    inodes.used = (st.files() as u64).saturating_sub(st.files_free() as u64);
    let mut r = csi::VolumeStatsResponse::new();
    r.usage = vec![bytes, inodes];
    r.volume_condition = MessageField::some(csi::VolumeCondition::new());
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(root: &std::path::Path) -> AgentService {
        AgentService {
            state: Arc::new(AgentState {
                config: AgentConfig::default(),
                guest: GuestFs::new(root),
                init_daemon: false,
                sandbox: Sandbox::new(
                    AgentConfig::default(),
                    GuestFs::new(root),
                    crate::sandbox::AgentPaths {
                        run_dir: root.join("run"),
                        cgroup_root: root.join("cgroup"),
                        no_pivot: false,
                    },
                    crate::reaper::Reaper::default(),
                    false,
                ),
            }),
        }
    }

    #[test]
    fn guest_details_report_version_and_asked_fields_only() {
        let dir = tempfile::tempdir().unwrap();
        let mem = dir.path().join("sys/devices/system/memory");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("block_size_bytes"), "8000000").unwrap();
        let svc = service(dir.path());
        let mut req = agent::GuestDetailsRequest::new();
        let resp = svc.guest_details(&req);
        assert_eq!(resp.mem_block_size_bytes, 0, "not asked for");
        assert_eq!(resp.agent_details.version, AGENT_VERSION);
        req.mem_block_size = true;
        assert_eq!(svc.guest_details(&req).mem_block_size_bytes, 0x800_0000);
    }

    #[test]
    fn guest_time_is_validated() {
        assert_eq!(
            guest_timespec(1_700_000_000, 250_000).unwrap().tv_nsec,
            250_000_000
        );
        assert!(guest_timespec(-1, 0).is_err());
        assert!(guest_timespec(0, 1_000_000).is_err());
        assert!(guest_timespec(0, -1).is_err());
    }

    /// A fake sysfs with cpu0 online and `offline` more CPUs present.
    fn fake_cpus(root: &std::path::Path, offline: u32) {
        let cpu = root.join("sys/devices/system/cpu");
        std::fs::create_dir_all(&cpu).unwrap();
        for n in 1..=offline {
            std::fs::create_dir_all(cpu.join(format!("cpu{n}"))).unwrap();
            std::fs::write(cpu.join(format!("cpu{n}/online")), "0").unwrap();
        }
        std::fs::write(cpu.join("online"), "0\n").unwrap();
    }

    /// The kernel updates `cpu/online` when a CPU comes up; the fake does it
    /// by hand from the per-CPU files.
    fn sync_online(root: &std::path::Path) {
        let cpu = root.join("sys/devices/system/cpu");
        let mut up = vec!["0".to_string()];
        for n in 1..8 {
            if std::fs::read_to_string(cpu.join(format!("cpu{n}/online"))).is_ok_and(|s| s == "1") {
                up.push(n.to_string());
            }
        }
        std::fs::write(cpu.join("online"), up.join(",")).unwrap();
    }

    #[tokio::test]
    async fn online_cpu_mem_takes_the_total_and_onlines_memory() {
        let dir = tempfile::tempdir().unwrap();
        fake_cpus(dir.path(), 1);
        let mem = dir.path().join("sys/devices/system/memory/memory7");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("state"), "offline").unwrap();
        let g = GuestFs::new(dir.path());
        let cpu1 = dir.path().join("sys/devices/system/cpu/cpu1/online");
        // Going from 1 to 2 vCPUs: Kata's runtime sends the total, 2.
        let mut req = agent::OnlineCPUMemRequest::new();
        req.nb_cpus = 2;
        req.cpu_only = true;
        let root = dir.path().to_path_buf();
        let kernel = tokio::spawn(async move {
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                sync_online(&root);
            }
        });
        online_cpu_mem(&g, &req).await.unwrap();
        kernel.abort();
        assert_eq!(std::fs::read_to_string(&cpu1).unwrap(), "1");
        assert_eq!(
            std::fs::read_to_string(mem.join("state")).unwrap(),
            "offline",
            "cpu_only leaves memory alone"
        );
        // Already enough online: nothing to do; memory onlined.
        sync_online(dir.path());
        req.nb_cpus = 2;
        req.cpu_only = false;
        online_cpu_mem(&g, &req).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(mem.join("state")).unwrap(),
            "online"
        );
        // nb_cpus = 0: no CPU work at all.
        req.nb_cpus = 0;
        online_cpu_mem(&g, &req).await.unwrap();
        mem_hotplug_by_probe(&g, &[0x1_0000_0000]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("sys/devices/system/memory/probe")).unwrap(),
            "0x100000000"
        );
    }

    #[tokio::test]
    async fn online_cpu_mem_names_both_counts_when_cpus_never_appear() {
        let dir = tempfile::tempdir().unwrap();
        fake_cpus(dir.path(), 0);
        let g = GuestFs::new(dir.path());
        let mut req = agent::OnlineCPUMemRequest::new();
        req.nb_cpus = 2;
        req.cpu_only = true;
        let e = online_cpu_mem(&g, &req).await.unwrap_err();
        assert!(
            e.message
                .contains("1 vCPUs are online and the runtime expects 2"),
            "{}",
            e.message
        );
    }

    #[test]
    fn volume_stats_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let r = volume_stats(dir.path().to_str().unwrap()).unwrap();
        assert_eq!(r.usage.len(), 2);
        assert!(r.usage[0].total > 0);
        assert!(volume_stats("relative").is_err());
    }

    #[test]
    fn share_mounts_are_touched_without_failing() {
        // Nothing mounted under this path: zero touched, and no error.
        assert_eq!(
            touch_share_mounts(std::path::Path::new("/nonexistent/kiln")).unwrap(),
            0
        );
        assert!(touch_share_mounts(std::path::Path::new("/")).unwrap() >= 1);
    }

    #[test]
    fn unimplemented_is_unimplemented() {
        match unimplemented_status("CopyFile") {
            ttrpc::Error::RpcStatus(s) => {
                assert_eq!(s.code(), ttrpc::Code::UNIMPLEMENTED);
                assert!(s.message().contains("CopyFile"));
            }
            other => panic!("{other:?}"),
        }
    }
}
