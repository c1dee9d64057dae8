//! Tidy checks over the whole source tree, as rust-analyzer's xtask/src/tidy.rs
//! does: cheap, textual, run by plain `cargo test` (and so by `cargo xtask
//! test`'s first step). Each failure says what to change.
//!
//! - every module file of every crate is named in ARCHITECTURE.md's code map;
//! - non-test agent code has no `.unwrap()` or `.expect(` (PID 1 must not panic);
//! - every declared dependency is used by its crate's sources.

use std::path::{Path, PathBuf};

/// The workspace's crates: directory, and the heading of its code-map section.
const CRATES: &[(&str, &str)] = &[
    ("xtask", "### `xtask/`"),
    ("agent", "### `agent/`"),
    ("agent/protocol", "### `agent/`"),
    ("agent/seccomp", "### `agent/`"),
    ("host-shim", "### `host-shim/`"),
    ("initrd", "### `initrd/`"),
    ("disk", "### `disk/`"),
    ("manifest", "### `manifest/`"),
    ("testsupport", "### `testsupport/`"),
];

/// Dependencies only generated code uses (code written to OUT_DIR by build.rs
/// and include!d), with the reason: (crate, dependency as written in Rust, why).
const USED_BY_GENERATED_CODE: &[(&str, &str, &str)] = &[
    (
        "agent/protocol",
        "ttrpc",
        "the services ttrpc-codegen writes",
    ),
    (
        "agent/protocol",
        "async_trait",
        "the async service traits ttrpc-codegen writes",
    ),
];

/// Where the agent's non-test code lives (the seccomp crate runs in the helper).
const AGENT_SOURCES: &[&str] = &["agent/src", "agent/seccomp/src"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The text of ARCHITECTURE.md's code map section with `heading`, up to the
/// next `###`/`##` heading.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let map = &doc[doc
        .find("## Code map")
        .expect("ARCHITECTURE.md has a `## Code map`")..];
    let start = map
        .find(heading)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md's code map has no `{heading}` section"));
    let body = &map[start + heading.len()..];
    let end = body.find("\n##").unwrap_or(body.len());
    &body[..end]
}

#[test]
fn every_module_is_in_the_code_map() {
    let root = root();
    let doc = read(&root.join("ARCHITECTURE.md"));
    let mut missing = Vec::new();
    for (krate, heading) in CRATES {
        let text = section(&doc, heading);
        let src = root.join(krate).join("src");
        let files = rust_files(&src);
        let base = |f: &Path| f.file_name().unwrap().to_str().unwrap().to_string();
        for f in &files {
            let rel = f.strip_prefix(&src).unwrap();
            let dir = || {
                let parent = rel.parent().and_then(|p| p.file_name());
                parent.map(|p| p.to_str().unwrap().to_string())
            };
            // lib.rs/main.rs are the crate itself; a mod.rs is named by its
            // directory; a file name two modules share, with its directory.
            let name = match base(f).as_str() {
                "lib.rs" | "main.rs" => continue,
                "mod.rs" => format!("{}/", dir().unwrap()),
                n if files.iter().filter(|g| base(g) == n).count() > 1 => match dir() {
                    Some(d) => format!("{d}/{n}"),
                    None => n.to_string(),
                },
                n => n.to_string(),
            };
            let named = text
                .match_indices(&name)
                .any(|(i, _)| matches!(text[..i].chars().last(), Some('`' | '/')));
            if !named {
                missing.push(format!("{krate}/src/{}", rel.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "these modules are not in ARCHITECTURE.md's code map (name each, with its job, \
         under its crate's section): {missing:#?}"
    );
}

/// `text` without `#[cfg(test)]` items (a trailing `mod tests` is cut off,
/// other items skipped by brace depth) and without `//` comment lines.
fn non_test_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") || t.starts_with("#[cfg(all(test,") {
            let mut depth = 0i32;
            let mut opened = false;
            for item in lines.by_ref() {
                depth += item.matches('{').count() as i32 - item.matches('}').count() as i32;
                opened |= item.contains('{');
                let ends = if opened {
                    depth <= 0
                } else {
                    item.trim_end().ends_with(';')
                };
                if ends {
                    break;
                }
            }
            continue;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn agent_code_has_no_unwrap_or_expect() {
    let root = root();
    let mut found = Vec::new();
    for dir in AGENT_SOURCES {
        for f in rust_files(&root.join(dir)) {
            let code = non_test_code(&read(&f));
            for (n, line) in code.lines().enumerate() {
                if line.contains(".unwrap()") || line.contains(".expect(") {
                    found.push(format!(
                        "{}: {}",
                        f.strip_prefix(&root).unwrap().display(),
                        line.trim()
                    ));
                    let _ = n;
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "the agent runs as PID 1 and must not panic: return an error instead of \
         unwrap()/expect() in {found:#?}"
    );
}

#[test]
fn non_test_filter_skips_test_items() {
    let text = "fn a() { x.unwrap_or(1); }\n// y.unwrap()\n#[cfg(all(test, feature = \"f\"))]\nmod t {\n    v.unwrap();\n}\n#[cfg(test)]\nfn b() {\n    z.unwrap();\n}\n#[cfg(test)]\nuse q;\nfn c() {}\n#[cfg(test)]\nmod tests {\n    fn d() { w.unwrap(); }\n}\n";
    let code = non_test_code(text);
    assert_eq!(code, "fn a() { x.unwrap_or(1); }\nfn c() {}\n");
}

/// Every dependency `krate`'s Cargo.toml declares, with the sources where its
/// use must show: (section, name as written in Rust, where to look).
fn declared(krate: &Path) -> Vec<(String, String)> {
    let manifest: toml::Table = read(&krate.join("Cargo.toml")).parse().unwrap();
    let mut out = Vec::new();
    for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
        let Some(deps) = manifest.get(section).and_then(|d| d.as_table()) else {
            continue;
        };
        for (name, spec) in deps {
            // A renamed dependency (`package = ...`) is used under its key.
            let _ = spec;
            out.push((section.to_string(), name.replace('-', "_")));
        }
    }
    out
}

#[test]
fn every_declared_dependency_is_used() {
    let root = root();
    let mut unused = Vec::new();
    for (krate, _) in CRATES {
        let dir = root.join(krate);
        let sources = |dirs: &[&str]| -> String {
            let mut all = String::new();
            for d in dirs {
                let p = dir.join(d);
                if p.is_file() {
                    all.push_str(&read(&p));
                }
                for f in rust_files(&p) {
                    all.push_str(&read(&f));
                }
            }
            all
        };
        let normal = sources(&["src"]);
        let dev = sources(&["src", "tests", "benches", "examples"]);
        let build = sources(&["build.rs"]);
        for (section, name) in declared(&dir) {
            let text = match section.as_str() {
                "dependencies" => &normal,
                "dev-dependencies" => &dev,
                _ => &build,
            };
            let used = [
                format!("{name}::"),
                format!("use {name}"),
                format!("{name}!"),
                format!("extern crate {name}"),
            ]
            .iter()
            .any(|p| text.contains(p.as_str()));
            let generated = USED_BY_GENERATED_CODE
                .iter()
                .any(|(k, d, _)| k == krate && *d == name);
            if !used && !generated {
                unused.push(format!("{krate}: [{section}] {name}"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "declared but never used (remove them, or use them): {unused:#?}"
    );
}
