//! What the integration tests against `../shared/fixtures` share: where the fixtures are, and what happens when
//! they are absent. In a clone of the repository alone, a test that needs them returns at once after printing
//! why (the stable test harness has no run-time skip); in CI (`CI` set to true) a missing folder fails the test,
//! so nothing can pass there without them. The Python suite does the same (tests/conftest.py).

use std::path::PathBuf;

/// The fixtures folder, known to exist.
pub struct Fixtures(PathBuf);

impl Fixtures {
    /// The fixtures of `test`, or `None` (after printing the reason) when the folder is absent outside CI.
    pub fn get(test: &str) -> Option<Fixtures> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures");
        if dir.is_dir() {
            return Some(Fixtures(dir));
        }
        let in_ci = std::env::var("CI").is_ok_and(|v| matches!(v.trim().to_lowercase().as_str(), "1" | "true" | "yes"));
        assert!(!in_ci, "fixtures not found at {} (../shared must sit beside the repository; CI=true)", dir.display());
        eprintln!("{test}: skipped: needs the shared reference fixtures, absent at {}", dir.display());
        None
    }

    /// The path of one fixture file, which must exist.
    pub fn path(&self, rel: &str) -> PathBuf {
        let path = self.0.join(rel);
        assert!(path.exists(), "fixture {} not found", path.display());
        path
    }
}
