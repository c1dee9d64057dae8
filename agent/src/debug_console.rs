//! `agent.debug_console`: a shell on a pty for each connection to vsock port
//! `agent.debug_console_vport` (off by default). The host reaches it through
//! hybrid vsock (`CONNECT 1026`). Development only: it is a root shell.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::Interest;

use crate::container::stdio::{async_fd, pty};
use crate::error::{os, precondition, Result};
use crate::reaper::Reaper;

/// Shells tried in order; busybox is what minimal guests have.
const SHELLS: &[(&str, &[&str])] = &[
    ("/bin/bash", &[]),
    ("/bin/sh", &[]),
    ("/bin/busybox", &["sh"]),
];

/// Where the console listens.
#[derive(Debug, Clone)]
pub enum ConsoleAddr {
    Vsock(u32),
    /// Host development and tests.
    Unix(std::path::PathBuf),
}

fn listener(addr: &ConsoleAddr) -> Result<OwnedFd> {
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    match addr {
        ConsoleAddr::Vsock(port) => {
            let fd = socket(AddressFamily::Vsock, SockType::Stream, flags, None)
                .map_err(|e| os("vsock socket", e))?;
            bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))
                .map_err(|e| os(format!("binding vsock port {port}"), e))?;
            listen(&fd, Backlog::new(8).map_err(|e| os("listen backlog", e))?)
                .map_err(|e| os("listen", e))?;
            Ok(fd)
        }
        ConsoleAddr::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path)
                .map_err(|e| os(format!("binding {}", path.display()), e))?;
            l.set_nonblocking(true).map_err(|e| os("listener", e))?;
            Ok(l.into())
        }
    }
}

/// Serves shells until the agent stops. Errors are logged, never fatal.
pub async fn serve(addr: ConsoleAddr, reaper: Reaper) {
    let fd = match listener(&addr).and_then(|fd| {
        async_fd(fd, Interest::READABLE).map_err(|e| os("watching the console socket", e))
    }) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!("debug console unavailable: {e}");
            return;
        }
    };
    tracing::warn!("debug console enabled: a root shell for anyone who can connect");
    let reaper = Arc::new(reaper);
    loop {
        let mut guard = match fd.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("debug console: {e}");
                return;
            }
        };
        let conn = match guard.try_io(|l| {
            accept4(
                l.get_ref().as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(Ok(c)) => {
                // SAFETY: accept4 returned a new descriptor that we now own.
                unsafe { OwnedFd::from_raw_fd(c) }
            }
            Ok(Err(e)) => {
                tracing::warn!("debug console accept: {e}");
                continue;
            }
            Err(_would_block) => continue,
        };
        let reaper = reaper.clone();
        tokio::spawn(async move {
            if let Err(e) = session(conn, &reaper).await {
                tracing::warn!("debug console session: {e}");
            }
        });
    }
}

async fn session(conn: OwnedFd, reaper: &Reaper) -> Result<()> {
    let (shell, args) = SHELLS
        .iter()
        .find(|(p, _)| Path::new(p).exists())
        .ok_or_else(|| precondition("no shell in the guest"))?;
    let (parent, child) = pty(Some((24, 80)))?;
    let mut cmd = Command::new(shell);
    cmd.args(*args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("TERM", "vt100")
        .env("HOME", "/")
        .stdin(Stdio::from(child.stdin))
        .stdout(Stdio::from(child.stdout))
        .stderr(Stdio::from(child.stderr));
    // SAFETY: setsid and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let exit = {
        let mut reg = reaper.lock();
        let c = cmd
            .spawn()
            .map_err(|e| os(format!("starting {shell}"), e))?;
        reg.register(c.id() as i32)
    };
    drop(cmd);
    let conn2 = conn.try_clone().map_err(|e| os("dup", e))?;
    let to_shell = tokio::spawn(copy(conn, parent.stdin));
    let from_shell = tokio::spawn(copy(parent.stdout, conn2));
    let _ = exit.await;
    // The shell is gone: stop reading the socket; let its last output flush.
    to_shell.abort();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), from_shell).await;
    Ok(())
}

/// Copies bytes from one descriptor to another until EOF or an error.
async fn copy(from: OwnedFd, to: OwnedFd) {
    let (Ok(from), Ok(to)) = (
        async_fd(from, Interest::READABLE),
        async_fd(to, Interest::WRITABLE),
    ) else {
        return;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(mut g) = from.readable().await else {
            return;
        };
        let n = match g.try_io(|f| {
            nix::unistd::read(f.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)
        }) {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
            Err(_would_block) => continue,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            let Ok(mut g) = to.writable().await else {
                return;
            };
            match g.try_io(|t| nix::unistd::write(t.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(Ok(w)) => data = &data[w..],
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        }
    }
}
