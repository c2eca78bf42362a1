//! Log capture for tests that assert on every line the code under test logs.
//!
//! `tracing` caches each callsite's interest process-wide: a callsite first reached on another
//! test's thread, while a per-thread subscriber is the only one, keeps "never" and its lines are
//! lost to the capture. So a capturing test runs [`alone`] in a fresh process, and [`Capture`]
//! installs one process-wide subscriber before anything logs, and keeps every line of every
//! thread (blocking pools included) at every level.

use std::io::Write;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// Set in the process [`alone`] starts: the name of the test it runs.
const ALONE: &str = "APPCONN_TEST_ALONE";

/// Runs test `name` (its path in the test binary, as `cargo test` lists it) again, alone, in a
/// fresh process of the same binary, and asserts that it ran and passed. Returns `true` inside
/// that process, where the caller goes on with the test body, and `false` in the caller's
/// process, which has nothing left to do:
///
/// ```ignore
/// if !appconn_testkit::logs::alone("logs_hold_no_secret") { return; }
/// let logs = Capture::start();
/// ```
pub fn alone(name: &str) -> bool {
    if std::env::var(ALONE).as_deref() == Ok(name) {
        return true;
    }
    let binary = std::env::current_exe().expect("the test binary's path");
    let output = Command::new(binary)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, name)
        .output()
        .expect("starting the test binary again");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, run alone, did not pass:\n{stdout}\n{stderr}"
    );
    false
}

static LINES: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

/// Every line logged in this process since the first [`Capture::start`].
pub struct Capture(());

impl Capture {
    /// Installs the capturing subscriber for the whole process.
    ///
    /// # Panics
    /// Outside a process started by [`alone`], or when another subscriber was installed first.
    pub fn start() -> Self {
        assert!(
            std::env::var_os(ALONE).is_some(),
            "a test that captures logs runs alone (appconn_testkit::logs::alone)"
        );
        if LINES.set(Mutex::default()).is_ok() {
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .with_writer(Lines)
                .try_init()
                .expect("no other process-wide subscriber");
        }
        Self(())
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        let lines = LINES.get().expect("started").lock().expect("log lines");
        String::from_utf8_lossy(&lines).into_owned()
    }
}

/// Appends to [`LINES`].
struct Lines;

impl<'a> MakeWriter<'a> for Lines {
    type Writer = Lines;

    fn make_writer(&'a self) -> Self::Writer {
        Lines
    }
}

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let lines = LINES.get().expect("started");
        lines.lock().expect("log lines").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_every_thread_of_a_test_run_alone() {
        if !alone("logs::tests::captures_every_thread_of_a_test_run_alone") {
            return;
        }
        let logs = Capture::start();
        tracing::trace!(marker = "own-thread-4711", "captured");
        std::thread::spawn(|| tracing::error!(marker = "other-thread-4712", "captured too"))
            .join()
            .unwrap();
        let text = logs.text();
        assert!(text.contains("own-thread-4711"), "{text}");
        assert!(text.contains("other-thread-4712"), "{text}");
    }

    #[test]
    #[should_panic(expected = "did not pass")]
    fn a_failure_alone_fails_the_caller() {
        if !alone("logs::tests::a_failure_alone_fails_the_caller") {
            return;
        }
        // Not the expected message: the run alone fails, so the caller panics as expected.
        panic!("failing in the process run alone");
    }

    #[test]
    #[should_panic(expected = "did not pass")]
    fn a_name_that_matches_no_test_fails_the_caller() {
        alone("logs::tests::no_such_test");
    }
}
