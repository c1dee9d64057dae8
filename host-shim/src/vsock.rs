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
        .env("RUST_LOG", "warn")
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
