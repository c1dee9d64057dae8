//! The ttrpc services: `grpc.Health` and `grpc.AgentService`.
//!
//! Every AgentService method the agent does not implement yet answers
//! UNIMPLEMENTED (the generated defaults would say NOT_FOUND, which Kata's
//! runtime reads as "no such agent" rather than "not supported").

use std::sync::Arc;

use kiln_protocol::{agent, csi, health, types};
use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::r#async::TtrpcContext;

use crate::config::AgentConfig;
use crate::guest::GuestFs;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by all RPC handlers.
pub struct AgentState {
    pub config: AgentConfig,
    pub guest: GuestFs,
    pub init_daemon: bool,
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
    async fn check(&self, _ctx: &TtrpcContext, _req: health::CheckRequest) -> ttrpc::Result<health::HealthCheckResponse> {
        let mut resp = health::HealthCheckResponse::new();
        resp.status = health::health_check_response::ServingStatus::SERVING.into();
        Ok(resp)
    }

    async fn version(&self, _ctx: &TtrpcContext, _req: health::CheckRequest) -> ttrpc::Result<health::VersionCheckResponse> {
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
    pub fn guest_details(&self, req: &agent::GuestDetailsRequest) -> agent::GuestDetailsResponse {
        let g = &self.state.guest;
        let mut details = agent::AgentDetails::new();
        details.version = AGENT_VERSION.to_string();
        details.init_daemon = self.state.init_daemon;
        details.supports_seccomp = g.seccomp();
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

/// Expands to trait methods that answer UNIMPLEMENTED.
macro_rules! unimplemented_rpcs {
    ($($method:ident($req:ty) -> $resp:ty = $name:literal;)*) => {
        $(
            // Written in async-trait's expanded form: attribute macros run
            // before this macro, so `async fn` here would not be rewritten.
            fn $method<'life0, 'life1, 'async_trait>(
                &'life0 self,
                _ctx: &'life1 TtrpcContext,
                _req: $req,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ttrpc::Result<$resp>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                'life1: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { Err(unimplemented_status($name)) })
            }
        )*
    };
}

#[async_trait::async_trait]
impl kiln_protocol::agent_ttrpc::AgentService for AgentService {
    async fn get_guest_details(&self, _ctx: &TtrpcContext, req: agent::GuestDetailsRequest) -> ttrpc::Result<agent::GuestDetailsResponse> {
        Ok(self.guest_details(&req))
    }

    unimplemented_rpcs! {
        create_container(agent::CreateContainerRequest) -> Empty = "CreateContainer";
        start_container(agent::StartContainerRequest) -> Empty = "StartContainer";
        remove_container(agent::RemoveContainerRequest) -> Empty = "RemoveContainer";
        exec_process(agent::ExecProcessRequest) -> Empty = "ExecProcess";
        signal_process(agent::SignalProcessRequest) -> Empty = "SignalProcess";
        wait_process(agent::WaitProcessRequest) -> agent::WaitProcessResponse = "WaitProcess";
        update_container(agent::UpdateContainerRequest) -> Empty = "UpdateContainer";
        update_ephemeral_mounts(agent::UpdateEphemeralMountsRequest) -> Empty = "UpdateEphemeralMounts";
        stats_container(agent::StatsContainerRequest) -> agent::StatsContainerResponse = "StatsContainer";
        pause_container(agent::PauseContainerRequest) -> Empty = "PauseContainer";
        resume_container(agent::ResumeContainerRequest) -> Empty = "ResumeContainer";
        remove_stale_virtiofs_share_mounts(agent::RemoveStaleVirtiofsShareMountsRequest) -> Empty = "RemoveStaleVirtiofsShareMounts";
        get_diagnostic_data(agent::GetDiagnosticDataRequest) -> agent::GetDiagnosticDataResponse = "GetDiagnosticData";
        write_stdin(agent::WriteStreamRequest) -> agent::WriteStreamResponse = "WriteStdin";
        read_stdout(agent::ReadStreamRequest) -> agent::ReadStreamResponse = "ReadStdout";
        read_stderr(agent::ReadStreamRequest) -> agent::ReadStreamResponse = "ReadStderr";
        close_stdin(agent::CloseStdinRequest) -> Empty = "CloseStdin";
        tty_win_resize(agent::TtyWinResizeRequest) -> Empty = "TtyWinResize";
        update_interface(agent::UpdateInterfaceRequest) -> types::Interface = "UpdateInterface";
        update_routes(agent::UpdateRoutesRequest) -> agent::Routes = "UpdateRoutes";
        list_interfaces(agent::ListInterfacesRequest) -> agent::Interfaces = "ListInterfaces";
        list_routes(agent::ListRoutesRequest) -> agent::Routes = "ListRoutes";
        add_arp_neighbors(agent::AddARPNeighborsRequest) -> Empty = "AddARPNeighbors";
        get_ip_tables(agent::GetIPTablesRequest) -> agent::GetIPTablesResponse = "GetIPTables";
        set_ip_tables(agent::SetIPTablesRequest) -> agent::SetIPTablesResponse = "SetIPTables";
        get_metrics(agent::GetMetricsRequest) -> agent::Metrics = "GetMetrics";
        mem_agent_memcg_set(agent::MemAgentMemcgConfig) -> Empty = "MemAgentMemcgSet";
        mem_agent_compact_set(agent::MemAgentCompactConfig) -> Empty = "MemAgentCompactSet";
        create_sandbox(agent::CreateSandboxRequest) -> Empty = "CreateSandbox";
        destroy_sandbox(agent::DestroySandboxRequest) -> Empty = "DestroySandbox";
        online_cpu_mem(agent::OnlineCPUMemRequest) -> Empty = "OnlineCPUMem";
        reseed_random_dev(agent::ReseedRandomDevRequest) -> Empty = "ReseedRandomDev";
        mem_hotplug_by_probe(agent::MemHotplugByProbeRequest) -> Empty = "MemHotplugByProbe";
        set_guest_date_time(agent::SetGuestDateTimeRequest) -> Empty = "SetGuestDateTime";
        copy_file(agent::CopyFileRequest) -> Empty = "CopyFile";
        get_oom_event(agent::GetOOMEventRequest) -> agent::OOMEvent = "GetOOMEvent";
        add_swap(agent::AddSwapRequest) -> Empty = "AddSwap";
        add_swap_path(agent::AddSwapPathRequest) -> Empty = "AddSwapPath";
        get_volume_stats(agent::VolumeStatsRequest) -> csi::VolumeStatsResponse = "GetVolumeStats";
        resize_volume(agent::ResizeVolumeRequest) -> Empty = "ResizeVolume";
        set_policy(agent::SetPolicyRequest) -> Empty = "SetPolicy";
    }
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
