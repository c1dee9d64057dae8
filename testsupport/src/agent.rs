//! The agent binary served on a unix socket in a temp dir, for the agent's
//! host tests (agent/tests): spawned, connected to, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running agent; killed and reaped on drop, its temp dir removed.
pub struct AgentProcess {
    pub child: Child,
    /// The temp dir holding the socket (and whatever the test puts there).
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl AgentProcess {
    /// Spawns `bin` (the test's `env!("CARGO_BIN_EXE_kiln-agent")`) with
    /// `--server-addr unix://<dir>/agent.sock`, then the arguments `extra`
    /// makes from the temp dir; under `wrapper` (e.g. `unshare -n`) if given.
    pub fn spawn(
        bin: &str,
        wrapper: Option<&[&str]>,
        extra: impl FnOnce(&Path) -> Vec<String>,
    ) -> AgentProcess {
        let dir = tempfile::tempdir().expect("creating the agent's temp dir");
        let sock = dir.path().join("agent.sock");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(["--server-addr", &format!("unix://{}", sock.display())])
            .args(extra(dir.path()));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {bin}: {e}"));
        AgentProcess { child, dir, sock }
    }

    /// A ttrpc client on the socket, once the agent listens (30 s at most).
    pub async fn connect(&self) -> ttrpc::r#async::Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::net::UnixStream::connect(&self.sock).await {
                Ok(s) => {
                    return ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::new(s))
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("agent never listened: {e}"),
            }
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
