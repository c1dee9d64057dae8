//! Host side of vsock through a vhost-user backend (vhost-device-vsock): the
//! guest's ports are reached by connecting to a unix socket and saying
//! `CONNECT <port>\n`; the backend answers `OK <host port>\n` (the "hybrid
//! vsock" handshake Firecracker and Cloud Hypervisor use too).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::process::{wait_for_path, ChildGuard};

pub const GUEST_CID: u32 = 3;

/// Credit the backend gives the guest per connection (`tx-buffer-size`),
/// which caps the payload of every guest-to-host packet.
///
/// Guest kernels with "vsock/virtio: Allocate nonlinear SKBs for handling
/// large transmit buffers" (Linux 6.17, backported to 6.12.y; kiln's 6.12
/// has it) put a payload above ~32,400 bytes into page fragments, so the
/// packet reaches the device as several data descriptors. vhost-device-vsock
/// 0.3 (virtio-vsock 0.10) accepts one data descriptor only: it drops such a
/// packet ("error reading TX packet: DescriptorLengthTooSmall"), the guest's
/// credit is never returned and the stream stalls — every agent answer over
/// 64 KiB (e.g. a 64 KiB ReadStdout) hung. With 16 KiB of credit no packet
/// can be nonlinear.
pub const TX_BUFFER_SIZE: u32 = 16 * 1024;

/// The running vsock backend and its two sockets.
pub struct VsockBackend {
    pub guard: ChildGuard,
    /// vhost-user control socket, given to QEMU.
    pub vhost_socket: PathBuf,
    /// Hybrid vsock socket the host connects to.
    pub uds_path: PathBuf,
}

impl VsockBackend {
    pub fn start(
        binary: &Path,
        run_dir: &Path,
        log: std::fs::File,
    ) -> anyhow::Result<VsockBackend> {
        let vhost_socket = run_dir.join("vhost-vsock.sock");
        let uds_path = run_dir.join("vm.vsock");
        let mut cmd = Command::new(binary);
        cmd.arg(format!(
            "--vm=guest-cid={GUEST_CID},socket={},uds-path={},tx-buffer-size={TX_BUFFER_SIZE}",
            vhost_socket.display(),
            uds_path.display()
        ))
        // KILN_VSOCK_LOG (e.g. `debug`) for chasing backend stalls.
        .env(
            "RUST_LOG",
            std::env::var("KILN_VSOCK_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(log.try_clone()?)
        .stderr(log);
        let mut guard = ChildGuard::spawn("vhost-device-vsock", &mut cmd)?;
        wait_for_path(&vhost_socket, &mut guard, Duration::from_secs(10))?;
        Ok(VsockBackend {
            guard,
            vhost_socket,
            uds_path,
        })
    }

    /// The backend's rings as `/proc` shows them (see [`BackendRings`]).
    pub fn rings(&self) -> Option<BackendRings> {
        backend_rings(Path::new("/proc"), self.guard.pid()?)
    }

    /// Whether the backend process lives on without its worker thread, i.e.
    /// will never answer again. Cheaper than `rings` (no fd scan).
    pub fn worker_gone(&self) -> bool {
        let Some(pid) = self.guard.pid() else {
            return false;
        };
        worker_thread_alive(&Path::new("/proc").join(pid.to_string())) == Some(false)
    }
}

/// Opens a stream to guest `port`. Fails fast when nothing listens yet; the
/// caller retries.
pub async fn connect(uds_path: &Path, port: u32) -> anyhow::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds_path)
        .await
        .with_context(|| format!("connecting to {}", uds_path.display()))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let line = read_line(&mut stream).await?;
    parse_ok(&line).with_context(|| format!("vsock backend refused CONNECT {port}"))?;
    Ok(stream)
}

/// What vhost-device-vsock's own threads say about its virtqueues, read
/// from `/proc`, because the backend has no way to report it.
///
/// Why it matters: vhost-device-vsock 0.3 (vhost-user-backend 0.20) handles
/// every host connection by also processing the TX queue; if the connection
/// arrives after QEMU sent the guest memory table but before the backend has
/// set up the rings, that fails with "queue not ready", the error ends the
/// backend's only `vring_worker` thread, and from then on no CONNECT is ever
/// answered while the process lives on. QEMU reporting DRIVER_OK does not
/// close that window (it sends the ring setup without waiting for replies):
/// CI hit it twice in ~400 boots. So the shim connects only once the
/// worker's epoll watches both ring kick eventfds (`Serving`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendRings {
    /// The rings are not set up yet: a connection now can kill the worker.
    NotReady,
    /// The worker watches the RX and TX kicks: connections are safe.
    Serving,
    /// The `vring_worker` thread is gone: nothing will be answered again.
    WorkerGone,
}

/// Event ids vhost-user-backend registers the RX and TX kick eventfds under
/// (their queue index) in the worker's epoll.
const KICK_EVENT_IDS: [u64; 2] = [0, 1];

/// Reads the state of backend process `pid` under `proc_root` (`/proc`
/// outside tests). None when `/proc` cannot say (no such process, or its
/// entries are unreadable).
pub fn backend_rings(proc_root: &Path, pid: u32) -> Option<BackendRings> {
    let dir = proc_root.join(pid.to_string());
    if !worker_thread_alive(&dir)? {
        return Some(BackendRings::WorkerGone);
    }
    for fd in std::fs::read_dir(dir.join("fd")).ok()?.flatten() {
        let is_epoll = std::fs::read_link(fd.path())
            .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            continue;
        }
        let info =
            std::fs::read_to_string(dir.join("fdinfo").join(fd.file_name())).unwrap_or_default();
        let ids = epoll_event_ids(&info);
        if KICK_EVENT_IDS.iter().all(|id| ids.contains(id)) {
            return Some(BackendRings::Serving);
        }
    }
    Some(BackendRings::NotReady)
}

/// Whether process directory `dir` (`/proc/<pid>`) has a `vring_worker`
/// thread; None when its task list cannot be read (the process is gone).
fn worker_thread_alive(dir: &Path) -> Option<bool> {
    let mut tasks = std::fs::read_dir(dir.join("task")).ok()?.flatten();
    Some(tasks.any(|task| {
        std::fs::read_to_string(task.path().join("comm"))
            .is_ok_and(|comm| comm.trim_end() == "vring_worker")
    }))
}

/// The `data:` of every `tfd:` line of an epoll's fdinfo (printed in hex).
fn epoll_event_ids(fdinfo: &str) -> Vec<u64> {
    fdinfo
        .lines()
        .filter(|l| l.starts_with("tfd:"))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "data:")?;
            u64::from_str_radix(words.next()?, 16).ok()
        })
        .collect()
}

/// Reads the handshake reply byte by byte, so no payload byte is consumed.
async fn read_line(stream: &mut UnixStream) -> anyhow::Result<String> {
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            anyhow::bail!(
                "connection closed during handshake (no listener on that guest port yet?)"
            );
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 {
            anyhow::bail!("handshake reply too long");
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn parse_ok(line: &str) -> anyhow::Result<u32> {
    let port = line
        .strip_prefix("OK ")
        .with_context(|| format!("unexpected reply `{line}`"))?;
    port.trim()
        .parse()
        .with_context(|| format!("unexpected port in reply `{line}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_reply_parsing() {
        assert_eq!(parse_ok("OK 1073741824").unwrap(), 1073741824);
        assert!(parse_ok("ERR").is_err());
        assert!(parse_ok("OK x").is_err());
    }

    #[test]
    fn epoll_fdinfo_event_ids_are_hex() {
        let info = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1030\n\
tfd:        4 events:       19 data:                4  pos:0 ino:406 sdev:10\n\
tfd:       16 events:       19 data:               10  pos:0 ino:31958b sdev:9\n\
tfd:       17 events:       19 data:                0  pos:0 ino:406 sdev:10\n";
        assert_eq!(epoll_event_ids(info), vec![4, 16, 0]);
        assert!(epoll_event_ids("pos:\t0\n").is_empty());
    }

    /// A fake /proc entry: `tasks` are thread names; `epolls` the event ids
    /// each epoll fd watches.
    fn fake_proc(tasks: &[&str], epolls: &[&[u64]]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("42");
        for (i, name) in tasks.iter().enumerate() {
            let t = dir.join("task").join((100 + i).to_string());
            std::fs::create_dir_all(&t).unwrap();
            std::fs::write(t.join("comm"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(dir.join("fd")).unwrap();
        std::fs::create_dir_all(dir.join("fdinfo")).unwrap();
        std::os::unix::fs::symlink("/dev/null", dir.join("fd/0")).unwrap();
        std::fs::write(dir.join("fdinfo/0"), "pos:\t0\n").unwrap();
        for (i, ids) in epolls.iter().enumerate() {
            let fd = (3 + i).to_string();
            std::os::unix::fs::symlink("anon_inode:[eventpoll]", dir.join("fd").join(&fd)).unwrap();
            let lines: String = ids
                .iter()
                .map(|id| format!("tfd: 9 events: 19 data: {id:x} pos:0\n"))
                .collect();
            std::fs::write(dir.join("fdinfo").join(&fd), lines).unwrap();
        }
        root
    }

    #[test]
    fn backend_rings_read_from_proc() {
        let threads = ["vhost-device-vs", "vring_worker"];
        // Before QEMU sets up the rings: exit, backend and sibling events only.
        let p = fake_proc(&threads, &[&[3, 4, 5]]);
        assert_eq!(backend_rings(p.path(), 42), Some(BackendRings::NotReady));
        // RX set up, TX not yet: still not safe.
        let p = fake_proc(&threads, &[&[3, 4, 5, 0]]);
        assert_eq!(backend_rings(p.path(), 42), Some(BackendRings::NotReady));
        // The kicks of both rings, in the same epoll; another epoll watching
        // fds whose numbers happen to be 0x10 does not count.
        let p = fake_proc(&threads, &[&[3, 0x10], &[4, 3, 5, 1, 0]]);
        assert_eq!(backend_rings(p.path(), 42), Some(BackendRings::Serving));
        let p = fake_proc(&threads, &[&[0], &[1]]);
        assert_eq!(backend_rings(p.path(), 42), Some(BackendRings::NotReady));
        // The worker died: whatever its epoll still holds.
        let p = fake_proc(&["vhost-device-vs"], &[&[3, 4, 5, 1, 0]]);
        assert_eq!(backend_rings(p.path(), 42), Some(BackendRings::WorkerGone));
        assert_eq!(backend_rings(p.path(), 7), None, "no such process");
    }

    /// The real backend, started with no QEMU: its worker thread is there
    /// and it is not serving.
    #[test]
    fn a_backend_without_a_guest_is_not_serving() {
        let binary = crate::check::which("vhost-device-vsock")
            .expect("vhost-device-vsock on PATH (`cargo xtask setup` installs it)");
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("vsock.log")).unwrap();
        let backend = VsockBackend::start(&binary, dir.path(), log).unwrap();
        let pid = backend.guard.pid().unwrap();
        let proc_root = Path::new("/proc");
        assert_eq!(backend_rings(proc_root, pid), Some(BackendRings::NotReady));
    }

    #[tokio::test]
    async fn connect_speaks_the_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("vm.vsock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 5\nhello").await.unwrap();
        });
        let mut stream = connect(&sock, 1024).await.unwrap();
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"hello",
            "payload after the handshake line is untouched"
        );
        server.await.unwrap();
    }
}
