//! Host-side VFIO for real, nested (issue #9 item 5): a TCG guest with a
//! virtual IOMMU and an `edu` device (L1) plays the host. It runs this
//! kiln-shim, which binds L1's edu to vfio-pci, passes it to an inner VM (L2,
//! the minimal image) with `--device vfio:BDF`, and restores the driver when
//! the VM ends. `nested_vfio.sh` assembles L1's initrd (busybox, Debian's QEMU
//! with its libraries, TCG module and firmware, virtiofsd, vhost-device-vsock,
//! this kiln-shim, the L2 image) and boots it.
//!
//! TCG inside TCG is slow (about 95-105 s in all on 2 cores; L1 reaches its
//! /init in ~3 s, the L2 agent answers 62-86 s after the inner QEMU starts),
//! and not yet reliable: in some runs (3 of 9 on 2026-11-26) the L2 agent
//! listens but kiln-shim's vsock CONNECTs through vhost-device-vsock 0.3.0 in
//! L1 are never answered (cause not found yet; the backend's hundreds of
//! "Received a backend event before vring initialization" warnings while L2
//! boots appear in passing runs too); the shim then gives up after
//! `boot_timeout` (600 s here). So this is not part of
//! `cargo xtask test`. Run it with
//!
//! ```sh
//! cargo xtask build-image     # the x86_64 minimal image
//! KILN_NESTED=1 cargo test -p kiln-shim --test nested_vfio -- --ignored --nocapture
//! ```
//!
//! KILN_E2E_MANIFEST names another x86_64 image; KILN_NESTED_TIMEOUT bounds
//! the L1 run in seconds (default 1200).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn manifest() -> PathBuf {
    match std::env::var_os("KILN_E2E_MANIFEST") {
        Some(m) => PathBuf::from(m),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/kiln/minimal/x86_64/manifest.json"),
    }
}

/// The value after `prefix` on the first line of `out` that has it.
fn field<'a>(out: &'a str, prefix: &str) -> Option<&'a str> {
    out.lines().find_map(|l| {
        l.find(prefix)
            .map(|i| l[i + prefix.len()..].trim_end_matches('\r').trim())
    })
}

#[test]
#[ignore = "nested TCG, minutes: KILN_NESTED=1 cargo test -p kiln-shim --test nested_vfio -- --ignored"]
fn l1_guest_as_host_passes_its_edu_to_an_inner_vm() {
    if std::env::var("KILN_NESTED").as_deref() != Ok("1") {
        eprintln!("skipping: set KILN_NESTED=1 to run the nested VFIO test");
        return;
    }
    let manifest = manifest();
    assert!(
        manifest.exists(),
        "{} is missing: run `cargo xtask build-image`",
        manifest.display()
    );
    let work = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nested_vfio.sh");
    let started = Instant::now();
    let out = Command::new("sh")
        .arg(&script)
        .arg(&manifest)
        .arg(env!("CARGO_BIN_EXE_kiln-shim"))
        .arg(work.path())
        .stdin(Stdio::null())
        .output()
        .expect("running nested_vfio.sh");
    let total = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.contains("nested:")
                || l.contains("INFO")
                || l.contains("WARN")
                || l.contains("ERROR")
                || l.contains("error:")
                || l.contains("PCI=")
                || l.contains("NESTED-VFIO")
        })
        .collect();
    eprintln!(
        "{}\nfigure: nested VFIO run (L1 initrd build, L1 boot, L2 run, restore): {total:.1} s",
        summary.join("\n")
    );
    let all = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    let l1_bdf = field(&stdout, "nested: edu at ")
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("L1 found no edu device\n{all}"))
        .to_string();
    assert!(
        stdout.contains(&format!("{l1_bdf} bound to vfio-pci")),
        "kiln-shim did not bind {l1_bdf}\n{all}"
    );
    let guest_bdf = field(&stdout, "PCI=").unwrap_or_else(|| panic!("no PCI= line\n{all}"));
    assert_ne!(guest_bdf, l1_bdf, "PCIDEVICE_TEST not rewritten\n{all}");
    assert!(
        guest_bdf.len() == 12 && guest_bdf.starts_with("0000:"),
        "PCIDEVICE_TEST is not a guest PCI address: {guest_bdf}\n{all}"
    );
    // The container's `ls -l /dev/vfio`: a group node besides `vfio` (L1's
    // own listing, after the restore, has only `vfio`).
    let group_node = stdout.lines().any(|l| {
        l.contains("crw")
            && l.split_whitespace()
                .last()
                .is_some_and(|n| n.parse::<u32>().is_ok())
    });
    assert!(group_node, "the container saw no /dev/vfio/<group>\n{all}");
    assert!(
        stdout.contains("nested: kiln-shim run exit status 0"),
        "kiln-shim run failed inside L1\n{all}"
    );
    assert!(
        stdout.contains("NESTED-VFIO-DONE"),
        "the edu device was not restored in L1\n{all}"
    );
    assert!(out.status.success(), "{all}");
}
