//! Proof that a binary is static and for the guest's arch: no program
//! interpreter (`PT_INTERP`), no needed shared libraries (`DT_NEEDED`), and
//! the machine and byte order of the arch. Read from the ELF itself, because
//! `file`/`ldd` output differs between hosts and cannot see foreign arches.

use goblin::elf::header::{EM_AARCH64, EM_PPC64, EM_S390, EM_X86_64};
use goblin::elf::Elf;
use kiln_manifest::Arch;

#[derive(Debug, PartialEq, Eq)]
pub struct ElfFacts {
    pub machine: u16,
    pub little_endian: bool,
    pub interpreter: Option<String>,
    pub needed: Vec<String>,
}

pub fn facts(bytes: &[u8]) -> anyhow::Result<ElfFacts> {
    let elf = Elf::parse(bytes).map_err(|e| anyhow::anyhow!("not a readable ELF file: {e}"))?;
    Ok(ElfFacts {
        machine: elf.header.e_machine,
        little_endian: elf.little_endian,
        interpreter: elf.interpreter.map(str::to_string),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
    })
}

/// `e_machine` and byte order of `arch`'s binaries.
fn elf_identity(arch: Arch) -> (u16, bool) {
    match arch {
        Arch::X86_64 => (EM_X86_64, true),
        Arch::Aarch64 => (EM_AARCH64, true),
        Arch::Ppc64le => (EM_PPC64, true),
        Arch::S390x => (EM_S390, false),
    }
}

/// Fails with a message saying why `what` is not a static binary for `arch`
/// (a binary for another arch would only fail in the guest, as ENOEXEC).
pub fn require_static(what: &str, bytes: &[u8], arch: Arch) -> anyhow::Result<()> {
    let f = facts(bytes)?;
    let want = elf_identity(arch);
    if (f.machine, f.little_endian) != want {
        let found = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::S390x]
            .into_iter()
            .find(|a| elf_identity(*a) == (f.machine, f.little_endian))
            .map_or_else(
                || {
                    format!(
                        "e_machine {}, {}-endian",
                        f.machine,
                        if f.little_endian { "little" } else { "big" }
                    )
                },
                |a| a.to_string(),
            );
        anyhow::bail!(
            "{what} is built for {found}, not {arch}: build it for the guest's target ({})",
            arch.rust_target()
        );
    }
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
        let err = require_static("test binary", &me, Arch::host())
            .unwrap_err()
            .to_string();
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
        require_static("busybox", &bytes, Arch::host()).unwrap();
        // The same binary for another arch's guest: named, not accepted.
        let other = if Arch::host() == Arch::S390x {
            Arch::X86_64
        } else {
            Arch::S390x
        };
        let err = require_static("busybox", &bytes, other)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("built for {}, not {other}", Arch::host())),
            "{err}"
        );
    }

    /// Every arch's identity is distinct, so a wrong-arch binary is named.
    #[test]
    fn arches_have_distinct_elf_identities() {
        let all = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::S390x];
        for a in all {
            for b in all {
                assert_eq!(a == b, elf_identity(a) == elf_identity(b), "{a} {b}");
            }
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(facts(b"\x7fELF\x02\x01garbage").is_err());
        assert!(facts(b"").is_err());
    }
}
