//! One OCI registry repository, as kiln talks to it: the remote stage cache
//! (`remote_cache`) and release distribution (`release --push`, `pull`).
//!
//! A thin blocking layer over `oci-client` (async): the pipeline is
//! synchronous, so each call runs on a private current-thread runtime.
//! Addresses are written `oci://HOST[:PORT]/REPO[:TAG|@sha256:…]`, the
//! notation ORAS and Kata's CI use without the scheme.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, Config, ImageLayer,
};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// `oci://HOST[:PORT]/REPO` split into its parts, with an optional tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// `host` or `host:port`.
    pub registry: String,
    /// `name` or `path/name`, lower case.
    pub repository: String,
    /// A tag (`1.2.0`) or a digest (`sha256:…`), if the address names one.
    pub reference: Option<String>,
}

impl Address {
    /// Parses `oci://HOST[:PORT]/REPO[:TAG|@DIGEST]`; the error says what a good one looks like.
    pub fn parse(text: &str) -> anyhow::Result<Address> {
        let usage =
            "write it as oci://HOST[:PORT]/REPOSITORY, e.g. oci://127.0.0.1:5000/kiln-cache";
        let rest = text
            .strip_prefix("oci://")
            .with_context(|| format!("`{text}` is not an oci:// address; {usage}"))?;
        let (registry, path) = rest
            .split_once('/')
            .with_context(|| format!("`{text}` names no repository after the host; {usage}"))?;
        if registry.is_empty() || registry.contains(['@', ' ']) {
            anyhow::bail!("`{text}` has no usable host; {usage}");
        }
        let (repository, reference) = if let Some((repo, digest)) = path.split_once('@') {
            if !digest.starts_with("sha256:")
                || digest.len() != 71
                || !digest[7..].bytes().all(|b| b.is_ascii_hexdigit())
            {
                anyhow::bail!("`{text}`: the digest after `@` must be sha256: and 64 hex digits");
            }
            (repo, Some(digest.to_string()))
        } else {
            match path.rsplit_once(':') {
                Some((repo, tag)) => (repo, Some(tag.to_string())),
                None => (path, None),
            }
        };
        let ok_repo = !repository.is_empty()
            && repository.split('/').all(|part| {
                !part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !ok_repo {
            anyhow::bail!(
                "`{text}`: repository `{repository}` must be lower-case letters, digits, `.`, `_`, `-` and `/`"
            );
        }
        if let Some(tag) = reference.as_deref().filter(|r| !r.starts_with("sha256:")) {
            if !valid_tag(tag) {
                anyhow::bail!(
                    "`{text}`: tag `{tag}` must be 1–128 of letters, digits, `.`, `_`, `-`"
                );
            }
        }
        Ok(Address {
            registry: registry.to_string(),
            repository: repository.to_string(),
            reference,
        })
    }

    /// The same repository, at `reference` (a tag or a digest).
    pub fn at(&self, reference: &str) -> Reference {
        if reference.starts_with("sha256:") {
            Reference::with_digest(
                self.registry.clone(),
                self.repository.clone(),
                reference.to_string(),
            )
        } else {
            Reference::with_tag(
                self.registry.clone(),
                self.repository.clone(),
                reference.to_string(),
            )
        }
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        match &self.reference {
            Some(d) if d.starts_with("sha256:") => write!(f, "@{d}"),
            Some(t) => write!(f, ":{t}"),
            None => Ok(()),
        }
    }
}

/// What the OCI distribution spec allows as a tag.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// Credentials for `registry`: `KILN_REGISTRY_USER` and `KILN_REGISTRY_PASSWORD`, else the
/// Docker config file (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`), else anonymous.
pub fn credentials(registry: &str) -> anyhow::Result<RegistryAuth> {
    if let (Ok(user), Ok(password)) = (
        std::env::var("KILN_REGISTRY_USER"),
        std::env::var("KILN_REGISTRY_PASSWORD"),
    ) {
        return Ok(RegistryAuth::Basic(user, password));
    }
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".docker").join("config.json"),
            None => return Ok(RegistryAuth::Anonymous),
        },
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => docker_config_auth(&text, registry)
            .with_context(|| format!("reading credentials for {registry} from {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The `auths` entry for `registry` in a Docker config file (keys may carry a scheme).
fn docker_config_auth(text: &str, registry: &str) -> anyhow::Result<RegistryAuth> {
    use base64::Engine;
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let file: File = serde_json::from_str(text).context("not a Docker config file (JSON)")?;
    let entry = file.auths.iter().find(|(key, _)| {
        let host = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/');
        host == registry || host.split('/').next() == Some(registry)
    });
    let Some((_, entry)) = entry else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
    }
    let Some(auth) = &entry.auth else {
        return Ok(RegistryAuth::Anonymous);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .context("its `auth` is not base64")?;
    let decoded = String::from_utf8(decoded).context("its `auth` is not UTF-8")?;
    let (user, password) = decoded
        .split_once(':')
        .context("its `auth` is not base64 of `user:password`")?;
    Ok(RegistryAuth::Basic(user.to_string(), password.to_string()))
}

/// `KILN_REGISTRY_CA`: a PEM file of CA certificates to trust besides the
/// built-in roots (a private registry's own CA).
fn extra_ca() -> anyhow::Result<Vec<Certificate>> {
    let Some(path) = std::env::var_os("KILN_REGISTRY_CA").filter(|p| !p.is_empty()) else {
        return Ok(Vec::new());
    };
    let data = std::fs::read(&path).with_context(|| {
        format!(
            "KILN_REGISTRY_CA={}: cannot read it (give a PEM file with the registry's CA certificate)",
            PathBuf::from(&path).display()
        )
    })?;
    if !String::from_utf8_lossy(&data).contains("-----BEGIN CERTIFICATE-----") {
        anyhow::bail!(
            "KILN_REGISTRY_CA={}: not a PEM certificate (no BEGIN CERTIFICATE line)",
            PathBuf::from(&path).display()
        );
    }
    Ok(vec![Certificate {
        encoding: CertificateEncoding::Pem,
        data,
    }])
}

/// A connection to one repository.
pub struct Registry {
    pub address: Address,
    client: Client,
    auth: RegistryAuth,
    rt: tokio::runtime::Runtime,
}

/// A manifest found on the registry, with its digest.
pub struct Found {
    pub manifest: OciImageManifest,
    pub digest: String,
}

impl Registry {
    /// `insecure`: plain HTTP to this registry (loopback tests, a LAN cache),
    /// only when the user asks for it.
    pub fn connect(address: Address, insecure: bool) -> anyhow::Result<Registry> {
        let auth = credentials(&address.registry)?;
        let config = ClientConfig {
            extra_root_certificates: extra_ca()?,
            protocol: if insecure {
                ClientProtocol::HttpsExcept(vec![address.registry.clone()])
            } else {
                ClientProtocol::Https
            },
            // A registry that is down must cost seconds, not minutes.
            connect_timeout: Some(Duration::from_secs(5)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime for registry calls")?;
        Ok(Registry {
            address,
            client: Client::new(config),
            auth,
            rt,
        })
    }

    /// The repository itself: blob calls name no tag (the tag is ignored).
    fn repo_ref(&self) -> Reference {
        self.address.at("latest")
    }

    /// The image manifest at `reference`, or None if the registry has none.
    pub fn manifest(&self, reference: &str) -> anyhow::Result<Option<Found>> {
        let r = self.address.at(reference);
        match self.rt.block_on(self.client.pull_manifest(&r, &self.auth)) {
            Ok((OciManifest::Image(manifest), digest)) => Ok(Some(Found { manifest, digest })),
            Ok((OciManifest::ImageIndex(_), _)) => {
                anyhow::bail!("{} is an image index, not a manifest", r.whole())
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(explain(e, &r)),
        }
    }

    /// The raw bytes of the manifest or index at `reference`, with its digest.
    pub fn manifest_raw(
        &self,
        reference: &str,
        media_types: &[&str],
    ) -> anyhow::Result<(Vec<u8>, String)> {
        let r = self.address.at(reference);
        let (bytes, digest) = self
            .rt
            .block_on(self.client.pull_manifest_raw(&r, &self.auth, media_types))
            .map_err(|e| explain(e, &r))?;
        Ok((bytes.to_vec(), digest))
    }

    /// A blob, in memory; oci-client checks it against `desc.digest`.
    pub fn blob(&self, desc: &OciDescriptor) -> anyhow::Result<Vec<u8>> {
        let r = self.repo_ref();
        let mut out = Vec::new();
        self.rt
            .block_on(self.client.pull_blob(&r, desc, &mut out))
            .map_err(|e| explain(e, &r))
            .with_context(|| format!("pulling blob {}", desc.digest))?;
        Ok(out)
    }

    /// A blob written to `dest` (created), checked against `desc.digest`.
    pub fn blob_to_file(&self, desc: &OciDescriptor, dest: &Path) -> anyhow::Result<()> {
        let r = self.repo_ref();
        self.rt
            .block_on(async {
                let file = tokio::fs::File::create(dest).await?;
                let mut w = tokio::io::BufWriter::new(file);
                self.client.pull_blob(&r, desc, &mut w).await
            })
            .map_err(|e| explain(e, &r))
            .with_context(|| format!("pulling blob {}", desc.digest))
    }

    /// Pushes `layers` and `config` as an image manifest under `tag`; returns the manifest URL.
    /// Blobs are content-addressed and the manifest is canonical JSON built
    /// from sorted annotations, so two machines pushing the same content write
    /// the same bytes: concurrent pushes of one key are harmless.
    pub fn push(
        &self,
        tag: &str,
        layers: &[ImageLayer],
        config: Config,
        manifest: OciImageManifest,
    ) -> anyhow::Result<String> {
        let r = self.address.at(tag);
        self.rt
            .block_on(
                self.client
                    .push(&r, layers, config, &self.auth, Some(manifest)),
            )
            .map(|resp| resp.manifest_url)
            .map_err(|e| explain(e, &r))
    }

    /// Pushes a manifest or an image index given as bytes under `tag` (its
    /// members must already be on the registry).
    pub fn push_manifest_raw(
        &self,
        tag: &str,
        body: Vec<u8>,
        media_type: &str,
    ) -> anyhow::Result<String> {
        let r = self.address.at(tag);
        let ct = media_type
            .parse()
            .with_context(|| format!("media type `{media_type}`"))?;
        self.rt
            .block_on(async {
                self.client
                    .store_auth_if_needed(r.resolve_registry(), &self.auth)
                    .await;
                self.client.push_manifest_raw(&r, body, ct).await
            })
            .map_err(|e| explain(e, &r))
    }
}

fn not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown
            )
        }),
        OciDistributionError::ServerError { code, .. } => *code == 404,
        _ => false,
    }
}

/// One line a user can act on, instead of oci-client's nested error.
fn explain(e: OciDistributionError, r: &Reference) -> anyhow::Error {
    let what = format!("{}/{}", r.registry(), r.repository());
    let hopeless = |text: String| anyhow::Error::new(Hopeless(text));
    match &e {
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => hopeless(format!(
            "{what}: the registry refused the credentials (set KILN_REGISTRY_USER and KILN_REGISTRY_PASSWORD, \
             or log in so ~/.docker/config.json has an `auths` entry for {})",
            r.registry()
        )),
        OciDistributionError::RequestError(inner)
            if inner.is_connect() && root_cause(inner).contains("certificate") =>
        {
            hopeless(format!(
                "{what}: the registry's TLS certificate is not trusted ({}); trust its CA with \
                 KILN_REGISTRY_CA=FILE.pem",
                root_cause(inner)
            ))
        }
        OciDistributionError::RequestError(inner) if inner.is_connect() || inner.is_timeout() => {
            hopeless(format!(
                "{what}: cannot reach the registry ({}); is it running, and is it HTTPS \
                 (use --insecure-registry only for a plain-HTTP registry you trust)?",
                root_cause(inner)
            ))
        }
        _ => anyhow::Error::new(e).context(what),
    }
}

/// A registry failure no later call in this run can get past: unreachable,
/// credentials refused, certificate not trusted. Carried as a type so
/// [`hopeless`] never depends on the wording of a message.
#[derive(Debug)]
struct Hopeless(String);

impl std::fmt::Display for Hopeless {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Hopeless {}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// True when `e` means no later call in this run can succeed either (the
/// registry is not reachable, refuses these credentials or is not trusted),
/// so asking again would only wait and repeat the warning.
pub fn hopeless(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| cause.is::<Hopeless>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_with_and_without_reference() {
        let a = Address::parse("oci://127.0.0.1:5000/kiln-cache").unwrap();
        assert_eq!(a.registry, "127.0.0.1:5000");
        assert_eq!(a.repository, "kiln-cache");
        assert_eq!(a.reference, None);
        let a = Address::parse("oci://ghcr.io/org/kiln:0.4.0").unwrap();
        assert_eq!(
            (a.registry.as_str(), a.repository.as_str()),
            ("ghcr.io", "org/kiln")
        );
        assert_eq!(a.reference.as_deref(), Some("0.4.0"));
        assert_eq!(a.to_string(), "oci://ghcr.io/org/kiln:0.4.0");
        let d = format!("sha256:{}", "ab".repeat(32));
        let a = Address::parse(&format!("oci://r:1/k@{d}")).unwrap();
        assert_eq!(a.reference.as_deref(), Some(d.as_str()));
        assert_eq!(a.to_string(), format!("oci://r:1/k@{d}"));
    }

    #[test]
    fn bad_addresses_are_named() {
        for (text, says) in [
            ("http://r/k", "not an oci:// address"),
            ("oci://registry-only", "names no repository"),
            ("oci:///k", "no usable host"),
            ("oci://r/Upper", "lower-case"),
            ("oci://r/k@sha256:12", "64 hex digits"),
            ("oci://r/k:-bad", "tag `-bad`"),
        ] {
            let e = Address::parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn docker_config_entries_are_found_by_host() {
        let text = r#"{"auths":{"https://reg.example:5000":{"auth":"a2lsbjpzM2NyZXQ="},
                       "other":{"username":"u","password":"p"}}}"#;
        match docker_config_auth(text, "reg.example:5000").unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("kiln", "s3cret")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            docker_config_auth(text, "other").unwrap(),
            RegistryAuth::Basic(..)
        ));
        assert!(matches!(
            docker_config_auth(text, "elsewhere").unwrap(),
            RegistryAuth::Anonymous
        ));
        let bad = r#"{"auths":{"h":{"auth":"bm9jb2xvbg=="}}}"#; // "nocolon"
        assert!(docker_config_auth(bad, "h")
            .unwrap_err()
            .to_string()
            .contains("user:password"));
    }

    #[test]
    fn hopeless_is_a_type_not_a_wording() {
        let gone = anyhow::Error::new(Hopeless("r/k: cannot reach the registry".into()))
            .context("pulling blob sha256:00");
        assert!(hopeless(&gone), "found through the context");
        let echoed = anyhow::anyhow!("server said: cannot reach the registry");
        assert!(!hopeless(&echoed), "a message that only says so is not");
    }

    #[test]
    fn tags_follow_the_distribution_spec() {
        assert!(valid_tag("kernel-0123abcd"));
        assert!(valid_tag(&"a".repeat(128)));
        assert!(!valid_tag(&"a".repeat(129)));
        assert!(!valid_tag(".hidden"));
        assert!(!valid_tag("has/slash"));
    }
}
