//! Stage `rootfs`: a recipe (plus the image manifest's additions) becomes a
//! tree: empty or a Debian base from mmdebstrap, then the recipe's removals,
//! directories, nodes, files, symlinks, the agent and optionally busybox.
//!
//! The plan is cheap (keys, the cached bootstrap, the package list); the tree
//! itself is only written out when a consumer (initrd, disk image) is stale.

pub mod copyright;
pub mod debian;
pub mod postinst;
pub mod tree;

use std::path::PathBuf;

use anyhow::Context;

use crate::arch::Arch;
use crate::ctx::Ctx;
use crate::hash::KeyHasher;
use crate::image_spec::ImageSpec;
use crate::recipe::{LiteralFile, Recipe};
use crate::stage::agent::AgentArtifact;
use crate::stage::kernel::modules::{self, ModuleIndex};
use crate::stage::kernel::KernelArtifact;
use debian::Bootstrap;
use kiln_manifest::Package;
use tree::{Kind, Tree};

/// Where busybox-static installs its binary on a Debian host.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// Everything needed to make the tree, and the key of what it will contain.
pub struct RootfsPlan {
    pub recipe: Recipe,
    pub recipe_sha256: String,
    /// Hash of every input of the tree.
    pub key: String,
    pub bootstrap: Option<Bootstrap>,
    pub agent: AgentArtifact,
    busybox: Option<PathBuf>,
    extra_files: Vec<LiteralFile>,
    modules: Option<ModulePick>,
}

/// Kernel modules the image manifest asks for, resolved against the kernel.
pub struct ModulePick {
    /// The kernel's modules directory (cache) and release.
    dir: PathBuf,
    release: String,
    index: ModuleIndex,
    /// Requested modules and their dependencies, in load order.
    names: Vec<String>,
}

impl RootfsPlan {
    /// Installed Debian packages (empty for recipes without `[debian]`).
    pub fn packages(&self) -> &[Package] {
        self.bootstrap.as_ref().map_or(&[], |b| &b.packages)
    }

    /// The image's kernel modules (path inside the tree for `lib_is_symlink`
    /// as in Debian's merged /usr), in load order.
    pub fn module_records(&self) -> anyhow::Result<Vec<kiln_manifest::ModuleRecord>> {
        let Some(p) = &self.modules else {
            return Ok(Vec::new());
        };
        let merged = self.recipe.debian.as_ref().is_some_and(|d| d.merged_usr);
        let base = modules::tree_dir(merged, &p.release);
        p.names
            .iter()
            .map(|n| {
                let m = &p.index.modules[n];
                let src = p.dir.join(&m.path);
                Ok(kiln_manifest::ModuleRecord {
                    name: n.clone(),
                    path: base.join(&m.path).display().to_string(),
                    size: std::fs::metadata(&src)
                        .with_context(|| format!("reading {}", src.display()))?
                        .len(),
                    sha256: crate::hash::sha256_file(&src)?,
                    depends: m.depends.clone(),
                })
            })
            .collect()
    }

    /// `init=` for booting the image, if the recipe names one.
    pub fn init(&self) -> Option<String> {
        (!self.recipe.init.is_empty()).then(|| format!("/{}", self.recipe.init))
    }

    /// Writes the tree into `dir` (which must not exist).
    pub fn materialize(&self, dir: &std::path::Path) -> anyhow::Result<Tree> {
        let r = &self.recipe;
        let mut t = match &self.bootstrap {
            Some(b) => Tree::from_tar(dir, &b.tarball)
                .with_context(|| format!("unpacking {}", b.tarball.display()))?,
            None => Tree::empty(dir)?,
        };
        if let Some(b) = self.bootstrap.as_ref().filter(|b| b.extracted) {
            postinst::apply(&mut t, b.epoch)
                .context("post-install steps of the extracted Debian tree")?;
        }
        let ctx = |key: &str, path: &str| format!("recipe `{}`, key `{key}`: `{path}`", r.name);
        for p in &r.remove {
            t.remove(p).with_context(|| ctx("remove", p))?;
        }
        for p in &r.empty_dirs {
            t.empty_dir(p).with_context(|| ctx("empty_dirs", p))?;
        }
        for d in &r.directories {
            t.add_dir(d, 0o755).with_context(|| ctx("directories", d))?;
        }
        for n in &r.nodes {
            let kind = match n.kind.as_str() {
                "block" => Kind::Block(n.major, n.minor),
                _ => Kind::Char(n.major, n.minor),
            };
            t.add_node(&n.path, kind, n.mode)
                .with_context(|| ctx("nodes", &n.path))?;
        }
        for f in r.files.iter().chain(&self.extra_files) {
            t.add_file(&f.path, f.mode, f.content.as_bytes())
                .with_context(|| ctx("files", &f.path))?;
        }
        for s in &r.symlinks {
            t.add_symlink(&s.path, &s.target)
                .with_context(|| ctx("symlinks", &s.path))?;
        }
        if let Some(p) = &self.modules {
            let lib_link = matches!(t.get("lib").map(|e| &e.kind), Some(Kind::Symlink(_)));
            let base = modules::tree_dir(lib_link, &p.release);
            let base = base.to_str().context("module paths are UTF-8")?;
            let what = |f: &str| format!("image manifest key `rootfs.modules`: `{base}/{f}`");
            for n in &p.names {
                let m = &p.index.modules[n];
                let bytes = std::fs::read(p.dir.join(&m.path))
                    .with_context(|| format!("reading {}", p.dir.join(&m.path).display()))?;
                t.add_file(&format!("{base}/{}", m.path), 0o644, &bytes)
                    .with_context(|| what(&m.path))?;
            }
            t.add_file(
                &format!("{base}/{}", modules::DEP),
                0o644,
                p.index.render_dep(&p.names)?.as_bytes(),
            )
            .with_context(|| what(modules::DEP))?;
            let builtin = std::fs::read(p.dir.join(modules::BUILTIN)).unwrap_or_default();
            t.add_file(&format!("{base}/{}", modules::BUILTIN), 0o644, &builtin)
                .with_context(|| what(modules::BUILTIN))?;
        }
        let agent = std::fs::read(&self.agent.path)
            .with_context(|| format!("reading {}", self.agent.path.display()))?;
        t.add_file(&r.agent_path, 0o755, &agent)
            .with_context(|| ctx("agent_path", &r.agent_path))?;
        if let Some(bb) = &self.busybox {
            let bytes = std::fs::read(bb).with_context(|| format!("reading {}", bb.display()))?;
            t.add_file("bin/busybox", 0o755, &bytes)
                .with_context(|| ctx("busybox", "bin/busybox"))?;
            t.add_symlink("bin/sh", "busybox")
                .with_context(|| ctx("busybox", "bin/sh"))?;
        }
        if !r.init.is_empty() && t.get(&r.init).is_none() {
            anyhow::bail!(
                "recipe `{}`: key `init` names `{}`, which is not in the tree",
                r.name,
                r.init
            );
        }
        t.finish_modes()?;
        Ok(t)
    }
}

/// The tree, written out on first use and removed when dropped; shared by
/// the stages that need it (initrd, disk image) in one build.
pub struct LazyTree<'a> {
    plan: &'a RootfsPlan,
    parent: PathBuf,
    made: Option<(tempfile::TempDir, std::rc::Rc<Tree>)>,
}

impl<'a> LazyTree<'a> {
    /// The tree will be written in a temporary directory under `parent`.
    pub fn new(plan: &'a RootfsPlan, parent: &std::path::Path) -> LazyTree<'a> {
        LazyTree {
            plan,
            parent: parent.to_path_buf(),
            made: None,
        }
    }

    pub fn get(&mut self) -> anyhow::Result<std::rc::Rc<Tree>> {
        if let Some((_, t)) = &self.made {
            return Ok(t.clone());
        }
        std::fs::create_dir_all(&self.parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".rootfs-")
            .tempdir_in(&self.parent)?;
        let tree = std::rc::Rc::new(self.plan.materialize(&tmp.path().join("root"))?);
        self.made = Some((tmp, tree.clone()));
        Ok(tree)
    }
}

/// Loads the recipe, makes (or finds) the Debian base, and keys the tree.
pub fn plan(
    ctx: &Ctx,
    image: &ImageSpec,
    arch: Arch,
    agent: &AgentArtifact,
) -> anyhow::Result<RootfsPlan> {
    let (recipe, recipe_path) = Recipe::load(ctx, &image.recipe)?;
    if recipe.agent_path.is_empty() || !recipe.programs.is_empty() {
        anyhow::bail!(
            "image `{}`: recipe `{}` is a container rootfs recipe (no `agent_path`, or `programs`); \
             an image's recipe needs `agent_path` and cannot build `programs` \
             (build it with `cargo xtask build-container-rootfs --recipe {}`)",
            image.name,
            recipe.name,
            recipe.name
        );
    }
    let recipe_sha256 = crate::hash::sha256_file(&recipe_path)?;
    let extra = &image.rootfs;
    let bootstrap = match &recipe.debian {
        Some(d) => Some(debian::bootstrap(ctx, d, &extra.packages, arch)?),
        None if !extra.packages.is_empty() => anyhow::bail!(
            "image `{}`: key `rootfs.packages` adds Debian packages, but recipe `{}` has no [debian] section",
            image.name,
            recipe.name
        ),
        None => None,
    };
    let busybox = if recipe.busybox {
        if recipe.debian.is_some() {
            anyhow::bail!(
                "recipe `{}`: key `busybox` is for recipes without [debian] (Debian brings its own shell)",
                recipe.name
            );
        }
        if arch != Arch::host() {
            anyhow::bail!(
                "recipe `{}`: key `busybox` needs a {arch} busybox, but the host's busybox-static is for {}; build this recipe for {} or set busybox = false",
                recipe.name,
                Arch::host(),
                Arch::host()
            );
        }
        let p = PathBuf::from(HOST_BUSYBOX);
        let bytes = std::fs::read(&p).with_context(|| {
            format!(
                "recipe key `busybox`: {HOST_BUSYBOX} is missing (apt-get install busybox-static)"
            )
        })?;
        crate::elf::require_static(HOST_BUSYBOX, &bytes, arch)?;
        Some(p)
    } else {
        None
    };
    let mut key = KeyHasher::new("rootfs");
    key.str("arch", arch.name())
        .str("recipe", &recipe_sha256)
        .str("agent", &agent.sha256)
        .str("extra_files", &format!("{:?}", extra.files))
        .str("tree-format", "1");
    if let Some(b) = &bootstrap {
        key.str("bootstrap", &b.identity);
    }
    if let Some(bb) = &busybox {
        key.file("busybox", bb)?;
    }
    Ok(RootfsPlan {
        key: key.finish(),
        recipe,
        recipe_sha256,
        bootstrap,
        agent: agent.clone(),
        busybox,
        extra_files: extra.files.clone(),
        modules: None,
    })
}

impl RootfsPlan {
    /// Adds the kernel modules the image manifest asks for (`rootfs.modules`),
    /// resolved against `kernel`. A separate step so the Debian base (which
    /// may need the network) is settled before a kernel build starts.
    pub fn with_modules(
        mut self,
        image: &ImageSpec,
        kernel: &KernelArtifact,
    ) -> anyhow::Result<RootfsPlan> {
        let Some(pick) = pick_modules(image, kernel)? else {
            return Ok(self);
        };
        // The kernel key covers the modules' bytes.
        self.key = KeyHasher::new("rootfs-modules")
            .str("rootfs", &self.key)
            .str("kernel", &kernel.key)
            .str("modules", &pick.names.join(","))
            .finish();
        self.modules = Some(pick);
        Ok(self)
    }
}

fn pick_modules(image: &ImageSpec, kernel: &KernelArtifact) -> anyhow::Result<Option<ModulePick>> {
    let wanted = &image.rootfs.modules;
    if wanted.is_empty() {
        return Ok(None);
    }
    let Some(dir) = &kernel.modules else {
        anyhow::bail!(
            "image `{}`: key `rootfs.modules` asks for {:?}, but its kernel has no module support; add \"modules\" to [kernel] features",
            image.name,
            wanted
        );
    };
    let index = ModuleIndex::load(dir)?;
    let names = index
        .closure(wanted)
        .with_context(|| format!("image `{}`: key `rootfs.modules`", image.name))?;
    Ok(Some(ModulePick {
        dir: dir.clone(),
        release: kernel.version.clone(),
        index,
        names,
    }))
}

/// The tree as an initrd archive (for recipes with a Debian base; the
/// minimal recipe's initrd is made straight from the recipe). Owners are not
/// kept: kiln-initrd writes every entry as root's.
pub fn archive_of(tree: &Tree) -> anyhow::Result<kiln_initrd::Archive> {
    let mut a = kiln_initrd::Archive::new();
    for (path, e) in tree.entries() {
        if path.is_empty() {
            continue;
        }
        match &e.kind {
            Kind::Dir => {
                a.add_dir(path, e.mode)?;
            }
            Kind::File => {
                let data = std::fs::read(tree.host(path))
                    .with_context(|| format!("reading {}", tree.host(path).display()))?;
                a.add_file(path, e.mode, data)?;
            }
            Kind::Symlink(t) => {
                a.add_symlink(path, t)?;
            }
            Kind::Char(ma, mi) => {
                a.add_char_device(path, e.mode, *ma, *mi)?;
            }
            Kind::Block(ma, mi) => {
                a.add_block_device(path, e.mode, *ma, *mi)?;
            }
            // No fifo entries in kiln-initrd; none of kiln's recipes has one.
            Kind::Fifo => {}
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_for(recipe_text: &str, name: &str, dir: &std::path::Path) -> RootfsPlan {
        let agent_path = dir.join("kiln-agent");
        std::fs::write(&agent_path, b"\x7fELF agent").unwrap();
        RootfsPlan {
            recipe: Recipe::parse(recipe_text, name).unwrap(),
            recipe_sha256: String::new(),
            key: String::new(),
            bootstrap: None,
            agent: AgentArtifact {
                path: agent_path,
                sha256: String::new(),
                size: 10,
                key: String::new(),
            },
            busybox: None,
            extra_files: vec![LiteralFile {
                path: "etc/extra".into(),
                content: "from the manifest".into(),
                mode: 0o600,
            }],
            modules: None,
        }
    }

    #[test]
    fn minimal_recipe_tree() {
        let d = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../rootfs-recipes/minimal.toml"
        ))
        .unwrap();
        let plan = plan_for(&text, "minimal", d.path());
        let tree = plan.materialize(&d.path().join("root")).unwrap();
        assert_eq!(tree.get("init").unwrap().mode, 0o755);
        assert_eq!(std::fs::read(tree.host("init")).unwrap(), b"\x7fELF agent");
        assert_eq!(tree.get("dev/console").unwrap().kind, Kind::Char(5, 1));
        assert_eq!(tree.get("etc/extra").unwrap().mode, 0o600);
        assert_eq!(plan.init().as_deref(), Some("/init"));
        let archive = archive_of(&tree).unwrap();
        assert!(archive.contains("init") && archive.contains("dev/console"));
    }

    #[test]
    fn init_must_exist() {
        let d = tempfile::tempdir().unwrap();
        let text = "name = \"x\"\nagent_path = \"usr/bin/kiln-agent\"\ninit = \"sbin/init\"\n";
        let plan = plan_for(text, "x", d.path());
        let err = format!(
            "{:#}",
            plan.materialize(&d.path().join("root")).err().unwrap()
        );
        assert!(err.contains("key `init`"), "{err}");
    }
}
