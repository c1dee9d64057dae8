//! A throwaway OCI registry on a loopback port: Debian's `docker-registry`
//! (the CNCF distribution registry) with its own storage, anonymous or with
//! basic auth. For the remote-cache and release tests and `bench
//! --remote-cache`; never for real builds.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// One registry process with its storage; killed and removed on drop.
pub struct LocalRegistry {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl LocalRegistry {
    /// `htpasswd`: (user, password) for basic auth, else anonymous.
    pub fn start(htpasswd: Option<(&str, &str)>) -> anyhow::Result<LocalRegistry> {
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .context("running htpasswd (Debian package apache2-utils; `cargo xtask setup` installs it)")?;
            if !out.status.success() {
                anyhow::bail!(
                    "htpasswd -Bbn failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        std::fs::write(dir.path().join("config.yml"), config)?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("registry.log"))?)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry; `cargo xtask setup` installs it)")?;
        let r = LocalRegistry {
            child: Some(child),
            port,
            dir,
        };
        r.wait_ready()?;
        Ok(r)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                    .unwrap_or_default();
                anyhow::bail!(
                    "docker-registry did not answer on 127.0.0.1:{} in 30 s:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `oci://127.0.0.1:PORT/kiln-cache`.
    pub fn url(&self) -> String {
        self.url_for("kiln-cache")
    }

    pub fn url_for(&self, repository: &str) -> String {
        format!("oci://127.0.0.1:{}/{repository}", self.port)
    }

    /// Where the filesystem driver stores one blob's bytes (for tamper tests).
    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&sha256[..2.min(sha256.len())])
            .join(sha256)
            .join("data")
    }

    /// Stops the registry (a registry that went away mid-run).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
