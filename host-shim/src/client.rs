//! A ttrpc client for the agent over hybrid vsock.

use std::time::Duration;

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc, kiln, kiln_ttrpc, oci};
use protobuf::MessageField;

pub struct AgentClient {
    pub health: health_ttrpc::HealthClient,
    pub agent: agent_ttrpc::AgentServiceClient,
    /// kiln's own read-only service (`kiln.Diagnostics`).
    pub diagnostics: kiln_ttrpc::DiagnosticsClient,
    timeout: Duration,
}

impl AgentClient {
    /// Wraps an already connected byte stream (unix socket to an agent run on the host, in tests).
    pub fn from_stream(stream: tokio::net::UnixStream, timeout: Duration) -> AgentClient {
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        let client = ttrpc::r#async::Client::new(socket);
        AgentClient {
            health: health_ttrpc::HealthClient::new(client.clone()),
            agent: agent_ttrpc::AgentServiceClient::new(client.clone()),
            diagnostics: kiln_ttrpc::DiagnosticsClient::new(client),
            timeout,
        }
    }

    pub fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.timeout.as_nanos() as i64)
    }

    pub async fn check(&self) -> anyhow::Result<health::health_check_response::ServingStatus> {
        let resp = self
            .health
            .check(self.ctx(), &health::CheckRequest::new())
            .await?;
        Ok(resp.status.enum_value_or_default())
    }

    pub async fn version(&self) -> anyhow::Result<health::VersionCheckResponse> {
        Ok(self
            .health
            .version(self.ctx(), &health::CheckRequest::new())
            .await?)
    }

    pub async fn guest_details(&self) -> anyhow::Result<agent::GuestDetailsResponse> {
        let mut req = agent::GuestDetailsRequest::new();
        req.mem_block_size = true;
        req.mem_hotplug_probe = true;
        Ok(self.agent.get_guest_details(self.ctx(), &req).await?)
    }

    /// What the guest's kernel carries and which devices registered: the
    /// values of `config_options` in /proc/config.gz, and the statx DAX
    /// attribute of `statx_paths`.
    pub async fn guest_facts(
        &self,
        config_options: &[&str],
        statx_paths: &[&str],
    ) -> anyhow::Result<kiln::GuestFacts> {
        let mut req = kiln::GuestFactsRequest::new();
        req.config_options = config_options.iter().map(|s| s.to_string()).collect();
        req.statx_paths = statx_paths.iter().map(|s| s.to_string()).collect();
        Ok(self.diagnostics.guest_facts(self.ctx(), &req).await?)
    }

    // Container calls. Each builds its request from the few values that vary;
    // errors are the RPC's, for the caller to put in context.

    /// CreateSandbox `id` with `hostname` and the sandbox `storages`.
    pub async fn create_sandbox(
        &self,
        id: &str,
        hostname: &str,
        storages: Vec<agent::Storage>,
    ) -> anyhow::Result<()> {
        let mut req = agent::CreateSandboxRequest::new();
        req.sandbox_id = id.into();
        req.hostname = hostname.into();
        req.storages = storages;
        self.agent.create_sandbox(self.ctx(), &req).await?;
        Ok(())
    }

    /// CreateContainer `id` running `spec` (its init process's exec id is `id` too).
    pub async fn create_container(
        &self,
        id: &str,
        spec: oci::Spec,
        extra: ContainerExtras,
    ) -> anyhow::Result<()> {
        let mut req = agent::CreateContainerRequest::new();
        req.container_id = id.into();
        req.exec_id = id.into();
        req.OCI = MessageField::some(spec);
        req.storages = extra.storages;
        req.devices = extra.devices;
        req.sandbox_pidns = extra.sandbox_pidns;
        self.agent.create_container(self.ctx(), &req).await?;
        Ok(())
    }

    pub async fn start_container(&self, id: &str) -> anyhow::Result<()> {
        let mut req = agent::StartContainerRequest::new();
        req.container_id = id.into();
        self.agent.start_container(self.ctx(), &req).await?;
        Ok(())
    }

    /// ExecProcess `process` as `exec_id` in container `id`.
    pub async fn exec_process(
        &self,
        id: &str,
        exec_id: &str,
        process: oci::Process,
    ) -> anyhow::Result<()> {
        let mut req = agent::ExecProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.process = MessageField::some(process);
        self.agent.exec_process(self.ctx(), &req).await?;
        Ok(())
    }

    /// WaitProcess within the client's timeout; the exit status.
    pub async fn wait_process(&self, id: &str, exec_id: &str) -> anyhow::Result<i32> {
        Ok(self
            .agent
            .wait_process(self.ctx(), &wait_request(id, exec_id))
            .await?
            .status)
    }

    /// WaitProcess with no deadline (a container runs as long as it likes);
    /// the ttrpc error as it is, so a broken connection can be told apart.
    pub async fn wait_process_unbounded(&self, id: &str, exec_id: &str) -> ttrpc::Result<i32> {
        let ctx = ttrpc::context::Context::default();
        Ok(self
            .agent
            .wait_process(ctx, &wait_request(id, exec_id))
            .await?
            .status)
    }

    pub async fn signal_process(&self, id: &str, exec_id: &str, signal: u32) -> anyhow::Result<()> {
        let mut req = agent::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        self.agent.signal_process(self.ctx(), &req).await?;
        Ok(())
    }

    /// RemoveContainer `id`, giving it `timeout_secs` to stop.
    pub async fn remove_container(&self, id: &str, timeout_secs: u32) -> anyhow::Result<()> {
        let mut req = agent::RemoveContainerRequest::new();
        req.container_id = id.into();
        req.timeout = timeout_secs;
        self.agent.remove_container(self.ctx(), &req).await?;
        Ok(())
    }

    pub async fn destroy_sandbox(&self) -> anyhow::Result<()> {
        self.agent
            .destroy_sandbox(self.ctx(), &agent::DestroySandboxRequest::new())
            .await?;
        Ok(())
    }
}

/// What a CreateContainer carries besides the spec.
#[derive(Default)]
pub struct ContainerExtras {
    /// Storages the container mounts (block disks...).
    pub storages: Vec<agent::Storage>,
    /// Devices passed to the container (VFIO...).
    pub devices: Vec<agent::Device>,
    /// Kata's `sandbox_pidns`: the spec's pid namespace had a path.
    pub sandbox_pidns: bool,
}

fn wait_request(id: &str, exec_id: &str) -> agent::WaitProcessRequest {
    let mut req = agent::WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req
}
