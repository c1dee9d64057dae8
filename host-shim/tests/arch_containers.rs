//! End-to-end on every arch: containers in a real VM under TCG, their rootfs
//! the `shell` container rootfs (rootfs-recipes/shell.toml: Debian minbase)
//! built for the guest's arch, which `cargo xtask test` names in
//! KILN_E2E_SHELL_ROOTFS next to the image's KILN_E2E_MANIFEST.
//!
//! The same checks run on each way a rootfs reaches the guest: a virtio-blk
//! disk image of it (Kata's block-based rootfs: `blk` with a PCI path, or
//! `blk-ccw` with a CCW bus id on s390x) and the virtio-fs share where
//! virtiofsd serves the guest (`kiln_shim::rootfs_disk::virtio_fs_serves`:
//! not s390x, big-endian, nor ppc64le, whose open(2) flags differ, from an
//! x86_64 host).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use kiln_manifest::Arch;
use kiln_shim::config::ShimConfig;
use kiln_shim::rootfs_disk::virtio_fs_serves;
use kiln_testsupport::spec::with_memory_limit;
use kiln_testsupport::vm::{
    boot_sandbox_with, manifest, process, rootfs_copy, shim_spec, RootfsTo, SandboxVm,
};
use sha2::Digest;

const ROOTFS_VAR: &str = "KILN_E2E_SHELL_ROOTFS";
/// A file every `shell` rootfs has (dash, the default /bin/sh).
const MARKER: &str = "usr/bin/dash";

fn arch() -> Arch {
    kiln_shim::image::BootImage::load(&manifest())
        .unwrap_or_else(|e| panic!("{e:#}"))
        .manifest
        .arch
}

/// 1 MiB that is not all one byte, and its sha256 as `sha256sum` prints it.
fn mib() -> (Vec<u8>, String) {
    let data = kiln_testsupport::vm::one_mib();
    let sum = sha2::Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (data, sum)
}

/// `kiln-shim run` as a user types it (`--rootfs-via auto`: virtio-fs where
/// it serves the guest, else the block disk): stdout, stderr, the exit
/// status and 1 MiB of stdin.
#[test]
#[ignore = "boots a VM; run through `cargo xtask test`"]
fn kiln_shim_run_streams_and_exits_on_this_arch() {
    let arch = arch();
    let rootfs = rootfs_copy(ROOTFS_VAR, MARKER);
    let base = tempfile::tempdir().unwrap();
    let (data, sum) = mib();
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln-shim"))
        .env("KILN_RUN_DIR", base.path())
        .args(["run", "--image"])
        .arg(manifest())
        .arg("--rootfs")
        .arg(rootfs.path())
        .args([
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; head -c 1048576 | sha256sum; uname -m; exit 7",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    // A shim that failed early closed the pipe: its stderr says why, below.
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "figure: {arch} kiln-shim run, launch to exit: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.first(),
        Some(&"out"),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        lines.get(1).and_then(|l| l.split_whitespace().next()),
        Some(sum.as_str()),
        "1 MiB of stdin reached the container whole: {stdout}"
    );
    // Arch names are `uname -m`'s.
    let machine = arch.name();
    assert_eq!(lines.get(2), Some(&machine), "{stdout}");
    assert!(stderr.contains("err\n"), "{stderr}");
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    let on_disk = stderr.contains("rootfs on a virtio-blk disk, guest blk");
    assert_eq!(
        on_disk,
        !virtio_fs_serves(Arch::host(), arch),
        "--rootfs-via auto is the block disk where the share cannot serve: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(base.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "run directories left: {left:?}");
}

/// One VM with the rootfs both on a virtio-blk disk and (but on s390x) on
/// the share; the same container checks on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a VM; run through `cargo xtask test`"]
async fn containers_on_a_rootfs_disk_and_on_the_share() {
    let arch = arch();
    let share = virtio_fs_serves(Arch::host(), arch).then_some("share");
    if share.is_none() {
        eprintln!(
            "note: {arch}: no virtio-fs share: virtiofsd on {} does not translate this guest's FUSE requests (byte order or open(2) flags); the disk only",
            Arch::host()
        );
    }
    let mut sb = kiln_protocol::agent::CreateSandboxRequest::new();
    sb.sandbox_id = "sb".into();
    sb.hostname = "kiln-arch".into();
    let t = Instant::now();
    let g = boot_sandbox_with(
        &ShimConfig::default(),
        &manifest(),
        rootfs_copy(ROOTFS_VAR, MARKER),
        RootfsTo {
            share_id: share,
            disk: true,
        },
        sb,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let disk =
        g.vm.container_disk
            .clone()
            .expect("the rootfs disk is attached");
    let expect = if arch == Arch::S390x {
        "blk-ccw"
    } else {
        "blk"
    };
    assert_eq!(disk.driver, expect, "Kata's driver for a {arch} disk");
    let storage = kiln_shim::run::rootfs_disk_storage(&disk, "disk");
    checks(&g, arch, "disk", vec![storage], false).await;
    eprintln!(
        "{arch}: rootfs disk checks done at {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if let Some(share) = share {
        checks(&g, arch, share, vec![], true).await;
        eprintln!(
            "{arch}: share checks done at {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    g.shutdown().await;
}

/// Container `id` (its root `<share>/<id>/rootfs`, mounted by `storages`)
/// under a 64 MiB memory limit, and in it: an exec's stdout, stderr and
/// status; 1 MiB through an exec's stdin; a signal; the OOM killer; and a
/// write that reaches the host directory only when the rootfs is `shared`.
async fn checks(
    g: &SandboxVm,
    arch: Arch,
    id: &str,
    storages: Vec<kiln_protocol::agent::Storage>,
    shared: bool,
) {
    let mut spec = with_memory_limit(shim_spec(&["sleep", "1000000"], id), 64 << 20);
    // runc's default spec (the shim's) has a read-only root; docker's does not.
    spec.Root.mut_or_insert_default().Readonly = false;
    g.create(id, spec, storages)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}{}", g.vm.diagnostics()));
    g.start(id).await;
    let sh = |script: &str| process(&["/bin/sh", "-c", script]);

    let (st, out, err) = g
        .exec_outcome(
            id,
            "io",
            sh("echo out; echo err >&2; cat /sys/fs/cgroup/memory.max; exit 3"),
        )
        .await;
    assert_eq!(
        (st, out.as_str(), err.as_str()),
        (3, "out\n67108864\n", "err\n"),
        "{id}"
    );

    let (data, sum) = mib();
    g.exec_process(id, "stdin", sh("sha256sum")).await;
    for chunk in data.chunks(256 * 1024) {
        g.write(id, "stdin", chunk).await;
    }
    let mut close = kiln_protocol::agent::CloseStdinRequest::new();
    close.container_id = id.into();
    close.exec_id = "stdin".into();
    g.agent().close_stdin(g.client.ctx(), &close).await.unwrap();
    let (st, out, _) = g.outcome(id, "stdin").await;
    assert_eq!(
        (st, out.split_whitespace().next()),
        (0, Some(sum.as_str())),
        "{id}"
    );

    g.exec_process(id, "sleeper", sh("exec sleep 1000")).await;
    g.signal(id, "sleeper", libc::SIGTERM as u32).await;
    assert_eq!(
        g.wait(id, "sleeper").await,
        128 + libc::SIGTERM,
        "{id}: SIGTERM"
    );

    // `tail` keeps the last line, and /dev/zero has no newline: it grows
    // until the container's memory.max stops it.
    g.exec_process(id, "hog", sh("exec tail /dev/zero")).await;
    assert_eq!(
        g.wait(id, "hog").await,
        137,
        "{id}: the OOM killer's SIGKILL"
    );

    let (st, _, err) = g
        .exec_outcome(id, "write", sh("echo from-the-guest > /written-here"))
        .await;
    assert_eq!(st, 0, "{id}: the rootfs is writable: {err}");
    let on_host = g.host("written-here").exists();
    assert_eq!(
        on_host, shared,
        "{id}: a write in the container reaches the host directory only over the share"
    );
    let _ = std::fs::remove_file(g.host("written-here"));

    // O_DIRECT: an aarch64 guest's flag value is the host's O_DIRECTORY
    // (rootfs_disk::virtio_fs_serves), so on an x86_64 host's share it fails.
    let mismatch = shared && arch == Arch::Aarch64 && Arch::host() == Arch::X86_64;
    let (st, _, err) = g
        .exec_outcome(
            id,
            "direct",
            sh("dd if=/etc/hosts of=/dev/null iflag=direct bs=4096"),
        )
        .await;
    if mismatch {
        assert!(
            st != 0 && err.contains("Not a directory"),
            "{id}: {st} {err}"
        );
        eprintln!(
            "note: aarch64 guest, x86_64 host: O_DIRECT on the share fails as documented: {}",
            err.trim()
        );
    } else {
        assert_eq!(st, 0, "{id}: an O_DIRECT read: {err}");
    }
    g.remove(id).await;
}
