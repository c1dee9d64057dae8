//! ReadStdout / ReadStderr as both kinds of test drive them: one read, and
//! reads until the agent reports EOF with an empty answer.

use kiln_protocol::agent::ReadStreamRequest;
use kiln_protocol::agent_ttrpc::AgentServiceClient;
use ttrpc::context::Context;

/// Which output of a process to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn from_stderr_flag(stderr: bool) -> Stream {
        if stderr {
            Stream::Stderr
        } else {
            Stream::Stdout
        }
    }

    /// The RPC's name, for messages.
    pub fn rpc(self) -> &'static str {
        match self {
            Stream::Stdout => "ReadStdout",
            Stream::Stderr => "ReadStderr",
        }
    }
}

/// One read of at most `len` bytes; empty at EOF.
pub async fn read_once(
    agent: &AgentServiceClient,
    ctx: Context,
    id: &str,
    exec: &str,
    stream: Stream,
    len: u32,
) -> ttrpc::Result<Vec<u8>> {
    let mut req = ReadStreamRequest::new();
    req.container_id = id.into();
    req.exec_id = exec.into();
    req.len = len;
    let resp = match stream {
        Stream::Stdout => agent.read_stdout(ctx, &req).await?,
        Stream::Stderr => agent.read_stderr(ctx, &req).await?,
    };
    Ok(resp.data)
}

/// Everything until EOF, `len` bytes a read, each read under a fresh `ctx()`.
pub async fn read_to_eof(
    agent: &AgentServiceClient,
    ctx: impl Fn() -> Context,
    id: &str,
    exec: &str,
    stream: Stream,
    len: u32,
) -> ttrpc::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let data = read_once(agent, ctx(), id, exec, stream, len).await?;
        if data.is_empty() {
            return Ok(out);
        }
        out.extend(data);
    }
}
