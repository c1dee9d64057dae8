//! kiln-agent: the guest side of kiln. Runs as PID 1 in an initrd or as a
//! systemd service, and serves the Kata agent protocol over ttrpc on vsock.
//!
//! Invariant: as PID 1 this process never exits and never lets a panic
//! escape; failures are logged and the server is restarted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::config::AgentConfig;
use kiln_agent::guest::GuestFs;
use kiln_agent::rpc::{self, AgentState};
use kiln_agent::sandbox::{AgentPaths, Sandbox};
use kiln_agent::{container, debug_console, init, reaper, server};

fn main() {
    let pid1 = init::is_pid1();
    // The container helper is this binary re-executed; it must not touch
    // logging, the console or anything else of the agent's. PID 1 is never
    // the helper: the kernel passes unknown command-line words to init's argv.
    if !pid1
        && std::env::args_os()
            .nth(1)
            .is_some_and(|a| a == container::wire::HELPER_ARG)
    {
        container::child::helper_main();
    }
    let (early_notes, early_problems) = if pid1 {
        init::setup_pid1()
    } else {
        (Vec::new(), Vec::new())
    };
    let cmdline = init::kernel_cmdline(Path::new("/proc"));
    let (mut config, warnings) = AgentConfig::from_cmdline(&cmdline);
    // Outside a VM (tests, development) the address can be given directly.
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(addr) = flag("--server-addr") {
        config.server_addr = addr;
    }
    if let Some(p) = flag("--policy-file") {
        config.policy_file = Some(p.into());
    }
    // Development and host tests: where runtime state and cgroups live.
    let mut paths = AgentPaths::default();
    if let Some(d) = flag("--run-dir") {
        paths.run_dir = d.into();
    }
    if let Some(d) = flag("--cgroup-root") {
        paths.cgroup_root = d.into();
    }
    paths.no_pivot = args.iter().any(|a| a == "--no-pivot-root");
    let console = match flag("--debug-console-addr")
        .as_deref()
        .and_then(|a| a.strip_prefix("unix://"))
    {
        Some(p) => Some(debug_console::ConsoleAddr::Unix(p.into())),
        None if config.debug_console => Some(debug_console::ConsoleAddr::Vsock(
            config.debug_console_vport,
        )),
        None => None,
    };
    // Only outside PID 1: a `--version` on the kernel command line must not
    // make init return.
    if !pid1 && args.iter().any(|a| a == "--version") {
        println!("kiln-agent {}", rpc::AGENT_VERSION);
        return;
    }
    init_logging(&config.log_level);
    std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
    for n in &early_notes {
        tracing::info!("start-up: {n}");
    }
    for p in &early_problems {
        tracing::warn!("start-up: {p}");
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(version = rpc::AGENT_VERSION, pid1, addr = %config.server_addr, "kiln-agent starting");
    // Before the server: no request is served without the policy in force.
    let policy = kiln_agent::policy::install_initial(config.policy_file.as_deref());
    tracing::info!("agent policy: {policy}");

    loop {
        let cfg = config.clone();
        let p = paths.clone();
        let c = console.clone();
        let outcome = std::panic::catch_unwind(move || run(cfg, p, c, pid1));
        match outcome {
            Ok(Ok(())) => tracing::error!("server stopped"),
            Ok(Err(e)) => tracing::error!("server failed: {e:#}"),
            Err(_) => tracing::error!("server panicked"),
        }
        if !pid1 {
            // A service manager restarts us; as init we must keep going ourselves.
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn run(
    config: AgentConfig,
    paths: AgentPaths,
    console: Option<debug_console::ConsoleAddr>,
    pid1: bool,
) -> anyhow::Result<()> {
    if !pid1 {
        // Outside the guest, become the reaper of our containers' orphans
        // (as PID 1 the kernel makes us that anyway).
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            tracing::warn!(
                "PR_SET_CHILD_SUBREAPER failed: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let reaper = reaper::Reaper::default();
        tokio::spawn(reaper.clone().run());
        if let Some(addr) = console {
            tokio::spawn(debug_console::serve(addr, reaper.clone()));
        }
        if pid1 {
            if let Err(e) = kiln_agent::init::loopback_up() {
                tracing::warn!("bringing lo up: {e}");
            }
        }
        let guest = GuestFs::new("/");
        let sandbox = Sandbox::new(config.clone(), guest.clone(), paths, reaper, pid1);
        let state = Arc::new(AgentState {
            config,
            guest,
            init_daemon: pid1,
            sandbox,
        });
        server::serve(state).await
    })
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(format!("kiln_agent={level},ttrpc=warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .try_init();
}
