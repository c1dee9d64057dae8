//! The TOML inputs of the pipeline: image manifests (`image-manifests/`) and
//! rootfs recipes (`rootfs-recipes/`). Both parsers get every input, with the
//! file name taken from the input's own `name` key so the checks after it run.
//! Parsing never panics; an accepted input keeps its name.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xtask::image_spec::ImageSpec;
use xtask::recipe::Recipe;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let name = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("name")?.as_str().map(str::to_string))
        .unwrap_or_else(|| "minimal".to_string());
    if let Ok(m) = ImageSpec::parse(text, &name) {
        assert_eq!(m.name, name);
        assert!(!m.arches.is_empty());
    }
    if let Ok(r) = Recipe::parse(text, &name) {
        assert_eq!(r.name, name);
    }
});
