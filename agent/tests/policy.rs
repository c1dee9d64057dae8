//! Kata's agent policy over ttrpc: the agent binary served on a unix socket,
//! SetPolicy installing a policy that refuses ExecProcess, and what the
//! runtime then sees. Built only with the `policy` feature (the default).
#![cfg(feature = "policy")]

use std::time::Duration;

use kiln_protocol::{agent, agent_ttrpc, health, health_ttrpc};

use kiln_testsupport::agent::AgentProcess as Agent;

fn start_agent(extra: &[&str]) -> Agent {
    Agent::spawn(env!("CARGO_BIN_EXE_kiln-agent"), None, |dir| {
        let mut args = vec![
            "--run-dir".to_string(),
            dir.join("run").display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    })
}

async fn connect(a: &Agent) -> ttrpc::r#async::Client {
    a.connect().await
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

fn status<T: std::fmt::Debug>(what: &str, r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("{what}: expected an error status, got {other:?}"),
    }
}

/// Kata's allow-all-except-exec-process.rego, in substance: every request
/// type allowed but ExecProcess, which says why.
const NO_EXEC: &str = r#"
package agent_policy

default CreateSandboxRequest := true
default DestroySandboxRequest := true
default GuestDetailsRequest := true
default GetMetricsRequest := true
default SetPolicyRequest := true
default ExecProcessRequest := false

ExecProcessRequest if {
    print("exec", input.exec_id, "refused: this sandbox runs no exec")
    false
}
"#;

fn exec_request() -> agent::ExecProcessRequest {
    let mut req = agent::ExecProcessRequest::new();
    req.container_id = "ctr".into();
    req.exec_id = "sneaky".into();
    let p = req.process.mut_or_insert_default();
    p.Args = vec!["/bin/sh".into()];
    p.Cwd = "/".into();
    req
}

#[tokio::test]
async fn set_policy_denies_exec_process_with_katas_code_and_message() {
    let a = start_agent(&[]);
    let client = connect(&a).await;
    let ag = agent_ttrpc::AgentServiceClient::new(client.clone());

    // No policy: ExecProcess reaches the sandbox (no such container).
    let (code, _) = status("exec before", ag.exec_process(ctx(), &exec_request()).await);
    assert_ne!(code, ttrpc::Code::PERMISSION_DENIED);

    let mut set = agent::SetPolicyRequest::new();
    set.policy = NO_EXEC.into();
    ag.set_policy(ctx(), &set).await.unwrap();

    let (code, msg) = status("exec after", ag.exec_process(ctx(), &exec_request()).await);
    assert_eq!(code, ttrpc::Code::PERMISSION_DENIED, "{msg}");
    assert!(
        msg.starts_with("ExecProcessRequest is blocked by policy: "),
        "{msg}"
    );
    assert!(
        msg.contains("exec sneaky refused: this sandbox runs no exec"),
        "{msg}"
    );

    // Other RPCs the policy allows still work.
    let d = ag
        .get_guest_details(ctx(), &agent::GuestDetailsRequest::new())
        .await
        .unwrap();
    assert_eq!(d.agent_details.version, env!("CARGO_PKG_VERSION"));
    ag.get_metrics(ctx(), &agent::GetMetricsRequest::new())
        .await
        .unwrap();
    // A request type the policy does not mention is refused, as in Kata.
    let (code, msg) = status(
        "stats",
        ag.stats_container(ctx(), &agent::StatsContainerRequest::new())
            .await,
    );
    assert_eq!(code, ttrpc::Code::INTERNAL, "{msg}");
    assert!(
        msg.starts_with("StatsContainerRequest: internal error"),
        "{msg}"
    );

    // A policy that does not parse is refused; the one in force stays.
    set.policy = "package agent_policy\ndefault ExecProcessRequest := \n".into();
    let (code, msg) = status("bad SetPolicy", ag.set_policy(ctx(), &set).await);
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    let (code, _) = status("exec still", ag.exec_process(ctx(), &exec_request()).await);
    assert_eq!(code, ttrpc::Code::PERMISSION_DENIED);

    // Health is not under the policy.
    let h = health_ttrpc::HealthClient::new(client);
    assert!(h.check(ctx(), &health::CheckRequest::new()).await.is_ok());
}

#[tokio::test]
async fn the_initial_policy_file_is_enforced_and_guards_set_policy() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("default-policy.rego");
    std::fs::write(
        &file,
        "package agent_policy\ndefault GuestDetailsRequest := true\ndefault SetPolicyRequest := false\n",
    )
    .unwrap();
    let a = start_agent(&["--policy-file", file.to_str().unwrap()]);
    let ag = agent_ttrpc::AgentServiceClient::new(connect(&a).await);
    ag.get_guest_details(ctx(), &agent::GuestDetailsRequest::new())
        .await
        .unwrap();
    let mut set = agent::SetPolicyRequest::new();
    set.policy = "package agent_policy\ndefault ExecProcessRequest := true\n".into();
    let (code, msg) = status("SetPolicy", ag.set_policy(ctx(), &set).await);
    assert_eq!(code, ttrpc::Code::PERMISSION_DENIED, "{msg}");
    assert!(
        msg.starts_with("SetPolicyRequest is blocked by policy"),
        "{msg}"
    );
}
