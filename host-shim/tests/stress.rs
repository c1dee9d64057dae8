//! Stress under TCG: many execs and container create/remove cycles in one VM
//! with the agent's fds and RSS checked for growth, and VMs booted and torn
//! down in a row with nothing left on the host.
//!
//! The default sizes keep `cargo xtask test` short; `cargo xtask test
//! --stress` (KILN_STRESS=long) runs the full ones: 1,000 execs, 50 cycles,
//! 20 VMs.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_protocol::agent;
use kiln_shim::bench_exec::AgentUsage;
use kiln_shim::client::AgentClient;
use kiln_shim::config::ShimConfig;
use kiln_shim::image::BootImage;
use kiln_testsupport::vm::manifest;
use protobuf::MessageField;

/// (default, long) picked by KILN_STRESS=long.
fn size(default: usize, long: usize) -> usize {
    if std::env::var("KILN_STRESS").as_deref() == Ok("long") {
        long
    } else {
        default
    }
}

async fn usage(c: &AgentClient) -> AgentUsage {
    let m = c
        .agent
        .get_metrics(c.ctx(), &agent::GetMetricsRequest::new())
        .await
        .expect("GetMetrics");
    AgentUsage::parse(&m.metrics).unwrap()
}

/// Growth allowed after the run: a few fds (none is leaked per operation,
/// but tokio and the allocator settle), 1.5 MiB of RSS (allocator arenas;
/// a per-exec leak of even 2 KiB over 1,000 execs would exceed it).
fn assert_flat(what: &str, before: AgentUsage, after: AgentUsage) {
    eprintln!(
        "{what}: fds {} → {}, RSS {} KiB → {} KiB",
        before.fds,
        after.fds,
        before.rss_bytes / 1024,
        after.rss_bytes / 1024
    );
    assert!(
        after.fds <= before.fds + 3,
        "{what}: fds grew {} → {}",
        before.fds,
        after.fds
    );
    assert!(
        after.rss_bytes <= before.rss_bytes + (1536 << 10),
        "{what}: RSS grew {} → {} bytes",
        before.rss_bytes,
        after.rss_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn execs_and_container_cycles_leave_fds_and_rss_flat() {
    let execs = size(200, 1000);
    let cycles = size(10, 50);
    let run_base = tempfile::tempdir().unwrap();
    std::env::set_var("KILN_RUN_DIR", run_base.path());
    let rootfs = tempfile::tempdir().unwrap();
    kiln_testsupport::vm::write_busybox_rootfs(rootfs.path()).unwrap();
    let cfg = ShimConfig::load(None).unwrap();
    let image = BootImage::load(&manifest()).unwrap();

    // Execs: the shim's own exec bench, which reads the agent's usage around them.
    let t = Instant::now();
    let r = kiln_shim::bench_exec::run(&cfg, &image, rootfs.path(), execs)
        .await
        .unwrap();
    eprintln!(
        "{execs} execs in {:.1} s: p50 {:.1} ms, p99 {:.1} ms",
        t.elapsed().as_secs_f64(),
        r.exec_p50_ms,
        r.exec_p99_ms
    );
    assert_eq!(r.execs, execs);
    assert_flat(
        &format!("{execs} execs"),
        AgentUsage {
            rss_bytes: r.container_rss_bytes,
            fds: r.container_fds,
        },
        AgentUsage {
            rss_bytes: r.after_rss_bytes,
            fds: r.after_fds,
        },
    );

    // Container cycles: create, start, wait, remove, in one sandbox.
    let mut sandbox = agent::CreateSandboxRequest::new();
    sandbox.sandbox_id = "stress".into();
    let booted = kiln_testsupport::vm::boot_sandbox(&cfg, &manifest(), rootfs, "share", sandbox)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (vm, c) = (booted.vm, booted.client);
    let spec = kiln_shim::spec::default_spec(&["true".into()], &[], false).unwrap();
    let proto = kiln_shim::run::protocol_spec(&spec, "share").unwrap();
    // One cycle first, so lazily created state (cgroup parents, the share's
    // mount) is in the baseline.
    cycle(&c, "warm", &proto).await;
    let before = usage(&c).await;
    let t = Instant::now();
    for i in 0..cycles {
        cycle(&c, &format!("c{i}"), &proto).await;
    }
    eprintln!(
        "{cycles} container cycles in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let after = usage(&c).await;
    assert_flat(&format!("{cycles} container cycles"), before, after);
    drop(c);
    vm.shutdown();
}

/// CreateContainer + StartContainer of `true`, WaitProcess, RemoveContainer.
async fn cycle(c: &AgentClient, id: &str, proto: &kiln_protocol::oci::Spec) {
    let mut create = agent::CreateContainerRequest::new();
    create.container_id = id.into();
    create.exec_id = id.into();
    create.OCI = MessageField::some(proto.clone());
    c.agent
        .create_container(c.ctx(), &create)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e}"));
    let mut start = agent::StartContainerRequest::new();
    start.container_id = id.into();
    c.agent
        .start_container(c.ctx(), &start)
        .await
        .unwrap_or_else(|e| panic!("StartContainer {id}: {e}"));
    let mut wait = agent::WaitProcessRequest::new();
    wait.container_id = id.into();
    wait.exec_id = id.into();
    let status = c
        .agent
        .wait_process(c.ctx(), &wait)
        .await
        .unwrap_or_else(|e| panic!("WaitProcess {id}: {e}"))
        .status;
    assert_eq!(status, 0, "container {id}");
    let mut rm = agent::RemoveContainerRequest::new();
    rm.container_id = id.into();
    rm.timeout = 10;
    c.agent
        .remove_container(c.ctx(), &rm)
        .await
        .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
}

/// Processes whose command line mentions `base`, and entries left in it.
fn leftovers(base: &Path) -> Vec<String> {
    let needle = base.display().to_string();
    let mut hits: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(false);
            (cmd.contains(&needle) && !zombie && pid != std::process::id())
                .then(|| format!("{pid}: {cmd}"))
        })
        .collect();
    hits.extend(
        std::fs::read_dir(base)
            .unwrap()
            .flatten()
            .map(|e| format!("left in run base: {}", e.path().display())),
    );
    hits
}

/// Unix sockets the host has open whose path is under `base` (from /proc/net/unix).
fn sockets_under(base: &Path) -> Vec<String> {
    let needle = base.display().to_string();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

#[test]
#[ignore = "boots VMs; run through `cargo xtask test`"]
fn vms_boot_and_tear_down_in_a_row_without_leaks() {
    let vms = size(3, 20);
    let base = tempfile::tempdir().unwrap();
    let mut times = Vec::new();
    for i in 0..vms {
        let t = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
            .env("KILN_RUN_DIR", base.path())
            .args(["boot", "--json", "--image"])
            .arg(manifest())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "boot {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        times.push(t.elapsed().as_secs_f64());
        // Reaping by init can lag a moment behind the shim's exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(leftovers(base.path()).is_empty() && sockets_under(base.path()).is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            leftovers(base.path()).is_empty(),
            "after VM {i}: {:?}",
            leftovers(base.path())
        );
        assert!(
            sockets_under(base.path()).is_empty(),
            "after VM {i}: {:?}",
            sockets_under(base.path())
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    eprintln!(
        "{vms} VMs booted to agent-ready and torn down: median {:.2} s, max {:.2} s each",
        times[times.len() / 2],
        times[times.len() - 1]
    );
}
