//! The ttrpc server: binds the configured address (retrying, because the vsock
//! transport may come up after us) and serves until the process ends.

use std::sync::Arc;
use std::time::Duration;

use crate::rpc::{AgentService, AgentState, HealthService};

pub async fn serve(state: Arc<AgentState>) -> anyhow::Result<()> {
    let addr = state.config.server_addr.clone();
    if let Some(path) = addr.strip_prefix("unix://") {
        // A socket file left by an earlier run would make bind fail.
        let _ = std::fs::remove_file(path);
    }
    let health = kiln_protocol::health_ttrpc::create_health(Arc::new(HealthService));
    let facts = crate::facts::service(state.guest.clone());
    let agent = kiln_protocol::agent_ttrpc::create_agent_service(Arc::new(AgentService { state }));
    let mut attempt = 0u32;
    let server = loop {
        match ttrpc::r#async::Server::new().bind(&addr) {
            Ok(s) => break s,
            Err(e) => {
                attempt += 1;
                if attempt == 1 || attempt.is_multiple_of(30) {
                    tracing::warn!(%addr, "cannot listen yet ({e}); retrying");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut server = server
        .register_service(health)
        .register_service(agent)
        .register_service(facts);
    server
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("starting ttrpc server on {addr}: {e}"))?;
    tracing::info!(%addr, "agent ready");
    std::future::pending::<()>().await;
    Ok(())
}
