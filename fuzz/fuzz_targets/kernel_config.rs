//! The kernel configuration grammar (`kernel-configs/**/*.conf` fragments
//! and the built `.config` share it) and Kconfig expressions.
//!
//! Input: fragment text, optionally a NUL byte and a second fragment laid
//! over the first. Properties: parsing never panics; a parsed file renders to
//! text that parses back to the same values; merging two fragments equals
//! laying the second over the first; every line evaluates as a Kconfig
//! expression (to a value or to "cannot read") without panicking.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xtask::stage::kernel::dotconfig::{merge, ConfigFile, Value};
use xtask::stage::kernel::kconfig::{conjuncts, eval, levenshtein, symbols_in};

fn same_values(a: &ConfigFile, b: &ConfigFile) -> bool {
    a.settings.len() == b.settings.len()
        && a.settings
            .iter()
            .zip(&b.settings)
            .all(|((na, sa), (nb, sb))| na == nb && sa.value.same_as(&sb.value))
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (first, second) = text.split_once('\0').unwrap_or((&text, ""));
    let a = ConfigFile::parse(first, "a.conf");
    let b = ConfigFile::parse(second, "b.conf");
    if let Ok(a) = &a {
        for (name, set) in &a.settings {
            if let Value::Num(n) = &set.value {
                let digits = match n.strip_prefix("0x").or_else(|| n.strip_prefix("0X")) {
                    Some(hex) => hex.chars().all(|c| c.is_ascii_hexdigit()),
                    None => n
                        .trim_start_matches('-')
                        .chars()
                        .all(|c| c.is_ascii_digit()),
                };
                assert!(digits, "CONFIG_{name}={n} accepted as a number");
            }
        }
        let rendered = a.render();
        let back = ConfigFile::parse(&rendered, ".config")
            .unwrap_or_else(|e| panic!("rendered config does not parse: {e}\n{rendered}"));
        assert!(same_values(a, &back), "render changed values:\n{rendered}");
        assert_eq!(back.render(), rendered, "render is not stable");
        if let Ok(b) = &b {
            let (merged, overrides) = merge(&[a.clone(), b.clone()]);
            assert!(same_values(&merged, &a.overlay(b)));
            assert!(overrides.iter().all(|o| b.settings.contains_key(&o.name)));
        }
    }
    let cfg = a.unwrap_or_default();
    for line in text.lines().take(64) {
        let _ = eval(line, &cfg);
        let parts = conjuncts(line);
        assert!(parts.iter().all(|p| !p.is_empty()));
        for sym in symbols_in(line).iter().take(8) {
            let _ = levenshtein(sym, "VIRTIO_VSOCKETS");
        }
    }
});
