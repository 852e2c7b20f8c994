//! Plugins for tests: the workspace's Rust plugins next to the `fm` binary, and C sources
//! compiled with `cc` against fm's header (cached by content).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::*;

/// A plugin of the workspace, e.g. `plugin_path("printer")` → `target/debug/libfm_printer.so`
/// (next to the `fm` binary, so CARGO_TARGET_DIR and the profile are respected).
pub fn plugin_path(name: &str) -> PathBuf {
    let dir = fm_bin()
        .parent()
        .expect("fm binary has a folder")
        .to_owned();
    let path = dir.join(format!("libfm_{}.so", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "plugin {} is missing: run cargo build --workspace first (scripts/test does)",
        path.display()
    );
    path
}

/// Compiles a C test plugin (`cc -shared` with [`::fm::callback::abi::C_FLAGS`], every warning an
/// error) and returns the `.so`. Results are
/// cached by source contents in the target folder, so parallel tests may share a source.
pub fn build_c_plugin(src: &Path) -> PathBuf {
    build_c_plugin_with(src, &[])
}

/// [`build_c_plugin`] with extra compiler flags (`-DCRASH=1`...).
pub fn build_c_plugin_with(src: &Path, cflags: &[&str]) -> PathBuf {
    let mut flags = vec!["-shared"];
    flags.extend_from_slice(cflags);
    build_c(src, &flags)
}

/// Compiles C source `src` with fm's header on the include path, every warning an error and
/// `cflags` (a program unless they say `-shared`); cached like [`build_c_plugin`], by the
/// source, the flags and the header (a plugin built against an older header is not reused).
pub fn build_c(src: &Path, cflags: &[&str]) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let read = |path: &Path| {
        std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    };
    let code = read(src);
    let header = read(&repo_root().join("include/fm_plugin.h"));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (&code, cflags, &header).hash(&mut hasher);
    let stem = src.file_stem().and_then(OsStr::to_str).unwrap_or("plugin");
    let dir = fm_bin()
        .parent()
        .expect("fm binary has a folder")
        .join("c-plugins");
    std::fs::create_dir_all(&dir).expect("creating the C plugin folder");
    let out = dir.join(format!("lib{stem}-{:016x}.so", hasher.finish()));
    if out.is_file() {
        return out;
    }
    // Build under a private name, then rename: a parallel test never sees a half-written file.
    let tmp = dir.join(format!(".{stem}-{}.so", uuid::Uuid::new_v4().simple()));
    let result = std::process::Command::new("cc")
        .args(::fm::callback::abi::C_FLAGS)
        .arg("-I")
        .arg(repo_root().join("include"))
        .args(cflags)
        .arg("-o")
        .arg(&tmp)
        .arg(src)
        .output()
        .expect("running cc (is gcc installed?)");
    assert!(
        result.status.success(),
        "cc failed on {}:\n{}",
        src.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    std::fs::rename(&tmp, &out).expect("moving the built plugin into place");
    out
}
