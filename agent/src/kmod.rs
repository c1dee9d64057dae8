//! Kernel modules for CreateSandbox's `kernel_modules`, loaded without
//! modprobe: the minimal image has no kmod, and the Debian one need not.
//!
//! The image carries `lib/modules/<release>/` (or `usr/lib/modules/…` under a
//! merged /usr) with the chosen `.ko` files, a `modules.dep` in depmod's text
//! format and `modules.builtin`. A request is resolved against those,
//! dependencies are loaded first with finit_module(2), and a module that is
//! already loaded or built in counts as loaded (modprobe's behaviour).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{invalid, not_found, os, AgentError};
use crate::guest::GuestFs;

type Result<T> = std::result::Result<T, AgentError>;

/// What loading a module did.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    /// These modules were inserted, dependencies first.
    Inserted(Vec<String>),
    /// Already in the kernel (loaded before, or built in).
    Present,
}

/// The kernel's name for a module: `-` and `_` are the same to it.
pub fn canonical(name: &str) -> String {
    let stem = name.rsplit('/').next().unwrap_or(name);
    stem.strip_suffix(".ko").unwrap_or(stem).replace('-', "_")
}

/// Loads `name` (with `params` for it, not for its dependencies).
pub fn load(guest: &GuestFs, release: &str, name: &str, params: &[String]) -> Result<Loaded> {
    let want = canonical(name);
    let Some(dir) = modules_dir(guest, release) else {
        return if present(guest, &want) {
            Ok(Loaded::Present)
        } else {
            Err(not_found(format!(
                "kernel module {name}: the image has no /lib/modules/{release}; add it to `rootfs.modules` in the image manifest"
            )))
        };
    };
    let index = Index::read(&dir)?;
    if !index.deps.contains_key(&want) {
        if index.builtin.contains(&want) || present(guest, &want) {
            return Ok(Loaded::Present);
        }
        return Err(not_found(format!(
            "kernel module {name} is not in the image (it has: {}); add it to `rootfs.modules` in the image manifest",
            index.deps.keys().cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    let order = index.load_order(&want)?;
    let mut inserted = Vec::new();
    for m in &order {
        if present(guest, m) {
            continue;
        }
        let args = if *m == want {
            params.join(" ")
        } else {
            String::new()
        };
        if insert(&dir.join(&index.deps[m].0), &args)? {
            inserted.push(m.clone());
        }
    }
    Ok(if inserted.is_empty() {
        Loaded::Present
    } else {
        Loaded::Inserted(inserted)
    })
}

fn modules_dir(guest: &GuestFs, release: &str) -> Option<PathBuf> {
    ["/lib/modules", "/usr/lib/modules"]
        .iter()
        .map(|b| guest.path(&format!("{b}/{release}")))
        .find(|d| d.join("modules.dep").is_file())
}

/// Loaded (or built in with a /sys/module entry).
fn present(guest: &GuestFs, name: &str) -> bool {
    guest.path(&format!("/sys/module/{name}")).exists()
}

/// finit_module(2). Returns false when the kernel already had it (EEXIST).
fn insert(path: &Path, args: &str) -> Result<bool> {
    let f = File::open(path).map_err(|e| os(format!("opening {}", path.display()), e))?;
    let args = std::ffi::CString::new(args)
        .map_err(|_| invalid("kernel module parameters contain a NUL byte"))?;
    match nix::kmod::finit_module(&f, &args, nix::kmod::ModuleInitFlags::empty()) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(e) => Err(os(format!("finit_module {}", path.display()), e)),
    }
}

/// modules.dep and modules.builtin of one release.
struct Index {
    /// name → (path relative to the modules directory, dependency names).
    deps: BTreeMap<String, (String, Vec<String>)>,
    builtin: Vec<String>,
}

impl Index {
    fn read(dir: &Path) -> Result<Index> {
        let dep_path = dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path)
            .map_err(|e| os(format!("reading {}", dep_path.display()), e))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        Ok(Index::parse(&dep, &builtin))
    }

    fn parse(dep: &str, builtin: &str) -> Index {
        let deps = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(path, ds)| {
                let path = path.trim().to_string();
                (
                    canonical(&path),
                    (path, ds.split_whitespace().map(canonical).collect()),
                )
            })
            .collect();
        let builtin = builtin.lines().map(|l| canonical(l.trim())).collect();
        Index { deps, builtin }
    }

    /// `name` after everything it needs (each dependency's own line counts,
    /// so the order does not rely on how modules.dep lists the closure).
    fn load_order(&self, name: &str) -> Result<Vec<String>> {
        let mut order = Vec::new();
        self.visit(name, &mut Vec::new(), &mut order)?;
        Ok(order)
    }

    fn visit(&self, name: &str, stack: &mut Vec<String>, order: &mut Vec<String>) -> Result<()> {
        if order.iter().any(|o| o == name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) || stack.len() > 64 {
            return Err(invalid(format!(
                "modules.dep has a dependency cycle through {name}"
            )));
        }
        let Some((_, deps)) = self.deps.get(name) else {
            return Err(not_found(format!(
                "kernel module {} needs {name}, which the image's modules.dep does not list",
                stack.last().map_or(name, String::as_str)
            )));
        };
        stack.push(name.to_string());
        for d in deps {
            self.visit(d, stack, order)?;
        }
        stack.pop();
        order.push(name.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
                       kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
                       kernel/net/llc/llc.ko:\n\
                       kernel/drivers/net/dummy.ko:\n";

    #[test]
    fn dependencies_load_first_whatever_the_listing_order() {
        let i = Index::parse(DEP, "");
        assert_eq!(i.load_order("bridge").unwrap(), ["llc", "stp", "bridge"]);
        // depmod lists the closure nearest-first; a file listing it the other way round gives the same order.
        let swapped = DEP.replace(
            "kernel/net/802/stp.ko kernel/net/llc/llc.ko",
            "kernel/net/llc/llc.ko kernel/net/802/stp.ko",
        );
        assert_eq!(
            Index::parse(&swapped, "").load_order("bridge").unwrap(),
            ["llc", "stp", "bridge"]
        );
        assert_eq!(i.load_order("dummy").unwrap(), ["dummy"]);
    }

    #[test]
    fn a_missing_dependency_or_cycle_is_an_error_not_a_hang() {
        let i = Index::parse("kernel/a.ko: kernel/b.ko\n", "");
        let e = i.load_order("a").unwrap_err().to_string();
        assert!(e.contains("needs b"), "{e}");
        let i = Index::parse("kernel/a.ko: kernel/b.ko\nkernel/b.ko: kernel/a.ko\n", "");
        assert!(i.load_order("a").unwrap_err().to_string().contains("cycle"));
    }

    fn fake_guest(with_modules: bool) -> (tempfile::TempDir, GuestFs) {
        let d = tempfile::tempdir().unwrap();
        let g = GuestFs::new(d.path());
        if with_modules {
            let dir = g.path("/usr/lib/modules/6.12.57");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("modules.dep"), DEP).unwrap();
            std::fs::write(
                dir.join("modules.builtin"),
                "kernel/drivers/vfio/pci/vfio-pci.ko\n",
            )
            .unwrap();
        }
        std::fs::create_dir_all(g.path("/sys/module/llc")).unwrap();
        (d, g)
    }

    #[test]
    fn builtin_loaded_and_unknown_modules() {
        let (_d, g) = fake_guest(true);
        // Built in (by either spelling) and already loaded: nothing to insert.
        assert_eq!(
            load(&g, "6.12.57", "vfio-pci", &[]).unwrap(),
            Loaded::Present
        );
        assert_eq!(load(&g, "6.12.57", "llc", &[]).unwrap(), Loaded::Present);
        let e = load(&g, "6.12.57", "nosuch", &[]).unwrap_err().to_string();
        assert!(
            e.contains("nosuch")
                && e.contains("bridge, dummy, llc, stp")
                && e.contains("rootfs.modules"),
            "{e}"
        );
        let (_d, g) = fake_guest(false);
        let e = load(&g, "6.12.57", "bridge", &[]).unwrap_err().to_string();
        assert!(e.contains("no /lib/modules/6.12.57"), "{e}");
    }

    #[test]
    fn a_module_file_that_is_not_a_module_is_refused_by_the_kernel_or_permission() {
        // Not root or not a module: finit_module fails, and the error names the file.
        let (_d, g) = fake_guest(true);
        let dir = g.path("/usr/lib/modules/6.12.57/kernel/drivers/net");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dummy.ko"), b"not an ELF file").unwrap();
        let e = load(&g, "6.12.57", "dummy", &[]).unwrap_err().to_string();
        assert!(e.contains("finit_module") && e.contains("dummy.ko"), "{e}");
    }
}
