//! The smoke sequence `kiln-shim boot --smoke` runs against a fresh VM, and
//! `cargo xtask dev` after every rebuild: health, guest details, then one
//! container on the shared busybox rootfs and an exec in it. Each step is
//! timed, so a developer sees where a slow cycle spends its time.
//!
//! The container (`dev`) keeps running afterwards, so `kiln-shim exec --vm DIR
//! -- sh` can step into it while the VM stays up.

use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_protocol::{agent, oci};
use serde::Serialize;

use crate::client::AgentClient;

/// The smoke container's id, and the default of `kiln-shim exec --container`.
pub const CONTAINER: &str = "dev";
/// What the exec prints; the step fails unless the output has it.
const MARKER: &str = "kiln-smoke-ok";

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub ms: f64,
    pub detail: String,
}

/// Runs the sequence; stops at the first failing step, naming it. `shared`
/// says whether a rootfs was shared as container `dev` (without one, only the
/// health and guest-details steps run).
pub async fn run(c: &AgentClient, shared: bool) -> anyhow::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut step = |name: &str, t: Instant, detail: String| {
        let s = Step {
            step: name.to_string(),
            ms: t.elapsed().as_secs_f64() * 1000.0,
            detail,
        };
        tracing::info!("smoke: {} {:.1} ms {}", s.step, s.ms, s.detail);
        steps.push(s);
    };

    let t = Instant::now();
    let status = c.check().await.context("smoke step Check")?;
    if status != kiln_protocol::health::health_check_response::ServingStatus::SERVING {
        anyhow::bail!("smoke step Check: the agent answered {status:?}, not SERVING");
    }
    step("Check", t, "SERVING".into());

    let t = Instant::now();
    let details = c
        .guest_details()
        .await
        .context("smoke step GetGuestDetails")?;
    let version = c.version().await.context("smoke step Version")?;
    step(
        "GetGuestDetails",
        t,
        format!(
            "agent {} (init {})",
            version.agent_version, details.agent_details.init_daemon
        ),
    );
    if !shared {
        return Ok(steps);
    }

    let t = Instant::now();
    crate::run::start_idle_container(c, CONTAINER, "kiln-dev")
        .await
        .context("smoke step: starting container dev")?;
    step("CreateContainer+Start", t, format!("container {CONTAINER}"));

    let t = Instant::now();
    let out = exec_capture(c, "smoke", &["sh", "-c", "echo kiln-smoke-ok; uname -r"]).await?;
    if !out.contains(MARKER) {
        anyhow::bail!("smoke step Exec: the container printed {out:?}, without {MARKER:?}");
    }
    step("Exec", t, out.lines().collect::<Vec<_>>().join(" "));
    Ok(steps)
}

/// Execs `args` in the smoke container, returns its stdout; fails on a
/// non-zero status, with its stderr.
async fn exec_capture(c: &AgentClient, exec_id: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut p = oci::Process::new();
    p.Args = args.iter().map(|a| a.to_string()).collect();
    p.Env = vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()];
    p.Cwd = "/".into();
    c.exec_process(CONTAINER, exec_id, p)
        .await
        .context("smoke step ExecProcess")?;
    let stdout = read_all(c, exec_id, false).await?;
    let stderr = read_all(c, exec_id, true).await?;
    let status = c
        .wait_process(CONTAINER, exec_id)
        .await
        .context("smoke step WaitProcess")?;
    if status != 0 {
        anyhow::bail!(
            "smoke step Exec: `{}` exited with {status}: {}",
            args.join(" "),
            stderr.trim()
        );
    }
    Ok(stdout)
}

/// Reads a stream to EOF (an empty answer), within a minute.
async fn read_all(c: &AgentClient, exec_id: &str, stderr: bool) -> anyhow::Result<String> {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = CONTAINER.into();
    req.exec_id = exec_id.into();
    req.len = 64 * 1024;
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = if stderr {
            c.agent.read_stderr(c.ctx(), &req).await
        } else {
            c.agent.read_stdout(c.ctx(), &req).await
        };
        match r {
            Ok(resp) if !resp.data.is_empty() => out.extend_from_slice(&resp.data),
            // EOF, or the process and its streams are gone.
            _ => break,
        }
        if Instant::now() > deadline {
            anyhow::bail!("smoke step Exec: output did not end within 60 s");
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}
