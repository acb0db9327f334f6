//! Installs the official clients inside the checkout, once: a virtualenv at
//! `.clients/venv` from `tests/clients/requirements.txt`, and
//! `tests/clients/js/node_modules` from `tests/clients/js/package-lock.json`
//! (`npm ci`).
//!
//! Each install is redone only when its inputs change: a stamp file in the
//! installed tree holds a hash of the pinned requirements (or the lockfile),
//! of the interpreter's version and of the virtualenv's path. A `OnceLock` makes the tests of this
//! process install once; an exclusive file lock under `.clients/` keeps
//! several `cargo test` processes from installing at the same time.
//!
//! A missing `python3`, `node` or `npm`, or a failed install, makes the
//! tests that need it print `skipped: ...` and pass, except with `CI=true`,
//! where they fail with the reason.

use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// Where `tests/clients` lives.
pub fn clients_dir() -> PathBuf {
    repo_root().join("tests").join("clients")
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The virtualenv's Python with the pinned clients installed, or `None`
/// (after printing why) when the tests that need it are skipped.
pub async fn python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = tokio::task::spawn_blocking(|| PYTHON.get_or_init(install_python).clone())
        .await
        .expect("install task");
    available(result, "the Python client tests")
}

/// The `node` binary, with `tests/clients/js/node_modules` installed, or
/// `None` (after printing why) when the tests that need it are skipped.
pub async fn node() -> Option<PathBuf> {
    static NODE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = tokio::task::spawn_blocking(|| NODE.get_or_init(install_node).clone())
        .await
        .expect("install task");
    available(result, "the JavaScript client tests")
}

/// With `CI=true` a missing toolchain fails the test; elsewhere it skips it.
fn available<T>(result: Result<T, String>, what: &str) -> Option<T> {
    match result {
        Ok(found) => Some(found),
        Err(reason) if in_ci() => panic!(
            "{what} cannot run: {reason}\n\
             (CI=true: a missing client toolchain fails the run instead of skipping)"
        ),
        Err(reason) => {
            say(&format!("skipped: {what}: {reason}"));
            None
        }
    }
}

/// Writes a line to the real stderr: the test harness captures `println!`
/// and `eprintln!`, and a skip or a long install must be seen.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

fn install_python() -> Result<PathBuf, String> {
    let requirements = clients_dir().join("requirements.txt");
    let venv = repo_root().join(".clients").join("venv");
    let python = if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    };
    let system_python = if cfg!(windows) { "python" } else { "python3" };
    let version = version_of(system_python)?;
    let pinned = fs::read(&requirements)
        .map_err(|e| format!("cannot read {}: {e}", requirements.display()))?;
    // A virtualenv is tied to its path: a moved checkout gets a new one.
    let place = venv.to_string_lossy();
    let stamp = stamp_of(&[version.as_bytes(), place.as_bytes(), &pinned]);
    let stamp_file = venv.join(".tollgate-stamp");

    let _lock = lock("python")?;
    if python.exists() && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return Ok(python);
    }
    let started = Instant::now();
    say(&format!(
        "installing the Python clients into {} ...",
        venv.display()
    ));
    if venv.exists() {
        fs::remove_dir_all(&venv)
            .map_err(|e| format!("cannot remove the old {}: {e}", venv.display()))?;
    }
    run(
        Command::new(system_python).arg("-m").arg("venv").arg(&venv),
        "python3 -m venv",
    )?;
    run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--disable-pip-version-check"])
            .args(["--no-input", "--quiet", "--timeout", "60", "--retries", "2"])
            .arg("-r")
            .arg(&requirements),
        "pip install -r tests/clients/requirements.txt",
    )?;
    fs::write(&stamp_file, &stamp)
        .map_err(|e| format!("cannot write {}: {e}", stamp_file.display()))?;
    say(&format!(
        "installed the Python clients in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(python)
}

fn install_node() -> Result<PathBuf, String> {
    let js = clients_dir().join("js");
    let version = version_of("node")?;
    let major: u32 = version
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("cannot read node's version from {version:?}"))?;
    if major < 18 {
        return Err(format!(
            "node {} is too old (the ollama package needs 18 or newer)",
            version.trim()
        ));
    }
    let npm = if cfg!(windows) { "npm.cmd" } else { "npm" };
    version_of(npm)?;
    let read = |name: &str| {
        fs::read(js.join(name)).map_err(|e| format!("cannot read tests/clients/js/{name}: {e}"))
    };
    let (manifest, lockfile) = (read("package.json")?, read("package-lock.json")?);
    let stamp = stamp_of(&[version.as_bytes(), &manifest, &lockfile]);
    let modules = js.join("node_modules");
    let stamp_file = modules.join(".tollgate-stamp");

    let _lock = lock("node")?;
    if modules.join("ollama").join("package.json").exists()
        && fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp)
    {
        return Ok(PathBuf::from("node"));
    }
    let started = Instant::now();
    say(&format!(
        "installing the JavaScript clients into {} ...",
        modules.display()
    ));
    run(
        Command::new(npm)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&js),
        "npm ci (tests/clients/js)",
    )?;
    fs::write(&stamp_file, &stamp)
        .map_err(|e| format!("cannot write {}: {e}", stamp_file.display()))?;
    say(&format!(
        "installed the JavaScript clients in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(PathBuf::from("node"))
}

/// `PROGRAM --version`, or why it cannot be run.
fn version_of(program: &str) -> Result<String, String> {
    let output = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("`{program}` was not found or cannot run ({e})"))?;
    if !output.status.success() {
        return Err(format!(
            "`{program} --version` failed: {}",
            describe(&output)
        ));
    }
    // Old Pythons print their version on stderr.
    let mut version = String::from_utf8_lossy(&output.stdout).into_owned();
    version.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok(version.trim().to_string())
}

fn stamp_of(parts: &[&[u8]]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hex::encode(hash.finalize())
}

/// Holds `.clients/NAME.lock` exclusively until dropped.
fn lock(name: &str) -> Result<fs::File, String> {
    let dir = repo_root().join(".clients");
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    file.lock()
        .map_err(|e| format!("cannot lock {}: {e}", path.display()))?;
    Ok(file)
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed: {}", describe(&output)))
    }
}

fn describe(output: &Output) -> String {
    let tail = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    format!(
        "{}\n{}\n{}",
        output.status,
        tail(&output.stdout),
        tail(&output.stderr)
    )
}
