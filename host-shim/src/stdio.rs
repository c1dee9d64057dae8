//! The host side of a container's stdio: copying stdout/stderr out and
//! stdin in through the agent's stream calls, forwarding signals and window
//! sizes, and the raw host terminal of a `-t` container. Shared by `run` and
//! `exec`.

use std::io::Write;

use kiln_protocol::agent;
use tokio::io::AsyncReadExt;

use crate::client::AgentClient;

/// A context without deadline, for calls that block until the container acts.
pub(crate) fn no_deadline() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

pub(crate) async fn forward(c: &AgentClient, cid: &str, exec_id: &str, sig: i32) {
    if let Err(e) = c.signal_process(cid, exec_id, sig as u32).await {
        tracing::warn!("forwarding signal {sig}: {e}");
    }
}

pub(crate) async fn resize(c: &AgentClient, cid: &str, exec_id: &str) {
    let Some((rows, cols)) = terminal_size() else {
        return;
    };
    let mut r = agent::TtyWinResizeRequest::new();
    r.container_id = cid.to_string();
    r.exec_id = exec_id.to_string();
    r.row = rows.into();
    r.column = cols.into();
    let _ = c.agent.tty_win_resize(c.ctx(), &r).await;
}

fn terminal_size() -> Option<(u16, u16)> {
    // SAFETY: winsize is plain integers, for which all-zero bytes are valid.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ fills `ws`; fd 0 may not be a tty, then it fails.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Copies the container's stdout (or stderr) to ours until the agent says EOF
/// (an empty answer) or the process is gone.
pub(crate) async fn copy_out(
    agent: kiln_protocol::agent_ttrpc::AgentServiceClient,
    cid: String,
    exec_id: String,
    err: bool,
) {
    let mut req = agent::ReadStreamRequest::new();
    req.container_id = cid;
    req.exec_id = exec_id;
    req.len = 64 * 1024;
    loop {
        let r = if err {
            agent.read_stderr(no_deadline(), &req).await
        } else {
            agent.read_stdout(no_deadline(), &req).await
        };
        let data = match r {
            Ok(resp) if !resp.data.is_empty() => resp.data,
            _ => break,
        };
        let written = if err {
            let mut e = std::io::stderr().lock();
            e.write_all(&data).and_then(|_| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(&data).and_then(|_| o.flush())
        };
        if written.is_err() {
            break;
        }
    }
}

/// Copies our stdin to the container's until EOF, then closes it there.
pub(crate) async fn copy_in(
    agent: kiln_protocol::agent_ttrpc::AgentServiceClient,
    cid: String,
    exec_id: String,
) {
    let mut input = tokio::io::stdin();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut w = agent::WriteStreamRequest::new();
        w.container_id = cid.clone();
        w.exec_id = exec_id.clone();
        w.data = buf[..n].to_vec();
        if agent.write_stdin(no_deadline(), &w).await.is_err() {
            return;
        }
    }
    let mut close = agent::CloseStdinRequest::new();
    close.container_id = cid;
    close.exec_id = exec_id;
    let _ = agent.close_stdin(no_deadline(), &close).await;
}

/// The host terminal in raw mode while a `-t` container runs; restored on drop.
pub(crate) struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    pub(crate) fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}
