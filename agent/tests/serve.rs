//! The agent binary served over a unix socket on the host: the ttrpc surface
//! without a VM (the VM path is covered by host-shim's end-to-end tests).

use std::time::{Duration, Instant};

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc};

use kiln_testsupport::agent::AgentProcess as Agent;

fn start_agent() -> Agent {
    start_agent_with(|_| Vec::new())
}

/// `extra` gets the temp dir and returns more arguments.
fn start_agent_with(extra: impl Fn(&std::path::Path) -> Vec<String>) -> Agent {
    Agent::spawn(env!("CARGO_BIN_EXE_kiln-agent"), None, extra)
}

async fn connect(a: &Agent) -> ttrpc::r#async::Client {
    a.connect().await
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

#[tokio::test]
async fn health_and_details_over_ttrpc() {
    let a = start_agent();
    let client = connect(&a).await;
    let h = health_ttrpc::HealthClient::new(client.clone());
    let resp = h.check(ctx(), &health::CheckRequest::new()).await.unwrap();
    assert_eq!(
        resp.status.enum_value_or_default(),
        health::health_check_response::ServingStatus::SERVING
    );
    let v = h
        .version(ctx(), &health::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));

    let ag = agent_ttrpc::AgentServiceClient::new(client);
    let mut req = agent::GuestDetailsRequest::new();
    req.mem_block_size = true;
    let d = ag.get_guest_details(ctx(), &req).await.unwrap();
    assert!(!d.agent_details.init_daemon, "not PID 1 on the host");
    assert_eq!(d.agent_details.version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn kata_only_methods_refuse_empty_requests_and_agent_survives() {
    let a = start_agent();
    let client = connect(&a).await;
    let ag = agent_ttrpc::AgentServiceClient::new(client.clone());
    let expect_invalid =
        |r: ttrpc::Result<protobuf::well_known_types::empty::Empty>, m: &str| match r {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), ttrpc::Code::INVALID_ARGUMENT, "{m}: {s:?}")
            }
            other => panic!("{m}: expected INVALID_ARGUMENT, got {other:?}"),
        };
    expect_invalid(
        ag.reseed_random_dev(ctx(), &agent::ReseedRandomDevRequest::new())
            .await,
        "ReseedRandomDev",
    );
    expect_invalid(
        ag.add_swap(ctx(), &agent::AddSwapRequest::new()).await,
        "AddSwap",
    );
    expect_invalid(
        ag.add_swap_path(ctx(), &agent::AddSwapPathRequest::new())
            .await,
        "AddSwapPath",
    );
    // Sent on every container stop by Kata's Go runtime: always OK.
    ag.remove_stale_virtiofs_share_mounts(
        ctx(),
        &agent::RemoveStaleVirtiofsShareMountsRequest::new(),
    )
    .await
    .unwrap();
    // Still serving.
    let h = health_ttrpc::HealthClient::new(client);
    assert!(h.check(ctx(), &health::CheckRequest::new()).await.is_ok());
}

#[tokio::test]
async fn debug_console_gives_a_shell() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = start_agent_with(|d| {
        vec![
            "--debug-console-addr".into(),
            format!("unix://{}", d.join("console.sock").display()),
        ]
    });
    let _client = connect(&a).await; // the agent is up once ttrpc answers
    let path = a.sock.with_file_name("console.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match tokio::net::UnixStream::connect(&path).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("no debug console: {e}"),
        }
    };
    s.write_all(b"echo kiln-$((40+2)); exit\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("kiln-42"), "{text}");
}
