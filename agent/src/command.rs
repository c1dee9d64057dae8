//! Running a helper program (modprobe) with its exit status delivered by the
//! reaper, which is the only code that waits for children.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;

use crate::error::{os, timeout, Result};
use crate::reaper::Reaper;

/// Runs `program args`, returning its exit status and combined output
/// (the first 64 KiB).
pub async fn run(
    reaper: &Reaper,
    program: &str,
    args: &[&str],
    limit: Duration,
) -> Result<(i32, String)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| os("creating a pipe", e))?;
    let w2 = w.try_clone().map_err(|e| os("duplicating a pipe", e))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(w))
        .stderr(Stdio::from(w2));
    let exit = {
        let mut reg = reaper.lock();
        let child = cmd
            .spawn()
            .map_err(|e| os(format!("starting {program}"), e))?;
        reg.register(child.id() as i32)
    };
    drop(cmd);
    let output = tokio::task::spawn_blocking(move || {
        let mut buf = Vec::new();
        let _ = std::fs::File::from(r).take(64 * 1024).read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let code = tokio::time::timeout(limit, exit)
        .await
        .map_err(|_| {
            timeout(format!(
                "{program} did not finish within {} s",
                limit.as_secs()
            ))
        })?
        .unwrap_or(255);
    let out = tokio::time::timeout(Duration::from_secs(5), output)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    Ok((code, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_and_output() {
        let reaper = Reaper::default();
        tokio::spawn(reaper.clone().run());
        let (code, out) = run(
            &reaper,
            "sh",
            &["-c", "echo out; echo err >&2; exit 4"],
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(code, 4);
        assert!(out.contains("out") && out.contains("err"), "{out}");
        assert!(
            run(&reaper, "/nonexistent/prog", &[], Duration::from_secs(5))
                .await
                .is_err()
        );
    }
}
