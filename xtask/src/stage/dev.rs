//! `cargo xtask dev`: the agent developer's edit → boot loop.
//!
//! Rebuilds only what an edit changed (the agent with the quick `agent-dev`
//! cargo profile, the initrd and the manifest, under `target/kiln/dev/`; the
//! kernel comes from the cache), boots it with `kiln-shim boot --stay
//! --smoke`, streams the guest console with the agent's log at `--log`, and
//! prints how long each step took. The VM stays up for `kiln-shim exec` and
//! `kiln-shim agent` until Ctrl-C. `--watch` repeats the cycle on every save
//! under `agent/`; a build that fails leaves the running VM alone.
//!
//! Each cycle ends with one `dev-report: {json}` line (times, run dir, smoke
//! steps) for scripts, `cargo xtask bench` and the tests.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use notify::{EventKind, RecursiveMode, Watcher};
use serde::Serialize;

use crate::arch::Arch;
use crate::ctx::{AgentProfile, Ctx};
use crate::image_spec::ImageSpec;
use crate::stage::image;

/// `cargo xtask dev`.
#[derive(Args, Clone, Debug)]
pub struct DevFlags {
    #[arg(long, default_value = "x86_64")]
    pub arch: Arch,
    #[arg(long, default_value = "minimal")]
    pub image: String,
    /// Rebuild and reboot on every save under agent/ (a failed build keeps the old VM).
    #[arg(long)]
    pub watch: bool,
    /// The agent's log level in the guest: error, warn, info, debug, trace.
    #[arg(long, default_value = "info")]
    pub log: String,
    /// Build the agent with the release profile (real size, slow compile).
    #[arg(long)]
    pub release: bool,
    /// Root filesystem mode for the shim: initrd (default), image, nvdimm, virtio-blk.
    #[arg(long, value_name = "MODE")]
    pub rootfs: Option<String>,
    /// Build, boot, run the smoke sequence, shut down (no interactive VM).
    #[arg(long, conflicts_with = "watch")]
    pub once: bool,
    /// Stop after N cycles that passed the smoke sequence (for scripts and tests).
    #[arg(long, value_name = "N")]
    pub cycles: Option<usize>,
}

/// What one cycle measured.
#[derive(Serialize, Debug)]
pub struct CycleReport {
    pub cycle: usize,
    /// cargo compiling the agent (0 when its stamp was current).
    pub cargo_seconds: f64,
    /// Everything else before QEMU: stamps, initrd, manifest.
    pub pipeline_seconds: f64,
    /// QEMU launch → the agent's first answer, as the shim measured it.
    pub agent_ready_seconds: f64,
    /// From the edit (or the command's start) to agent-ready, without cargo:
    /// the number the loop is judged by.
    pub ready_outside_cargo_seconds: f64,
    pub run_dir: Option<String>,
    pub smoke: serde_json::Value,
}

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace"];

/// The flags that can be wrong together, checked before anything is built.
fn check_flags(f: &DevFlags, image: &ImageSpec) -> anyhow::Result<()> {
    if !LOG_LEVELS.contains(&f.log.as_str()) {
        anyhow::bail!("--log {}: use one of {}", f.log, LOG_LEVELS.join(", "));
    }
    if f.once && f.watch {
        anyhow::bail!("--once and --watch contradict each other: pick one");
    }
    if !image.arches.contains(&f.arch) {
        anyhow::bail!(
            "image {} is not built for {}; its manifest lists {:?}",
            image.name,
            f.arch,
            image.arches.iter().map(|a| a.name()).collect::<Vec<_>>()
        );
    }
    Ok(())
}

pub fn run(ctx: &Ctx, f: &DevFlags) -> anyhow::Result<()> {
    let image = ImageSpec::load(ctx, &f.image)?;
    check_flags(f, &image)?;
    ctx.ensure_setup(&[f.arch])?;
    let profile = if f.release {
        AgentProfile::Release
    } else {
        println!(
            "dev: the agent is an unoptimised build (cargo profile agent-dev): its size and speed differ from release images (--release builds those)"
        );
        AgentProfile::Dev
    };
    let dctx = ctx.for_dev(profile);
    // Packing and boot speed beat size here: an uncompressed initrd costs no
    // time to pack, and under TCG the guest's own decompressor is emulated
    // (`cargo xtask bench --initrd-cost`: zstd was the slowest to boot, gzip
    // next, on every arch).
    let mut image = image;
    image.compression = "none".into();
    image.compression_level = None;
    let shim = build_shim(ctx)?;
    let busybox = if f.arch == Arch::host() {
        let dir = dctx.out.join("busybox");
        crate::busybox::persistent(&dir)?;
        Some(dir)
    } else {
        println!(
            "dev: the smoke container uses the host's busybox; a {} guest gets Check and GetGuestDetails only",
            f.arch
        );
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the Ctrl-C handler")?;
    }
    let loop_ = Loop {
        dctx: &dctx,
        image: &image,
        flags: f,
        shim: &shim,
        busybox: busybox.as_deref(),
        stop: &stop,
    };

    let built = loop_.build(Instant::now())?;
    let mut vm = loop_.boot(1, built)?;
    let passed = 1;
    if f.once {
        let status = vm.wait()?;
        if !status.success() {
            anyhow::bail!("kiln-shim exited with {status}");
        }
        return Ok(());
    }
    if f.cycles.is_some_and(|n| passed >= n) {
        vm.stop();
        return Ok(());
    }
    if !f.watch {
        println!("dev: Ctrl-C stops the VM");
        while !stop.load(Ordering::Relaxed) && vm.running() {
            std::thread::sleep(Duration::from_millis(100));
        }
        vm.stop();
        return Ok(());
    }

    watch(ctx, &loop_, vm, passed)
}

/// `--watch`: rebuild and reboot on every save under agent/ until Ctrl-C or
/// `--cycles` passed cycles; a failed build keeps the running VM.
fn watch(ctx: &Ctx, loop_: &Loop, vm: RunningVm, mut passed: usize) -> anyhow::Result<()> {
    let f = loop_.flags;
    let stop = loop_.stop;
    let (tx, rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |ev| {
        let _ = tx.send(ev);
    })
    .context("starting the file watcher (inotify)")?;
    let agent_dir = ctx.root.join("agent");
    watcher
        .watch(&agent_dir, RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", agent_dir.display()))?;
    println!("dev: watching agent/ for saves; Ctrl-C stops");
    let mut vm = Some(vm);
    let mut cycle = 1;
    while !stop.load(Ordering::Relaxed) && f.cycles.is_none_or(|n| passed < n) {
        if let Some(v) = vm.as_mut() {
            if !v.running() {
                let note = v.exit_note();
                println!(
                    "dev: the VM of cycle {} stopped ({note}); waiting for the next save",
                    v.cycle
                );
                vm = None;
            }
        }
        let changed = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(ev)) => match relevant_path(&ev, &ctx.root) {
                Some(p) => p,
                None => continue,
            },
            Ok(Err(e)) => {
                println!("dev: file watcher: {e}");
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the file watcher stopped")
            }
        };
        let saved = Instant::now();
        // Editors save in bursts (temp file, rename, chmod): let it settle.
        while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
        cycle += 1;
        println!(
            "dev: cycle {cycle}: {} changed; rebuilding",
            changed.display()
        );
        let built = match loop_.build(saved) {
            Ok(b) => b,
            Err(e) => {
                match &vm {
                    Some(v) => println!(
                        "dev: cycle {cycle}: build failed; the VM of cycle {} keeps running{}\n{e:#}",
                        v.cycle,
                        v.run_dir
                            .as_deref()
                            .map(|d| format!(" (run dir {d})"))
                            .unwrap_or_default()
                    ),
                    None => println!("dev: cycle {cycle}: build failed\n{e:#}"),
                }
                continue;
            }
        };
        if let Some(old) = vm.take() {
            old.stop();
        }
        match loop_.boot(cycle, built) {
            Ok(v) => {
                vm = Some(v);
                passed += 1;
            }
            Err(e) => println!("dev: cycle {cycle}: {e:#}"),
        }
    }
    if let Some(v) = vm {
        v.stop();
    }
    Ok(())
}

struct Loop<'a> {
    dctx: &'a Ctx,
    image: &'a ImageSpec,
    flags: &'a DevFlags,
    shim: &'a Path,
    busybox: Option<&'a Path>,
    stop: &'a AtomicBool,
}

struct Built {
    manifest: PathBuf,
    started: Instant,
    cargo_seconds: f64,
    pipeline_seconds: f64,
}

impl Loop<'_> {
    /// Agent, initrd and manifest (the kernel from its cache); `started` is
    /// when the edit was seen.
    fn build(&self, started: Instant) -> anyhow::Result<Built> {
        let cargo_file = self.dctx.out.join("agent-cargo-seconds");
        let _ = std::fs::remove_file(&cargo_file);
        let with_disk = self.flags.rootfs.as_deref().is_some_and(|m| m != "initrd");
        let manifest = image::build_with(self.dctx, self.image, self.flags.arch, None, with_disk)?;
        let cargo_seconds = std::fs::read_to_string(&cargo_file)
            .ok()
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        let pipeline_seconds = (started.elapsed().as_secs_f64() - cargo_seconds).max(0.0);
        Ok(Built {
            manifest,
            started,
            cargo_seconds,
            pipeline_seconds,
        })
    }

    /// Starts the shim on `built` and waits until its smoke sequence passed.
    fn boot(&self, cycle: usize, built: Built) -> anyhow::Result<RunningVm> {
        let f = self.flags;
        let mut args: Vec<String> = vec![
            "--log".into(),
            "warn".into(),
            "boot".into(),
            "--image".into(),
            built.manifest.display().to_string(),
            "--json".into(),
            "--console".into(),
            "--smoke".into(),
            "--kernel-params".into(),
            format!("quiet agent.log={}", f.log),
        ];
        if !f.once {
            args.push("--stay".into());
        }
        if let Some(dir) = self.busybox {
            args.extend(["--share".into(), dir.display().to_string()]);
        }
        if let Some(mode) = &f.rootfs {
            args.extend(["--rootfs".into(), mode.clone()]);
        }
        let spawned = Instant::now();
        let mut child = Command::new(self.shim)
            .args(&args)
            // Not the terminal: QEMU's stdio console would take it over (raw
            // mode), and Ctrl-C must reach us and the shim as a signal.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", self.shim.display()))?;
        let stdout = child.stdout.take().context("kiln-shim has no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || relay(stdout, tx));
        let mut vm = RunningVm {
            child,
            cycle,
            run_dir: None,
        };
        let json = loop {
            if self.stop.load(Ordering::Relaxed) {
                vm.stop();
                anyhow::bail!("interrupted while booting");
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(v) => break v,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = vm.wait()?;
                    anyhow::bail!(
                        "kiln-shim exited ({status}) before the agent passed the smoke sequence; its error is above"
                    );
                }
            }
        };
        let answered = spawned.elapsed().as_secs_f64();
        let smoke_ms: f64 = json["smoke"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s["ms"].as_f64()).sum())
            .unwrap_or(0.0);
        let agent_ready = json["agent_ready_seconds"].as_f64().unwrap_or(0.0);
        // Edit → the shim's answer, minus cargo and the smoke steps that ran
        // after the agent was ready.
        let ready_outside_cargo =
            (built.started.elapsed().as_secs_f64() - built.cargo_seconds - smoke_ms / 1000.0)
                .max(0.0);
        vm.run_dir = json["run_dir"].as_str().map(str::to_string);
        let report = CycleReport {
            cycle,
            cargo_seconds: ms(built.cargo_seconds),
            pipeline_seconds: ms(built.pipeline_seconds),
            agent_ready_seconds: ms(agent_ready),
            ready_outside_cargo_seconds: ms(ready_outside_cargo),
            run_dir: vm.run_dir.clone(),
            smoke: json["smoke"].clone(),
        };
        print_report(&report, answered - smoke_ms / 1000.0);
        Ok(vm)
    }
}

/// Seconds rounded to the millisecond, for the report.
fn ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round() / 1000.0
}

fn print_report(r: &CycleReport, shim_to_ready: f64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "dev: cycle {} ready", r.cycle);
    let _ = writeln!(
        out,
        "  agent compile (cargo)      {:>7.2} s",
        r.cargo_seconds
    );
    let _ = writeln!(
        out,
        "  initrd + manifest          {:>7.2} s",
        r.pipeline_seconds
    );
    let _ = writeln!(
        out,
        "  shim start → agent ready   {:>7.2} s  (QEMU launch → ready {:.2} s)",
        shim_to_ready, r.agent_ready_seconds
    );
    for s in r.smoke.as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  smoke {:<20} {:>7.1} ms  {}",
            s["step"].as_str().unwrap_or("?"),
            s["ms"].as_f64().unwrap_or(0.0),
            s["detail"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(
        out,
        "  edit → agent ready without cargo: {:.2} s",
        r.ready_outside_cargo_seconds
    );
    if let Some(dir) = &r.run_dir {
        let _ = writeln!(
            out,
            "  VM up: kiln-shim exec --vm {dir} -t -- sh   |   kiln-shim agent --vm {dir} GetGuestDetails"
        );
    }
    let _ = writeln!(
        out,
        "dev-report: {}",
        serde_json::to_string(r).unwrap_or_default()
    );
}

/// Copies the shim's stdout (the guest console, then its JSON answer) to
/// ours, handing the JSON line to the loop instead of printing it.
fn relay(stdout: std::process::ChildStdout, tx: mpsc::Sender<serde_json::Value>) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.starts_with(b"{\"") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                if v.get("agent_ready_seconds").is_some() {
                    let _ = tx.send(v);
                    continue;
                }
            }
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&line);
        let _ = out.flush();
    }
}

/// The path of a watch event worth a rebuild, relative to the checkout:
/// a source file written, created or removed; not editor droppings or build output.
fn relevant_path(ev: &notify::Event, root: &Path) -> Option<PathBuf> {
    if !matches!(
        ev.kind,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
    ) {
        return None;
    }
    ev.paths.iter().find_map(|p| {
        let rel = p.strip_prefix(root).ok()?;
        let name = rel.file_name()?.to_str()?;
        let noise = name.starts_with('.')
            || name.ends_with('~')
            || name.ends_with(".swp")
            || name.ends_with(".tmp")
            || name == "4913"
            || rel.components().any(|c| c.as_os_str() == "target");
        (!noise).then(|| rel.to_path_buf())
    })
}

/// The debug kiln-shim the loop drives (built once per `dev` run).
fn build_shim(ctx: &Ctx) -> anyhow::Result<PathBuf> {
    let step = ctx.ui.stage("kiln-shim");
    crate::cmd::run_logged(
        ctx,
        "dev-shim",
        "cargo build -p kiln-shim",
        duct::cmd!("cargo", "build", "--locked", "-p", "kiln-shim").dir(&ctx.root),
    )?;
    step.done("target/debug/kiln-shim");
    Ok(ctx.root.join("target/debug/kiln-shim"))
}

/// A shim (and its VM) started by the loop; stopped with SIGINT so it tears
/// the VM down itself, killed if it does not within 30 s.
struct RunningVm {
    child: Child,
    cycle: usize,
    run_dir: Option<String>,
}

impl RunningVm {
    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn exit_note(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            _ => "running".into(),
        }
    }

    fn wait(&mut self) -> anyhow::Result<ExitStatus> {
        self.child.wait().context("waiting for kiln-shim")
    }

    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if !self.running() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid, not yet reaped (try_wait said running).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if !self.running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind};

    fn ev(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn saves_of_sources_count_and_editor_noise_does_not() {
        let root = Path::new("/k");
        let write = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        assert_eq!(
            relevant_path(&ev(write, "/k/agent/src/rpc.rs"), root),
            Some(PathBuf::from("agent/src/rpc.rs"))
        );
        assert_eq!(
            relevant_path(
                &ev(EventKind::Create(CreateKind::File), "/k/agent/src/new.rs"),
                root
            ),
            Some(PathBuf::from("agent/src/new.rs"))
        );
        for noise in [
            "/k/agent/src/.rpc.rs.swp",
            "/k/agent/src/rpc.rs~",
            "/k/agent/src/4913",
            "/k/agent/target/debug/x",
        ] {
            assert_eq!(relevant_path(&ev(write, noise), root), None, "{noise}");
        }
        assert_eq!(
            relevant_path(
                &ev(
                    EventKind::Access(notify::event::AccessKind::Any),
                    "/k/agent/src/rpc.rs"
                ),
                root
            ),
            None
        );
    }
}
