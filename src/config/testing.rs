//! Helpers of the configuration's unit tests.

use std::path::{Path, PathBuf};

use super::Config;
use crate::error::{code, exit_code_of};

pub(super) const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fedora-messaging"
);

pub(super) fn fixture(name: &str) -> PathBuf {
    let path = Path::new(FIXTURES).join(name);
    assert!(
        path.is_file(),
        "fixture {} is missing from the repository",
        path.display()
    );
    path
}

pub(super) fn parse(text: &str) -> Config {
    Config::from_toml_str(text, Some(Path::new("test.toml"))).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The error for `text`, checked to carry exit code 2 and to start with the file's name.
pub(super) fn error(text: &str) -> String {
    let err = Config::from_toml_str(text, Some(Path::new("test.toml")))
        .expect_err("the configuration should be refused");
    assert_eq!(exit_code_of(&err), code::USAGE, "{err:#}");
    let msg = format!("{err:#}");
    assert!(msg.starts_with("test.toml: "), "{msg}");
    msg
}

pub(super) fn assert_contains(haystack: &str, needles: &[&str]) {
    for needle in needles {
        assert!(haystack.contains(needle), "{needle:?} not in {haystack:?}");
    }
}

pub(super) fn str_prop<'a>(c: &'a Config, key: &str) -> &'a str {
    c.client_properties[key].as_str().unwrap()
}
