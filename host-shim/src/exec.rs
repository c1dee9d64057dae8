//! `kiln-shim exec`: a process in a container that is already running in a VM
//! started with `boot --stay` (by default the smoke container `dev`), with
//! the same stdio, pty and signal handling as `kiln-shim run`.

use std::path::Path;

use anyhow::Context;
use kiln_protocol::{agent, oci};
use protobuf::MessageField;
use tokio::signal::unix::{signal, SignalKind};

use crate::client::AgentClient;
use crate::config::ShimConfig;
use crate::stdio::{copy_in, copy_out, forward, no_deadline, resize, RawTerminal};

pub struct ExecRequest<'a> {
    pub run_dir: &'a Path,
    pub container: &'a str,
    pub command: &'a [String],
    pub env: &'a [String],
    pub tty: bool,
}

/// Runs the process; returns its exit status (128+N for a signal, as the agent reports).
pub async fn exec(cfg: &ShimConfig, req: ExecRequest<'_>) -> anyhow::Result<i32> {
    if req.command.is_empty() {
        anyhow::bail!("give the command after `--`, e.g. kiln-shim exec --vm DIR -- sh");
    }
    for e in req.env {
        if !e.contains('=') {
            anyhow::bail!("-e {e}: give KEY=VALUE");
        }
    }
    let socket = req.run_dir.join("vm.vsock");
    if !socket.exists() {
        anyhow::bail!(
            "{} has no vm.vsock: give the run directory `kiln-shim boot --stay` printed",
            req.run_dir.display()
        );
    }
    let stream = crate::vsock::connect(&socket, cfg.agent.port).await?;
    let c = AgentClient::from_stream(stream, cfg.rpc_timeout());
    let exec_id = exec_id();

    let mut p = oci::Process::new();
    p.Args = req.command.to_vec();
    p.Env = vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()];
    p.Env.extend(req.env.iter().cloned());
    p.Cwd = "/".into();
    p.Terminal = req.tty;
    // `docker exec` and `crictl exec` give the process the container's
    // capabilities; the agent gives none to a process that names none
    // (runc's rule), so name runc's default set, as `kiln-shim run` does.
    let defaults =
        crate::spec::to_protocol(&crate::spec::default_spec(req.command, &[], false)?)?.0;
    p.Capabilities = defaults
        .Process
        .into_option()
        .unwrap_or_default()
        .Capabilities;
    let mut r = agent::ExecProcessRequest::new();
    r.container_id = req.container.to_string();
    r.exec_id = exec_id.clone();
    r.process = MessageField::some(p);
    c.agent
        .exec_process(c.ctx(), &r)
        .await
        .with_context(|| format!("ExecProcess in container {}", req.container))?;

    let cid = req.container.to_string();
    let _raw = if req.tty { RawTerminal::enter() } else { None };
    let stdout = tokio::spawn(copy_out(
        c.agent.clone(),
        cid.clone(),
        exec_id.clone(),
        false,
    ));
    let stderr = (!req.tty).then(|| {
        tokio::spawn(copy_out(
            c.agent.clone(),
            cid.clone(),
            exec_id.clone(),
            true,
        ))
    });
    let stdin = tokio::spawn(copy_in(c.agent.clone(), cid.clone(), exec_id.clone()));
    if req.tty {
        resize(&c, &cid, &exec_id).await;
    }
    let mut wait_req = agent::WaitProcessRequest::new();
    wait_req.container_id = cid.clone();
    wait_req.exec_id = exec_id.clone();
    let wait = c.agent.wait_process(no_deadline(), &wait_req);
    tokio::pin!(wait);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigwinch = signal(SignalKind::window_change())?;
    let status = loop {
        tokio::select! {
            r = &mut wait => break r.context("WaitProcess (did the VM stop? `kiln-shim agent --vm DIR Check` tells)")?.status,
            _ = sigint.recv() => forward(&c, &cid, &exec_id, libc::SIGINT).await,
            _ = sigterm.recv() => forward(&c, &cid, &exec_id, libc::SIGTERM).await,
            _ = sigwinch.recv(), if req.tty => resize(&c, &cid, &exec_id).await,
        }
    };
    stdin.abort();
    let drain = std::time::Duration::from_secs(30);
    let _ = tokio::time::timeout(drain, stdout).await;
    if let Some(e) = stderr {
        let _ = tokio::time::timeout(drain, e).await;
    }
    Ok(status)
}

/// Unique per shim invocation, valid for the agent.
fn exec_id() -> String {
    format!("exec-{}", crate::run::new_container_id())
}
