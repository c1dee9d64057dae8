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
    /// `htpasswd`: (user, password) for basic auth, else anonymous. Plain HTTP.
    pub fn start(htpasswd: Option<(&str, &str)>) -> anyhow::Result<LocalRegistry> {
        Self::start_with(htpasswd, false)
    }

    /// With `tls`, serves HTTPS with a certificate for 127.0.0.1 signed by a
    /// CA made for this registry alone ([`LocalRegistry::ca_path`]).
    pub fn start_with(htpasswd: Option<(&str, &str)>, tls: bool) -> anyhow::Result<LocalRegistry> {
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
        if tls {
            make_certificates(dir.path())?;
            // `http:` is the last section written so far: tls goes under it.
            config = config.replacen(
                &format!("  addr: 127.0.0.1:{port}\n"),
                &format!(
                    "  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n",
                    dir.path().join("server.pem").display(),
                    dir.path().join("server.key").display()
                ),
                1,
            );
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
                // Plain HTTP answers "HTTP/1."; a TLS server answers a TLS alert or
                // "HTTP/1.0 400" to plain text: either way it is serving.
                if s.read_exact(&mut head[..5]).is_ok() && head[0] != 0 {
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

    /// The PEM of the CA that signed a TLS registry's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
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

/// A CA and a server certificate for IP 127.0.0.1 (openssl; one day).
fn make_certificates(dir: &std::path::Path) -> anyhow::Result<()> {
    let run = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running openssl (Debian package openssl; `cargo xtask setup` installs it)")?;
        if !out.status.success() {
            anyhow::bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=kiln test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ])?;
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ])?;
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ])
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
