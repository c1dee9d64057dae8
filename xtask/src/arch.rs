//! The guest architectures kiln builds for, and every per-arch fact the
//! pipeline needs (Rust target, kernel ARCH, cross compiler, boot image).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::manifest::ImageManifest;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    #[serde(rename = "x86_64")]
    X86_64,
    Aarch64,
    Ppc64le,
    S390x,
}

pub const ALL: [Arch; 4] = [Arch::X86_64, Arch::Aarch64, Arch::Ppc64le, Arch::S390x];

impl Arch {
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

    /// `CROSS_COMPILE=` prefix, or None when building on the same arch.
    pub fn cross_prefix(self) -> Option<&'static str> {
        if self == Arch::host() {
            return None;
        }
        Some(match self {
            Arch::X86_64 => "x86_64-linux-gnu-",
            Arch::Aarch64 => "aarch64-linux-gnu-",
            Arch::Ppc64le => "powerpc64le-linux-gnu-",
            Arch::S390x => "s390x-linux-gnu-",
        })
    }

    /// Debian package providing the cross compiler (None for the host arch).
    pub fn cross_gcc_package(self) -> Option<&'static str> {
        self.cross_prefix().map(|_| match self {
            Arch::X86_64 => "gcc-x86-64-linux-gnu",
            Arch::Aarch64 => "gcc-aarch64-linux-gnu",
            Arch::Ppc64le => "gcc-powerpc64le-linux-gnu",
            Arch::S390x => "gcc-s390x-linux-gnu",
        })
    }

    /// Debian package with the target's C library for the agent's static link
    /// (None where rustc's self-contained musl CRT needs no system libc).
    pub fn cross_libc_package(self) -> Option<&'static str> {
        self.cross_prefix()?;
        match self {
            // +crt-static glibc: the cross gcc links libc.a, libpthread.a... from here.
            Arch::Ppc64le => Some("libc6-dev-ppc64el-cross"),
            Arch::S390x => Some("libc6-dev-s390x-cross"),
            // musl: rustc ships crt objects and libc.a; the cross gcc only drives the link.
            Arch::X86_64 | Arch::Aarch64 => None,
        }
    }

    /// Debian package with the target's C library for static C programs (the
    /// workload container rootfs's `programs`); None for the host arch.
    pub fn cross_c_program_libc_package(self) -> Option<&'static str> {
        self.cross_prefix()?;
        Some(match self {
            Arch::X86_64 => "libc6-dev-amd64-cross",
            Arch::Aarch64 => "libc6-dev-arm64-cross",
            Arch::Ppc64le => "libc6-dev-ppc64el-cross",
            Arch::S390x => "libc6-dev-s390x-cross",
        })
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

    /// Debian package with the QEMU system emulator for this arch.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
            Arch::Ppc64le => "qemu-system-ppc",
            Arch::S390x => "qemu-system-misc",
        }
    }

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

/// `--arch` value: one architecture or `all`.
#[derive(Clone, Copy, Debug)]
pub enum ArchSel {
    One(Arch),
    All,
}

impl FromStr for ArchSel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            Ok(ArchSel::All)
        } else {
            s.parse().map(ArchSel::One)
        }
    }
}

impl ArchSel {
    pub fn arches(self) -> Vec<Arch> {
        match self {
            ArchSel::One(a) => vec![a],
            ArchSel::All => ALL.to_vec(),
        }
    }

    /// The selected arches, checked against what the image supports.
    pub fn arches_for(self, image: &ImageManifest) -> anyhow::Result<Vec<Arch>> {
        match self {
            ArchSel::All => Ok(image.arches.clone()),
            ArchSel::One(a) if image.arches.contains(&a) => Ok(vec![a]),
            ArchSel::One(a) => anyhow::bail!(
                "image `{}` is not built for {a}: its manifest lists arches {:?}; add `{a}` to `arches` in image-manifests/{}.toml",
                image.name,
                image.arches.iter().map(|a| a.name()).collect::<Vec<_>>(),
                image.name
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_aliases_and_rejects_unknown() {
        assert_eq!("amd64".parse::<Arch>().unwrap(), Arch::X86_64);
        assert_eq!("arm64".parse::<Arch>().unwrap(), Arch::Aarch64);
        let err = "mips".parse::<Arch>().unwrap_err();
        assert!(err.contains("mips") && err.contains("x86_64"), "{err}");
        assert!(matches!("all".parse::<ArchSel>().unwrap(), ArchSel::All));
    }

    #[test]
    fn static_targets_per_arch() {
        assert!(Arch::X86_64.rust_target().ends_with("musl"));
        assert!(Arch::Aarch64.rust_target().ends_with("musl"));
        assert!(Arch::Ppc64le.rust_target().ends_with("gnu"));
        assert!(Arch::S390x.rust_target().ends_with("gnu"));
    }
}
