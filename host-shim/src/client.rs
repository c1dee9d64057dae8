//! A ttrpc client for the agent over hybrid vsock.

use std::time::Duration;

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc};

pub struct AgentClient {
    pub health: health_ttrpc::HealthClient,
    pub agent: agent_ttrpc::AgentServiceClient,
    timeout: Duration,
}

impl AgentClient {
    /// Wraps an already connected byte stream (unix socket to an agent run on the host, in tests).
    pub fn from_stream(stream: tokio::net::UnixStream, timeout: Duration) -> AgentClient {
        let socket = ttrpc::r#async::transport::Socket::new(stream);
        let client = ttrpc::r#async::Client::new(socket);
        AgentClient {
            health: health_ttrpc::HealthClient::new(client.clone()),
            agent: agent_ttrpc::AgentServiceClient::new(client),
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
}
