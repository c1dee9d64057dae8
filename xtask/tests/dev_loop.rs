//! `cargo xtask dev --watch` end to end: a real VM comes up and passes the
//! smoke sequence; a save that does not compile leaves that VM running; a
//! save that compiles replaces it with a VM running the edited agent.
//!
//! Edits agent/src/main.rs of this checkout (restored on every exit path), so
//! it is ignored by default; `cargo xtask test` runs it after the images are
//! built, when nothing else is compiling the agent.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Puts the agent's main.rs back however the test ends.
struct Restore {
    path: PathBuf,
    original: String,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.original);
    }
}

/// The dev loop, killed (with its VM, by SIGINT first) if the test fails.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own unreaped child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            for _ in 0..300 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a line containing `needle`; returns it and everything seen so far.
fn wait_line(
    rx: &mpsc::Receiver<String>,
    seen: &mut Vec<String>,
    needle: &str,
    secs: u64,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(_) => panic!(
                "no line with {needle:?} within {secs} s; dev printed:\n{}",
                seen.join("\n")
            ),
        }
    }
}

fn report(line: &str) -> serde_json::Value {
    serde_json::from_str(line.trim_start_matches("dev-report:").trim()).expect("report JSON")
}

fn shim() -> PathBuf {
    root().join("target/debug/kiln-shim")
}

fn agent_answers(run_dir: &str) -> bool {
    Command::new(shim())
        .args(["agent", "--vm", run_dir, "Check"])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("SERVING"))
        .unwrap_or(false)
}

#[test]
#[ignore = "boots VMs and edits agent/src/main.rs; run by `cargo xtask test`"]
fn watch_rebuilds_on_save_and_keeps_the_vm_on_a_compile_error() {
    let main_rs = root().join("agent/src/main.rs");
    let original = std::fs::read_to_string(&main_rs).unwrap();
    assert!(original.contains("\"kiln-agent starting\""));
    let _restore = Restore {
        path: main_rs.clone(),
        original: original.clone(),
    };

    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["dev", "--watch", "--cycles", "2", "--log", "info"])
        .current_dir(root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cargo xtask dev");
    let stdout = child.stdout.take().unwrap();
    let dev = Dev(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();

    // Cycle 1: built (a first agent-dev compile can take minutes), booted, smoke passed.
    let first = report(&wait_line(&rx, &mut seen, "dev-report:", 1200));
    assert_eq!(first["cycle"], 1);
    let smoke: Vec<&str> = first["smoke"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        smoke,
        ["Check", "GetGuestDetails", "CreateContainer+Start", "Exec"]
    );
    let dir1 = first["run_dir"].as_str().expect("a VM kept up").to_string();
    assert!(agent_answers(&dir1), "the VM of cycle 1 answers");
    wait_line(&rx, &mut seen, "watching agent/", 60);

    // A save that does not compile: reported, and the VM of cycle 1 stays.
    std::fs::write(&main_rs, format!("{original}\nfn dev_watch_broken( {{\n")).unwrap();
    let failed = wait_line(&rx, &mut seen, "build failed", 600);
    assert!(failed.contains("keeps running"), "{failed}");
    assert!(
        agent_answers(&dir1),
        "the VM of cycle 1 survived the failed build"
    );

    // A save that compiles and changes what the agent logs: a new VM with it.
    let edited = original.replace(
        "\"kiln-agent starting\"",
        "\"kiln-agent starting (dev-watch edit)\"",
    );
    std::fs::write(&main_rs, edited).unwrap();
    let next = report(&wait_line(&rx, &mut seen, "dev-report:", 900));
    assert_eq!(next["cycle"], 3, "cycle 2 was the failed build");
    assert!(
        next["cargo_seconds"].as_f64().unwrap() > 0.0,
        "the agent was recompiled"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("kiln-agent starting (dev-watch edit)")),
        "the new VM runs the edited agent (its console shows the new log line)"
    );
    assert!(
        !Path::new(&dir1).exists(),
        "the VM of cycle 1 was torn down first"
    );

    // Two cycles passed: dev stops its VM and exits 0.
    let mut dev = dev;
    let status = dev.0.wait().unwrap();
    assert!(status.success(), "cargo xtask dev exited with {status}");
    let dir3 = next["run_dir"].as_str().unwrap();
    assert!(
        !Path::new(dir3).exists(),
        "the last VM is cleaned up on exit"
    );
}
