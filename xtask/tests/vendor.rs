//! A packager's vendored build: `cargo vendor` once, then the agent builds
//! with `--offline` from a CARGO_HOME that holds nothing at all, so no crate
//! can come from the registry cache or the network, only from `vendor/`.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn run(what: &str, c: &mut Command) -> Output {
    let out = c.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
#[ignore = "vendors every crate and builds the agent; run by `cargo xtask test`"]
fn a_vendored_checkout_builds_the_agent_with_an_empty_cargo_home() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A clone, so the test's vendor/ and config never touch the checkout (it
    // builds HEAD: what a packager's tarball holds).
    let checkout = tmp.path().join("kiln");
    run(
        "git clone",
        Command::new("git")
            .args(["clone", "--quiet", "--no-hardlinks"])
            .arg(root)
            .arg(&checkout),
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // `cargo vendor` prints the source replacement to append to the config
    // (not with --quiet, which silences that too).
    let vendored = run(
        "cargo vendor",
        Command::new(&cargo)
            .args(["vendor", "--locked", "vendor"])
            .current_dir(&checkout),
    );
    let config = checkout.join(".cargo/config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&vendored.stdout));
    std::fs::write(&config, text).unwrap();
    assert!(checkout.join("vendor/ttrpc/Cargo.toml").is_file());

    let home = tmp.path().join("cargo-home");
    std::fs::create_dir(&home).unwrap();
    let out = tmp.path().join("out");
    run(
        "cargo xtask --offline build-agent from vendor/",
        Command::new(&cargo)
            .args(["xtask", "--offline", "build-agent", "--arch", "x86_64"])
            .current_dir(&checkout)
            .env("CARGO_HOME", &home)
            .env("CARGO_NET_OFFLINE", "true")
            .env("KILN_OUT_DIR", &out)
            .env("KILN_CACHE_DIR", tmp.path().join("cache"))
            .env_remove("CARGO_TARGET_DIR"),
    );
    // Nothing was fetched: the empty CARGO_HOME grew no registry or git cache.
    for fetched in ["registry", "git"] {
        assert!(
            !home.join(fetched).exists(),
            "cargo reached for {fetched} under the empty CARGO_HOME"
        );
    }
    // The result is the real, static agent.
    let agent = out.join("agent/x86_64/kiln-agent");
    let elf = std::fs::read(&agent).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert!(
        !elf.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "the vendored agent is static, with no dynamic loader"
    );
    let version = run(
        "kiln-agent --version",
        Command::new(&agent).arg("--version"),
    );
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
}
