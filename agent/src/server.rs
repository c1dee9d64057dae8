//! The ttrpc server: binds the configured address (retrying, because the vsock
//! transport may come up after us) and serves until the process ends.

use std::os::fd::RawFd;
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
        .set_accept_hook(HostOnly)
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

/// The host's vsock address (`VMADDR_CID_HOST`).
const HOST_CID: u32 = 2;

/// Accepts vsock connections from the host only: the agent's API is the
/// host runtime's, and nothing in the guest (a container with a vsock
/// socket, a guest with loopback vsock) may reach it. Unix sockets (tests,
/// development) are accepted.
#[derive(Debug)]
struct HostOnly;

impl ttrpc::AcceptHook for HostOnly {
    fn on_accept(&self, fd: RawFd) -> Result<ttrpc::HookOutput, ttrpc::HookError> {
        let peer = nix::sys::socket::getpeername::<nix::sys::socket::VsockAddr>(fd)
            .ok()
            .map(|a| a.cid());
        check_peer(peer).map_err(|e| {
            tracing::warn!("{e}");
            ttrpc::HookError::Rejected(e)
        })?;
        Ok(ttrpc::HookOutput {
            data: Default::default(),
            payload_transform: None,
        })
    }
}

/// `peer`: the vsock CID of the connecting side, `None` for other sockets.
fn check_peer(peer: Option<u32>) -> Result<(), String> {
    match peer {
        Some(cid) if cid != HOST_CID => Err(format!(
            "refusing an agent connection from vsock CID {cid}: only the host (CID {HOST_CID}) may connect"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_host_cid_may_connect() {
        assert!(check_peer(Some(HOST_CID)).is_ok());
        assert!(check_peer(None).is_ok(), "unix sockets (tests, dev)");
        for cid in [0, 1, 3, 42, u32::MAX] {
            let e = check_peer(Some(cid)).unwrap_err();
            assert!(e.contains(&format!("CID {cid}")), "{e}");
        }
    }
}
