//! Proof that a binary is static: no program interpreter (`PT_INTERP`) and no
//! needed shared libraries (`DT_NEEDED`). Read from the ELF itself, because
//! `file`/`ldd` output differs between hosts and cannot see foreign arches.

use goblin::elf::Elf;

#[derive(Debug, PartialEq, Eq)]
pub struct ElfFacts {
    pub machine: u16,
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
}

pub fn facts(bytes: &[u8]) -> anyhow::Result<ElfFacts> {
    let elf = Elf::parse(bytes).map_err(|e| anyhow::anyhow!("not a readable ELF file: {e}"))?;
    Ok(ElfFacts {
        machine: elf.header.e_machine,
        interpreter: elf.interpreter.map(str::to_string),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
    })
}

/// Fails with a message saying why `what` is not static.
pub fn require_static(what: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let f = facts(bytes)?;
    let mut problems = Vec::new();
    if let Some(interp) = &f.interpreter {
        problems.push(format!(
            "it has a PT_INTERP program header (dynamic loader {interp})"
        ));
    }
    if !f.needed.is_empty() {
        problems.push(format!(
            "it needs shared libraries (DT_NEEDED: {})",
            f.needed.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "{what} is dynamically linked: {}. The guest has no libc to load it from; build it with `-C target-feature=+crt-static` for a musl or static-glibc target",
            problems.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_test_binary_is_dynamic_and_rejected() {
        // The test harness itself is a normal dynamically linked glibc binary.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = require_static("test binary", &me).unwrap_err().to_string();
        assert!(
            err.contains("PT_INTERP") && err.contains("DT_NEEDED"),
            "{err}"
        );
    }

    #[test]
    fn static_busybox_passes_when_present() {
        let Ok(bytes) = std::fs::read("/bin/busybox") else {
            eprintln!("note: /bin/busybox (busybox-static) missing; cargo xtask setup installs it");
            return;
        };
        require_static("busybox", &bytes).unwrap();
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(facts(b"\x7fELF\x02\x01garbage").is_err());
        assert!(facts(b"").is_err());
    }
}
