//! Running external tools: always through duct with an argument vector (never a
//! shell line), output captured to a log file under target/kiln/logs/, and on
//! failure an error carrying the command, the log's path and its last lines.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::ctx::Ctx;

/// Lines of a failed step's log shown in the error.
const TAIL_LINES: usize = 25;

/// Runs `expr` with stdout and stderr appended to `logs/<log_name>.log`.
pub fn run_logged(
    ctx: &Ctx,
    log_name: &str,
    what: &str,
    expr: duct::Expression,
) -> anyhow::Result<()> {
    run_logged_to(&ctx.log_path(log_name), what, expr)
}

/// [`run_logged`] with the log file given directly.
pub fn run_logged_to(log: &Path, what: &str, expr: duct::Expression) -> anyhow::Result<()> {
    let log = log.to_path_buf();
    if let Some(dir) = log.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening log {}", log.display()))?;
    let out = tied(expr)
        .stderr_to_stdout()
        .stdout_file(file)
        .unchecked()
        .run()
        .with_context(|| format!("could not start {what}: is it installed? (`cargo xtask setup` installs kiln's host tools)"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}); last lines of {}:\n{}",
            out.status,
            log.display(),
            tail(&log, TAIL_LINES)
        );
    }
    Ok(())
}

/// Runs `expr` and returns its trimmed stdout (for short queries such as versions).
pub fn read(what: &str, expr: duct::Expression) -> anyhow::Result<String> {
    let out = tied(expr)
        .stderr_capture()
        .stdout_capture()
        .unchecked()
        .run()
        .with_context(|| format!("could not start {what}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Finds an executable on PATH.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// `expr` with its process tied to ours: if xtask dies, even by SIGKILL, the
/// kernel kills the tool too (PR_SET_PDEATHSIG), so an interrupted build
/// leaves no mke2fs or cargo running on into the next one.
pub fn tied(expr: duct::Expression) -> duct::Expression {
    expr.before_spawn(|cmd| {
        use std::os::unix::process::CommandExt;
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then go now.
                if libc::getppid() != parent {
                    return Err(std::io::Error::other("xtask exited"));
                }
                Ok(())
            });
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        fs::write(
            &p,
            (1..=40).map(|i| format!("line{i}\n")).collect::<String>(),
        )
        .unwrap();
        let t = tail(&p, 3);
        assert_eq!(t, "    line38\n    line39\n    line40");
    }

    #[test]
    fn which_finds_sh_and_not_nonsense() {
        assert!(which("sh").is_some());
        assert!(which("kiln-no-such-tool-xyz").is_none());
    }
}
