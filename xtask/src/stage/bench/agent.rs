//! The agent's figures: idle RSS and after N execs, open fds, and the exec
//! round trip (ExecProcess + WaitProcess of `true` in a running container)
//! p50/p99. Measured in one VM by `kiln-shim bench-exec`, whose JSON is
//! parsed here; xtask does not link the shim.

use std::path::Path;

use anyhow::Context;
use serde::Deserialize;

use super::{row, Row};
use crate::ctx::Ctx;

/// Execs per measurement (the issue's "after 200 execs").
pub const EXECS: usize = 200;

/// What `kiln-shim bench-exec --json` prints (the fields used here).
#[derive(Debug, Deserialize)]
pub struct BenchExec {
    pub idle_rss_bytes: u64,
    pub idle_fds: u64,
    pub container_rss_bytes: u64,
    pub container_fds: u64,
    pub execs: usize,
    pub after_rss_bytes: u64,
    pub after_fds: u64,
    pub exec_p50_ms: f64,
    pub exec_p99_ms: f64,
    pub exec_min_ms: f64,
    pub exec_max_ms: f64,
}

/// Runs the measurement with `shim` against `manifest`; returns the rows.
pub fn measure(ctx: &Ctx, shim: &Path, manifest: &Path) -> anyhow::Result<Vec<Row>> {
    let step = ctx.ui.stage("bench agent execs");
    let rootfs = crate::busybox::tempdir()?;
    let args = [
        "bench-exec".to_string(),
        "--image".into(),
        manifest.display().to_string(),
        "--rootfs".into(),
        rootfs.path().display().to_string(),
        "--count".into(),
        EXECS.to_string(),
        "--json".into(),
    ];
    let log = ctx.log_path("bench-exec");
    let out = duct::cmd(shim, &args)
        .stderr_path(&log)
        .stdout_capture()
        .unchecked()
        .run()?;
    if !out.status.success() {
        anyhow::bail!(
            "kiln-shim {} failed; see {}",
            args.join(" "),
            ctx.rel(&log).display()
        );
    }
    let b: BenchExec = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "kiln-shim bench-exec printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    step.done(&format!(
        "exec p50 {:.1} ms, p99 {:.1} ms",
        b.exec_p50_ms, b.exec_p99_ms
    ));
    Ok(rows(&b))
}

pub fn rows(b: &BenchExec) -> Vec<Row> {
    let n = b.execs;
    vec![
        row(
            "agent RSS, idle (after boot)",
            b.idle_rss_bytes as f64,
            "bytes",
            format!("{} fds", b.idle_fds),
        ),
        row(
            "agent RSS, one container running",
            b.container_rss_bytes as f64,
            "bytes",
            format!("{} fds", b.container_fds),
        ),
        row(
            format!("agent RSS, after {n} execs"),
            b.after_rss_bytes as f64,
            "bytes",
            format!(
                "{} fds; {:+.1} KiB since the container started",
                b.after_fds,
                (b.after_rss_bytes as f64 - b.container_rss_bytes as f64) / 1024.0
            ),
        ),
        row(
            "exec round trip p50 (ExecProcess+WaitProcess true)",
            b.exec_p50_ms,
            "ms",
            format!("{n} sequential execs in one container"),
        ),
        row(
            "exec round trip p99",
            b.exec_p99_ms,
            "ms",
            format!("min {:.1} ms, max {:.1} ms", b.exec_min_ms, b.exec_max_ms),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_from_the_shims_json() {
        let json = r#"{"agent_ready_seconds": 2.5, "idle_rss_bytes": 4194304, "idle_fds": 9,
            "container_rss_bytes": 5242880, "container_fds": 14, "execs": 200,
            "after_rss_bytes": 5246976, "after_fds": 14, "exec_p50_ms": 41.5,
            "exec_p99_ms": 80.25, "exec_min_ms": 30.0, "exec_max_ms": 95.0}"#;
        let b: BenchExec = serde_json::from_str(json).unwrap();
        let r = rows(&b);
        assert_eq!(r.len(), 5);
        assert_eq!(r[0].value, 4194304.0);
        assert_eq!(r[2].name, "agent RSS, after 200 execs");
        assert!(r[2].note.contains("+4.0 KiB"), "{}", r[2].note);
        assert_eq!((r[3].unit.as_str(), r[3].value), ("ms", 41.5));
        assert_eq!(r[4].value, 80.25);
    }
}
