//! A ttrpc client for the agent over hybrid vsock.

use std::time::Duration;

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc, kiln, kiln_ttrpc};

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
}
