//! The guest architectures kiln builds for and boots, with every per-arch
//! fact that is pure data: names, Rust target, kernel build names, console,
//! Debian names and the QEMU system emulator and machine type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
    Ppc64le,
    S390x,
}

/// Every arch, in the order kiln lists them.
pub const ALL: [Arch; 4] = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::S390x];

impl Arch {
    /// kiln's name (manifest.json, `--arch`, directory names).
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Ppc64le => "ppc64le",
            Arch::S390x => "s390x",
        }
    }

    /// Rust target triple of the agent: musl where Rust has it, else static glibc.
    pub fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-musl",
            Arch::Aarch64 => "aarch64-unknown-linux-musl",
            Arch::Ppc64le => "powerpc64le-unknown-linux-gnu",
            Arch::S390x => "s390x-unknown-linux-gnu",
        }
    }

    /// `ARCH=` for the kernel's make.
    pub fn kernel_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86",
            Arch::Aarch64 => "arm64",
            Arch::Ppc64le => "powerpc",
            Arch::S390x => "s390",
        }
    }

    /// Directory name of this arch's fragments under kernel-configs/.
    pub fn fragment_dir(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "arm64",
            Arch::Ppc64le => "ppc64le",
            Arch::S390x => "s390x",
        }
    }

    /// The make target and the resulting path (relative to the build tree) of the boot image.
    pub fn kernel_image(self) -> (&'static str, &'static str) {
        match self {
            Arch::X86_64 => ("bzImage", "arch/x86/boot/bzImage"),
            Arch::Aarch64 => ("Image", "arch/arm64/boot/Image"),
            Arch::Ppc64le => ("vmlinux", "vmlinux"),
            Arch::S390x => ("bzImage", "arch/s390/boot/bzImage"),
        }
    }

    /// Kernel console device on the machine type kiln-shim uses for this arch.
    pub fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
            Arch::Ppc64le => "hvc0",
            Arch::S390x => "ttysclp0",
        }
    }

    /// Debian's name for the arch (dpkg, mmdebstrap --architectures).
    pub fn debian_arch(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
            Arch::Ppc64le => "ppc64el",
            Arch::S390x => "s390x",
        }
    }

    /// The QEMU system emulator for this arch.
    pub fn qemu_binary(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86_64",
            Arch::Aarch64 => "qemu-system-aarch64",
            Arch::Ppc64le => "qemu-system-ppc64",
            Arch::S390x => "qemu-system-s390x",
        }
    }

    /// The QEMU machine type kiln boots this arch on.
    pub fn qemu_machine(self) -> &'static str {
        match self {
            Arch::X86_64 => "q35",
            Arch::Aarch64 => "virt",
            Arch::Ppc64le => "pseries",
            Arch::S390x => "s390-ccw-virtio",
        }
    }

    /// Debian package with the QEMU system emulator for this arch.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
            Arch::Ppc64le => "qemu-system-ppc",
            Arch::S390x => "qemu-system-misc",
        }
    }

    /// The arch this program was compiled for (x86_64 for any other).
    pub fn host() -> Arch {
        match std::env::consts::ARCH {
            "aarch64" => Arch::Aarch64,
            "powerpc64" => Arch::Ppc64le,
            "s390x" => Arch::S390x,
            _ => Arch::X86_64,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "x86_64" | "amd64" => Ok(Arch::X86_64),
            "aarch64" | "arm64" => Ok(Arch::Aarch64),
            "ppc64le" | "powerpc64le" => Ok(Arch::Ppc64le),
            "s390x" => Ok(Arch::S390x),
            other => Err(format!(
                "unknown architecture `{other}`: use one of x86_64, aarch64, ppc64le, s390x (or `all`)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_match_serde() {
        for a in ALL {
            assert_eq!(a.name().parse::<Arch>().unwrap(), a);
            assert_eq!(a.to_string(), a.name());
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
            assert_eq!(serde_json::from_str::<Arch>(&json).unwrap(), a);
        }
    }

    #[test]
    fn parses_aliases_and_rejects_unknown() {
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::X86_64);
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        let err = "mips".parse::<Arch>().unwrap_err();
        assert!(err.contains("mips") && err.contains("x86_64"), "{err}");
    }

    #[test]
    fn static_targets_per_arch() {
        assert!(Arch::X86_64.rust_target().ends_with("musl"));
        assert!(Arch::Aarch64.rust_target().ends_with("musl"));
        assert!(Arch::Ppc64le.rust_target().ends_with("gnu"));
        assert!(Arch::S390x.rust_target().ends_with("gnu"));
    }

    #[test]
    fn qemu_binary_is_named_for_the_arch() {
        for a in ALL {
            assert!(a.qemu_binary().starts_with("qemu-system-"), "{a}");
        }
        assert_eq!(Arch::X86_64.qemu_machine(), "q35");
    }
}
