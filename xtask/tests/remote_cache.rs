//! The remote stage cache against a real registry: Debian's `docker-registry`
//! (the CNCF distribution registry) on a loopback port, started by the test.
//!
//! Run by `cargo xtask test` after the images are built, so the machine's
//! kernel cache is warm: the first build pushes from it, later ones start
//! from an empty cache and must not compile a kernel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use xtask::local_registry::LocalRegistry;
use xtask::remote_cache::{said, Said};

/// `cargo xtask <args>` with outputs in `out` and, if given, the cache in
/// `cache`; no registry setting or credential of the caller's leaks in.
fn xtask_command(out: &Path, cache: Option<&Path>, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.arg("--no-setup")
        .args(args)
        .env("KILN_OUT_DIR", out)
        .env_remove("KILN_CACHE_REMOTE")
        .env_remove("KILN_CACHE_PUSH")
        .env_remove("KILN_REGISTRY_USER")
        .env_remove("KILN_REGISTRY_PASSWORD")
        // A caller's KILN_INSECURE_REGISTRY=1 (README's advice for a loopback
        // registry) would turn the HTTPS test into plain HTTP.
        .env_remove("KILN_INSECURE_REGISTRY")
        .env_remove("KILN_REGISTRY_CA")
        // No developer's ~/.docker/config.json leaks into the test.
        .env("DOCKER_CONFIG", out.join("no-docker-config"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .stdin(Stdio::null());
    if let Some(cache) = cache {
        c.env("KILN_CACHE_DIR", cache);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// [`xtask_command`], run to completion.
fn xtask(out: &Path, cache: Option<&Path>, env: &[(&str, &str)], args: &[&str]) -> Output {
    xtask_command(out, cache, env, args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(o.status.success(), "cargo xtask failed:\n{t}");
    t
}

fn image(out: &Path) -> PathBuf {
    out.join("minimal").join("x86_64")
}

/// Every file of two image directories is byte-identical.
fn same_image(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        let (x, y) = (
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
        );
        assert!(
            x == y,
            "{} differs between the two builds",
            n.to_string_lossy()
        );
    }
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

const BUILD: &[&str] = &["build-image", "--arch", "x86_64"];

#[test]
#[ignore = "needs docker-registry and a built x86_64 kernel; run by `cargo xtask test`"]
fn a_second_machine_builds_from_the_registry_and_bad_content_never_lands() {
    let mut reg = LocalRegistry::start(None).unwrap();
    let url = reg.url();
    let remote = ["--cache-remote", url.as_str(), "--insecure-registry"];
    let args = |push: bool| {
        let mut v: Vec<&str> = remote.to_vec();
        if push {
            v.push("--cache-push");
        }
        v.extend(BUILD);
        v
    };

    // Machine A: the machine's warm kernel cache; pushes every stage.
    let a = tempfile::tempdir().unwrap();
    let t = ok(xtask(a.path(), None, &[], &args(true)));
    for stage in ["agent", "kernel", "initrd", "disk"] {
        assert!(said(&t, stage, Said::Pushed), "{stage}:\n{t}");
    }

    // Machine B: empty cache, empty outputs, read-only. Nothing is compiled.
    let b = tempfile::tempdir().unwrap();
    let b_cache = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let t = ok(xtask(b.path(), Some(b_cache.path()), &[], &args(false)));
    let took = start.elapsed();
    for stage in ["agent", "kernel", "initrd", "disk"] {
        assert!(said(&t, stage, Said::Pulled), "{stage}:\n{t}");
    }
    assert!(
        !t.contains("pushed to"),
        "no --cache-push, yet it pushed:\n{t}"
    );
    assert!(!t.contains("make "), "a kernel was compiled:\n{t}");
    assert!(
        !b_cache.path().join("kernel/src").exists(),
        "the kernel source was unpacked, so the kernel was not taken from the registry"
    );
    same_image(&image(a.path()), &image(b.path()));
    eprintln!(
        "empty cache + warm registry: build-image in {:.1} s",
        took.as_secs_f64()
    );

    // A changed input (another SOURCE_DATE_EPOCH) misses for the stages it
    // feeds (initrd, rootfs.img) and they are built locally; the kernel still hits.
    let c = tempfile::tempdir().unwrap();
    let c_cache = tempfile::tempdir().unwrap();
    let t = ok(xtask(
        c.path(),
        Some(c_cache.path()),
        &[("SOURCE_DATE_EPOCH", "1700000000")],
        &args(false),
    ));
    assert!(said(&t, "kernel", Said::Pulled), "{t}");
    assert!(
        said(&t, "initrd", Said::Missed) && !said(&t, "initrd", Said::Pulled),
        "a changed input hit the cache:\n{t}"
    );
    assert!(
        t.contains("✓ initrd x86_64"),
        "the initrd was not built locally:\n{t}"
    );

    // A corrupted blob (the registry's stored initrd bytes) is refused with one
    // warning; the initrd is built locally and comes out as the good one.
    let initrd_sha = sha256_hex(&image(a.path()).join("initrd.img"));
    let blob = reg.blob_path(&initrd_sha);
    kiln_testsupport::tamper::flip_byte(&blob, 1000, 0x55)
        .expect("the initrd's blob in the registry's storage");
    let d = tempfile::tempdir().unwrap();
    let d_cache = tempfile::tempdir().unwrap();
    let t = ok(xtask(d.path(), Some(d_cache.path()), &[], &args(false)));
    assert!(
        t.lines()
            .any(|l| l.starts_with("warning: remote cache: initrd")
                && l.contains("building it locally")),
        "{t}"
    );
    assert!(said(&t, "kernel", Said::Pulled), "{t}");
    same_image(&image(a.path()), &image(d.path()));
    let leftovers: Vec<_> = std::fs::read_dir(image(d.path()))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".remote-"))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");

    // The registry stops: one warning, the local build goes on.
    reg.stop();
    let t = ok(xtask(a.path(), None, &[], &args(true)));
    let warnings = t
        .lines()
        .filter(|l| l.contains("cannot reach the registry"))
        .count();
    assert_eq!(
        warnings, 1,
        "expected one unreachable warning, then silence:\n{t}"
    );
}

#[test]
#[ignore = "needs docker-registry and htpasswd; run by `cargo xtask test`"]
fn basic_auth_from_the_environment_or_docker_config_and_a_refused_login_falls_back() {
    let reg = LocalRegistry::start(Some(("kiln", "s3cret"))).unwrap();
    let url = reg.url();
    let args = |push: bool| {
        let mut v = vec!["--cache-remote", url.as_str(), "--insecure-registry"];
        if push {
            v.push("--cache-push");
        }
        v.extend(["build-agent", "--arch", "x86_64"]);
        v
    };
    let user = [
        ("KILN_REGISTRY_USER", "kiln"),
        ("KILN_REGISTRY_PASSWORD", "s3cret"),
    ];

    let a = tempfile::tempdir().unwrap();
    let t = ok(xtask(a.path(), None, &user, &args(true)));
    assert!(said(&t, "agent", Said::Pushed), "{t}");

    // Credentials from a Docker config file, as `docker login` leaves them.
    let b = tempfile::tempdir().unwrap();
    let docker = b.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode("kiln:s3cret");
    std::fs::write(
        docker.join("config.json"),
        format!(
            r#"{{"auths":{{"127.0.0.1:{}":{{"auth":"{auth}"}}}}}}"#,
            reg.port
        ),
    )
    .unwrap();
    let t = ok(xtask(
        b.path(),
        None,
        &[("DOCKER_CONFIG", docker.to_str().unwrap())],
        &args(false),
    ));
    assert!(said(&t, "agent", Said::Pulled), "{t}");
    assert_eq!(
        sha256_hex(&a.path().join("agent/x86_64/kiln-agent")),
        sha256_hex(&b.path().join("agent/x86_64/kiln-agent"))
    );

    // A wrong password: one clear line, then the agent is built locally.
    let c = tempfile::tempdir().unwrap();
    let t = ok(xtask(
        c.path(),
        None,
        &[
            ("KILN_REGISTRY_USER", "kiln"),
            ("KILN_REGISTRY_PASSWORD", "wrong"),
        ],
        &args(false),
    ));
    let refused = t
        .lines()
        .filter(|l| l.contains("refused the credentials"))
        .count();
    assert_eq!(refused, 1, "{t}");
    assert!(c.path().join("agent/x86_64/kiln-agent").exists());

    // Anonymous against an auth-only registry: the same fallback.
    let d = tempfile::tempdir().unwrap();
    let t = ok(xtask(d.path(), None, &[], &args(false)));
    assert!(t.contains("warning: remote cache: agent"), "{t}");
}

#[test]
#[ignore = "needs docker-registry and openssl; run by `cargo xtask test`"]
fn an_https_registry_is_trusted_through_its_ca_only() {
    let reg = LocalRegistry::start_with(None, true).unwrap();
    let url = reg.url();
    let ca = reg.ca_path();
    let ca = ca.to_str().unwrap();
    let args = |push: bool| {
        // No --insecure-registry: HTTPS, certificate checked.
        let mut v = vec!["--cache-remote", url.as_str()];
        if push {
            v.push("--cache-push");
        }
        v.extend(["build-agent", "--arch", "x86_64"]);
        v
    };
    let a = tempfile::tempdir().unwrap();
    let t = ok(xtask(
        a.path(),
        None,
        &[("KILN_REGISTRY_CA", ca)],
        &args(true),
    ));
    assert!(said(&t, "agent", Said::Pushed), "{t}");
    let b = tempfile::tempdir().unwrap();
    let t = ok(xtask(
        b.path(),
        None,
        &[("KILN_REGISTRY_CA", ca)],
        &args(false),
    ));
    assert!(t.contains("verified)"), "{t}");
    // Without the CA the certificate is unknown: one clear line, a local build.
    let c = tempfile::tempdir().unwrap();
    let t = ok(xtask(c.path(), None, &[], &args(false)));
    let untrusted = t
        .lines()
        .filter(|l| l.contains("certificate is not trusted"))
        .count();
    assert_eq!(untrusted, 1, "{t}");
    assert!(t.contains("KILN_REGISTRY_CA"), "{t}");
    assert!(c.path().join("agent/x86_64/kiln-agent").exists());
    // A file that is not a certificate is named, not used.
    let bogus = c.path().join("not-a-cert.pem");
    std::fs::write(&bogus, "hello").unwrap();
    let o = xtask(
        c.path(),
        None,
        &[("KILN_REGISTRY_CA", bogus.to_str().unwrap())],
        &args(false),
    );
    assert!(
        !o.status.success() && text(&o).contains("not a PEM certificate"),
        "{}",
        text(&o)
    );
}

/// Library-level: concurrent pushes of one key, and a manifest that lies about its key.
#[test]
#[ignore = "needs docker-registry; run by `cargo xtask test`"]
fn concurrent_pushes_of_one_key_are_safe_and_a_foreign_key_is_ignored() {
    use xtask::cache::{write_atomic, Stamp};
    use xtask::remote_cache::{Lookup, RemoteCache};

    let reg = LocalRegistry::start(None).unwrap();
    let src = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    write_atomic(&src.path().join("blob.bin"), &big).unwrap();
    write_atomic(&src.path().join("sub/small"), b"small").unwrap();
    let key = "5a".repeat(32);
    Stamp::record(src.path(), "demo", &key, &["blob.bin", "sub/small"]).unwrap();

    let pushers: Vec<_> = (0..4)
        .map(|_| {
            let url = reg.url();
            let dir = src.path().to_path_buf();
            let key = key.clone();
            std::thread::spawn(move || {
                let remote = RemoteCache::connect(&url, true, true).unwrap();
                let warnings = std::sync::Mutex::new(Vec::new());
                remote.offer(&dir, "demo", &key, &|l| {
                    warnings.lock().unwrap().push(l.to_string())
                });
                warnings.into_inner().unwrap()
            })
        })
        .collect();
    for p in pushers {
        let w = p.join().unwrap();
        assert!(w.is_empty(), "a concurrent push failed: {w:?}");
    }
    let remote = RemoteCache::connect(&reg.url(), false, true).unwrap();
    let dest = tempfile::tempdir().unwrap();
    let got = remote.fetch(dest.path(), "demo", &key, &|l| panic!("{l}"));
    assert!(matches!(got, Lookup::Hit { files: 2, .. }), "{got:?}");
    assert!(Stamp::fresh(dest.path(), "demo", &key).is_some());
    assert_eq!(std::fs::read(dest.path().join("blob.bin")).unwrap(), big);

    // Another key is a miss, not an error.
    let other = "00".repeat(32);
    assert_eq!(
        remote.fetch(dest.path(), "demo", &other, &|l| panic!("{l}")),
        Lookup::Miss
    );

    // Someone pushes key K's content under key J's tag: refused, nothing installed.
    let liar = tempfile::tempdir().unwrap();
    write_atomic(&liar.path().join("blob.bin"), b"evil").unwrap();
    write_atomic(&liar.path().join("sub/small"), b"evil").unwrap();
    Stamp::record(liar.path(), "demo", &key, &["blob.bin", "sub/small"]).unwrap();
    let stamp = Stamp::fresh(liar.path(), "demo", &key).unwrap();
    let (layers, config, manifest) =
        xtask::remote_cache::artifact(liar.path(), "demo", &stamp).unwrap();
    let address = xtask::oci::Address::parse(&reg.url()).unwrap();
    xtask::oci::Registry::connect(address, true)
        .unwrap()
        .push(&RemoteCache::tag("demo", &other), &layers, config, manifest)
        .expect("pushing the forged manifest");
    let victim = tempfile::tempdir().unwrap();
    let warnings = std::sync::Mutex::new(Vec::new());
    let got = remote.fetch(victim.path(), "demo", &other, &|l| {
        warnings.lock().unwrap().push(l.to_string())
    });
    assert_eq!(got, Lookup::Failed);
    let w = warnings.into_inner().unwrap();
    assert!(w.len() == 1 && w[0].contains("not this build's"), "{w:?}");
    assert!(!victim.path().join("blob.bin").exists());
    assert!(Stamp::fresh(victim.path(), "demo", &other).is_none());
}

/// A fragment change misses the registry and the kernel is built here: the
/// machine's warm kernel is pushed, a second machine (an empty kiln cache)
/// takes it from the registry, then asks with one changed option
/// (`build-kernel --fragment`): that key is not on the registry, and the kernel
/// is configured with the option and compiled there. The test stops the build
/// at its first compiled object (a full build costs 10+ minutes here; the rest
/// is the ordinary cold build) and checks nothing of it was trusted. The
/// machine's own cache is only read.
#[test]
#[ignore = "needs docker-registry and a built x86_64 kernel; run by `cargo xtask test`"]
fn a_changed_fragment_misses_the_registry_and_builds_the_kernel_here() {
    let reg = LocalRegistry::start(None).unwrap();
    let url = reg.url();
    let base = ["--cache-remote", url.as_str(), "--insecure-registry"];
    let kernel = ["build-kernel", "--arch", "x86_64"];

    let a = tempfile::tempdir().unwrap();
    let seed: Vec<&str> = base
        .iter()
        .chain(&["--cache-push"])
        .chain(&kernel)
        .copied()
        .collect();
    let t = xtask(a.path(), None, &[], &seed);
    let t = ok(t);
    assert!(
        said(&t, "kernel", Said::Pushed) && !t.contains("make "),
        "the machine's kernel was not cached, or not pushed:\n{t}"
    );
    // Machine B, unchanged fragments: the kernel comes from the registry.
    let b = tempfile::tempdir().unwrap();
    let b_cache = tempfile::tempdir().unwrap();
    let unchanged: Vec<&str> = base.iter().chain(&kernel).copied().collect();
    let t = ok(xtask(b.path(), Some(b_cache.path()), &[], &unchanged));
    assert!(said(&t, "kernel", Said::Pulled), "{t}");

    // Machine B, one option changed (the dummy NIC built in, not a module).
    let extra = b.path().join("dummy-builtin.conf");
    std::fs::write(&extra, "CONFIG_DUMMY=y\n").unwrap();
    let changed: Vec<&str> = unchanged
        .iter()
        .copied()
        .chain(["--fragment", extra.to_str().unwrap()])
        .collect();
    let printed = b.path().join("changed.out");
    let printed_file = std::fs::File::create(&printed).unwrap();
    let mut child = xtask_command(b.path(), Some(b_cache.path()), &[], &changed)
        .stdout(printed_file.try_clone().unwrap())
        .stderr(printed_file)
        .spawn()
        .unwrap();
    let log = b.path().join("logs/kernel-x86_64.log");
    let deadline = Instant::now() + std::time::Duration::from_secs(1200);
    let compiled = loop {
        let so_far = std::fs::read_to_string(&log).unwrap_or_default();
        if so_far.lines().any(|l| l.trim_start().starts_with("CC ")) {
            break true;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    // make dies with xtask; its last compiler processes finish their object.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let t = std::fs::read_to_string(&printed).unwrap();
    assert!(
        said(&t, "kernel", Said::Missed),
        "the changed kernel did not miss:\n{t}"
    );
    assert!(compiled, "the kernel build did not start compiling:\n{t}");
    let key16 = t
        .lines()
        .find_map(|l| l.strip_prefix("remote cache: kernel "))
        .and_then(|rest| rest.split_once(' '))
        .map(|(k, _)| k)
        .expect("the miss line names the key");
    let kernels = b_cache.path().join("kernel");
    let config = std::fs::read_to_string(kernels.join("build").join(key16).join(".config"))
        .expect("the changed kernel's .config");
    assert!(
        config.lines().any(|l| l == "CONFIG_DUMMY=y"),
        "the option is not in the .config being built"
    );
    assert!(
        !kernels
            .join("out")
            .join(key16)
            .join(".kernel.stamp")
            .exists(),
        "a killed kernel build left a stamp"
    );
}
