//! Running a helper program (iptables-save, iptables-restore) with its exit
//! status delivered by the reaper, which is the only code that waits for
//! children.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::fcntl::OFlag;

use crate::error::{os, timeout, Result};
use crate::reaper::Reaper;

/// Most bytes kept of a helper's stdout or stderr.
const OUTPUT_LIMIT: u64 = 16 * 1024 * 1024;

/// What a helper program left behind.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Runs `program args` with `input` on its stdin, returning its exit status
/// and its stdout and stderr (each cut at 16 MiB).
pub async fn run(
    reaper: &Reaper,
    program: &str,
    args: &[&str],
    input: Vec<u8>,
    limit: Duration,
) -> Result<Output> {
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| os("creating a pipe", e));
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::from(in_r))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    let exit = {
        let mut reg = reaper.lock();
        let child = cmd
            .spawn()
            .map_err(|e| os(format!("starting {program}"), e))?;
        reg.register(child.id() as i32)
    };
    // Our copies of the child's ends close here, so EOF arrives when it exits.
    drop(cmd);
    let writer = tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::from(in_w);
        let _ = f.write_all(&input);
    });
    let read = |fd: std::os::fd::OwnedFd| {
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::new();
            let _ = std::fs::File::from(fd)
                .take(OUTPUT_LIMIT)
                .read_to_end(&mut buf);
            buf
        })
    };
    let (stdout, stderr) = (read(out_r), read(err_r));
    let code = tokio::time::timeout(limit, exit)
        .await
        .map_err(|_| {
            timeout(format!(
                "{program} did not finish within {} s",
                limit.as_secs()
            ))
        })?
        .unwrap_or(255);
    let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    Ok(Output {
        code,
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn status_input_and_separate_outputs() {
        let reaper = Reaper::default();
        tokio::spawn(reaper.clone().run());
        let out = run(
            &reaper,
            "sh",
            &["-c", "cat; echo err >&2; exit 4"],
            b"in\n".to_vec(),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        assert_eq!(out.code, 4);
        assert_eq!(out.stdout, b"in\n");
        assert_eq!(out.stderr, b"err\n");
        assert!(run(
            &reaper,
            "/nonexistent/prog",
            &[],
            Vec::new(),
            Duration::from_secs(5)
        )
        .await
        .is_err());
    }
}
