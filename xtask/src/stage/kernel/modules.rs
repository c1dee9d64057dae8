//! Loadable modules of a kernel build: collected from `make modules_install`
//! into the kernel's cache entry, indexed by name, and picked per image.
//!
//! The index is a `modules.dep` kiln writes itself (depmod's text format:
//! `kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko`,
//! every dependency listed, direct and indirect), made from the `depends=`
//! line modpost writes into each module's `.mod.c`. No host depmod is
//! involved, so a cross build needs nothing beyond the cross compiler, and the
//! file's bytes depend only on the kernel build.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cache::{copy_atomic, write_atomic};

/// Directory under a kernel's cache entry holding its modules.
pub const DIR: &str = "modules";
pub const DEP: &str = "modules.dep";
pub const BUILTIN: &str = "modules.builtin";

/// A module's canonical name: file stem with `-` as `_` (what the kernel and
/// /proc/modules call it).
pub fn canonical(name: &str) -> String {
    let stem = name.rsplit('/').next().unwrap_or(name);
    let stem = stem.strip_suffix(".ko").unwrap_or(stem);
    stem.replace('-', "_")
}

/// One kernel's modules: name → path (relative to the modules directory) and
/// direct dependencies; plus the names built into the kernel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModuleIndex {
    pub modules: BTreeMap<String, Module>,
    pub builtin: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// e.g. `kernel/net/bridge/bridge.ko`.
    pub path: String,
    /// Direct dependencies, by name.
    pub depends: Vec<String>,
}

impl ModuleIndex {
    /// Reads `modules.dep` and `modules.builtin` from `dir`. The direct
    /// dependencies are not in modules.dep (it lists the closure); they are
    /// recovered as "listed dependencies not needed by another listed one".
    pub fn load(dir: &Path) -> anyhow::Result<ModuleIndex> {
        let dep = fs::read_to_string(dir.join(DEP))
            .with_context(|| format!("reading {}", dir.join(DEP).display()))?;
        let builtin = fs::read_to_string(dir.join(BUILTIN)).unwrap_or_default();
        let mut idx = ModuleIndex::parse(&dep, &builtin)?;
        idx.reduce_to_direct();
        Ok(idx)
    }

    /// Parses modules.dep text (closures as listed) and modules.builtin.
    pub fn parse(dep: &str, builtin: &str) -> anyhow::Result<ModuleIndex> {
        let mut modules = BTreeMap::new();
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) = line.split_once(':').with_context(|| {
                format!(
                    "modules.dep line {}: expected `path: deps`, got {line:?}",
                    n + 1
                )
            })?;
            let module = Module {
                path: path.trim().to_string(),
                depends: deps.split_whitespace().map(canonical).collect(),
            };
            modules.insert(canonical(path.trim()), module);
        }
        let builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| canonical(l.trim()))
            .collect();
        Ok(ModuleIndex { modules, builtin })
    }

    fn reduce_to_direct(&mut self) {
        let closures: BTreeMap<String, BTreeSet<String>> = self
            .modules
            .iter()
            .map(|(n, m)| (n.clone(), m.depends.iter().cloned().collect()))
            .collect();
        for m in self.modules.values_mut() {
            let all: BTreeSet<String> = m.depends.iter().cloned().collect();
            m.depends.retain(|d| {
                !all.iter()
                    .any(|o| o != d && closures.get(o).is_some_and(|c| c.contains(d)))
            });
        }
    }

    /// `names` and everything they depend on, dependencies first (the order
    /// to load them in). Errors name the module and say what to do.
    pub fn closure(&self, names: &[String]) -> anyhow::Result<Vec<String>> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for n in names {
            let c = canonical(n);
            if !self.modules.contains_key(&c) {
                if self.builtin.contains(&c) {
                    anyhow::bail!(
                        "module `{n}` is built into the kernel, not a module: remove it from `rootfs.modules`"
                    );
                }
                anyhow::bail!(
                    "module `{n}` is not among the kernel's {} module(s) ({}): set its option to `m` in a fragment the image's [kernel] features include (e.g. kernel-configs/features/modules.conf)",
                    self.modules.len(),
                    self.modules.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            self.visit(&c, &mut seen, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            anyhow::bail!(
                "modules depend on each other in a cycle: {} → {name}",
                stack.join(" → ")
            );
        }
        let m = self.modules.get(name).with_context(|| {
            format!(
                "module `{}` depends on `{name}`, which was not built",
                stack.last().map_or("?", String::as_str)
            )
        })?;
        stack.push(name.to_string());
        for d in &m.depends {
            self.visit(d, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }

    /// modules.dep text for `names` (each must be in the index, with its
    /// dependencies): one line per module, sorted by path, dependencies as
    /// their full closure, nearest first (depmod's layout).
    pub fn render_dep(&self, names: &[String]) -> anyhow::Result<String> {
        let mut lines = BTreeMap::new();
        for n in names {
            let m = &self.modules[n];
            let mut load = self.closure(std::slice::from_ref(n))?;
            load.pop(); // the module itself
            load.reverse();
            let deps: Vec<&str> = load.iter().map(|d| self.modules[d].path.as_str()).collect();
            let line = if deps.is_empty() {
                format!("{}:", m.path)
            } else {
                format!("{}: {}", m.path, deps.join(" "))
            };
            lines.insert(m.path.clone(), line);
        }
        Ok(lines.into_values().map(|l| l + "\n").collect())
    }
}

/// Copies the modules `make modules_install` put under `install` (the
/// `lib/modules/<release>` directory) into `out` (the cache entry's
/// `modules/`), writing modules.dep from the build tree's `.mod.c` files.
/// Returns the written files, relative to `out`'s parent, for the stamp.
pub fn collect(build: &Path, install: &Path, out: &Path) -> anyhow::Result<Vec<String>> {
    let _ = fs::remove_dir_all(out);
    let mut found = Vec::new();
    for e in walkdir::WalkDir::new(install.join("kernel")).sort_by_file_name() {
        let e = e.with_context(|| format!("walking {}", install.display()))?;
        if e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "ko") {
            let rel = e
                .path()
                .strip_prefix(install)
                .expect("walk stays under its root")
                .to_string_lossy()
                .into_owned();
            found.push(rel);
        }
    }
    let mut index = ModuleIndex::default();
    for rel in &found {
        let in_build = Path::new(rel.trim_start_matches("kernel/")).with_extension("mod.c");
        let modc = build.join(&in_build);
        let text = fs::read_to_string(&modc)
            .with_context(|| format!("reading {} (written by modpost)", modc.display()))?;
        index.modules.insert(
            canonical(rel),
            Module {
                path: rel.clone(),
                depends: depends_of_mod_c(&text),
            },
        );
    }
    let builtin_src = install.join(BUILTIN);
    let builtin = fs::read_to_string(&builtin_src).unwrap_or_default();
    // Check every dependency resolves before writing anything.
    let names: Vec<String> = index.modules.keys().cloned().collect();
    let dep = index.render_dep(&names)?;
    let mut written = Vec::new();
    for rel in &found {
        let dest = out.join(rel);
        fs::create_dir_all(dest.parent().expect("a module has a directory"))?;
        copy_atomic(&install.join(rel), &dest)?;
        written.push(format!("{DIR}/{rel}"));
    }
    fs::create_dir_all(out)?;
    write_atomic(&out.join(DEP), dep.as_bytes())?;
    write_atomic(&out.join(BUILTIN), builtin.as_bytes())?;
    written.push(format!("{DIR}/{DEP}"));
    written.push(format!("{DIR}/{BUILTIN}"));
    Ok(written)
}

/// `MODULE_INFO(depends, "stp,llc");` in a modpost-generated `.mod.c`.
fn depends_of_mod_c(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("MODULE_INFO(depends, \""))
        .filter_map(|rest| rest.split_once('"').map(|(list, _)| list))
        .flat_map(|list| list.split(',').filter(|s| !s.is_empty()).map(canonical))
        .collect()
}

/// Where an image's tree keeps modules: `lib/modules/<release>`, or
/// `usr/lib/modules/<release>` when `lib` is the merged-/usr symlink.
pub fn tree_dir(lib_is_symlink: bool, release: &str) -> PathBuf {
    let base = if lib_is_symlink {
        "usr/lib/modules"
    } else {
        "lib/modules"
    };
    Path::new(base).join(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP_TEXT: &str =
        "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
                            kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
                            kernel/net/llc/llc.ko:\n\
                            kernel/drivers/net/dummy.ko:\n";

    fn index() -> ModuleIndex {
        let mut i = ModuleIndex::parse(DEP_TEXT, "kernel/drivers/vfio/pci/vfio-pci.ko\n").unwrap();
        i.reduce_to_direct();
        i
    }

    #[test]
    fn closure_loads_dependencies_first() {
        let i = index();
        assert_eq!(i.modules["bridge"].depends, ["stp"], "llc is only indirect");
        assert_eq!(
            i.closure(&["bridge".into(), "dummy".into()]).unwrap(),
            ["llc", "stp", "bridge", "dummy"]
        );
        assert_eq!(
            i.closure(&["llc".into(), "stp".into()]).unwrap(),
            ["llc", "stp"]
        );
    }

    #[test]
    fn render_round_trips_through_parse() {
        let i = index();
        let names = i.closure(&["bridge".into()]).unwrap();
        let text = i.render_dep(&names).unwrap();
        assert_eq!(
            text,
            "kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
             kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/llc/llc.ko:\n"
        );
        let mut again = ModuleIndex::parse(&text, "").unwrap();
        again.reduce_to_direct();
        assert_eq!(again.closure(&["bridge".into()]).unwrap(), names);
    }

    #[test]
    fn unknown_and_builtin_names_are_explained() {
        let i = index();
        let e = i.closure(&["nosuch".into()]).unwrap_err().to_string();
        assert!(
            e.contains("`nosuch`") && e.contains("bridge, dummy, llc, stp"),
            "{e}"
        );
        let e = i.closure(&["vfio_pci".into()]).unwrap_err().to_string();
        assert!(e.contains("built into the kernel"), "{e}");
        // Dashes and underscores name the same module.
        assert_eq!(
            i.closure(&["vfio-pci".into()]).unwrap_err().to_string(),
            e.replace("vfio_pci", "vfio-pci")
        );
    }

    #[test]
    fn reads_depends_from_mod_c() {
        let text = "#include <linux/module.h>\nMODULE_INFO(intree, \"Y\");\n\nMODULE_INFO(depends, \"stp,llc\");\n";
        assert_eq!(depends_of_mod_c(text), ["stp", "llc"]);
        assert!(depends_of_mod_c("MODULE_INFO(depends, \"\");\n").is_empty());
    }

    #[test]
    fn collect_copies_modules_and_writes_the_index() {
        let d = tempfile::tempdir().unwrap();
        let (build, install, out) = (d.path().join("b"), d.path().join("i"), d.path().join("o"));
        for (rel, deps) in [
            ("net/llc/llc", ""),
            ("net/802/stp", "llc"),
            ("net/bridge/bridge", "stp,llc"),
        ] {
            let ko = install.join("kernel").join(format!("{rel}.ko"));
            fs::create_dir_all(ko.parent().unwrap()).unwrap();
            fs::write(&ko, rel).unwrap();
            let modc = build.join(format!("{rel}.mod.c"));
            fs::create_dir_all(modc.parent().unwrap()).unwrap();
            fs::write(&modc, format!("MODULE_INFO(depends, \"{deps}\");\n")).unwrap();
        }
        fs::write(install.join(BUILTIN), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let written = collect(&build, &install, &out).unwrap();
        assert!(written.contains(&"modules/kernel/net/bridge/bridge.ko".to_string()));
        let i = ModuleIndex::load(&out).unwrap();
        assert_eq!(
            i.closure(&["bridge".into()]).unwrap(),
            ["llc", "stp", "bridge"]
        );
        assert!(i.builtin.contains("ext4"));
        assert_eq!(
            fs::read_to_string(out.join("kernel/net/llc/llc.ko")).unwrap(),
            "net/llc/llc"
        );
    }
}
