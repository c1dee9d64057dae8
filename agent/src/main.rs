//! kiln-agent: the guest side of kiln. Runs as PID 1 in an initrd or as a
//! systemd service, and serves the Kata agent protocol over ttrpc on vsock.
//!
//! Invariant: as PID 1 this process never exits and never lets a panic
//! escape; failures are logged and the server is restarted.

mod config;
mod guest;
mod init;
mod reaper;
mod rpc;
mod server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::guest::GuestFs;
use crate::rpc::AgentState;

fn main() {
    let pid1 = init::is_pid1();
    let early_problems = if pid1 { init::setup_pid1() } else { Vec::new() };
    let cmdline = init::kernel_cmdline(Path::new("/proc"));
    let (mut config, warnings) = AgentConfig::from_cmdline(&cmdline);
    // Outside a VM (tests, development) the address can be given directly.
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--server-addr") {
        if let Some(addr) = args.get(i + 1) {
            config.server_addr = addr.clone();
        }
    }
    if args.iter().any(|a| a == "--version") {
        println!("kiln-agent {}", rpc::AGENT_VERSION);
        return;
    }
    init_logging(&config.log_level);
    std::panic::set_hook(Box::new(|info| tracing::error!("panic: {info}")));
    for p in &early_problems {
        tracing::warn!("start-up: {p}");
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    tracing::info!(version = rpc::AGENT_VERSION, pid1, addr = %config.server_addr, "kiln-agent starting");

    loop {
        let cfg = config.clone();
        let outcome = std::panic::catch_unwind(move || run(cfg, pid1));
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

fn run(config: AgentConfig, pid1: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let reaper = reaper::Reaper::default();
        if pid1 {
            tokio::spawn(reaper.clone().run());
        }
        let state = Arc::new(AgentState { config, guest: GuestFs::new("/"), init_daemon: pid1 });
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
