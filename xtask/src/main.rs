//! sluice's two set-up commands, so that a fresh machine with only the Rust toolchain can
//! run the proxy and the tests:
//!
//! - `cargo xtask run [ARGS]`: install what building and running need (cmake for Pingora's
//!   zlib-ng, a C compiler, CA roots), then `cargo run --release -- ARGS`.
//! - `cargo xtask test [ARGS]`: install what the tests need as well (curl, redis-server,
//!   chromium, promtool from prometheus, Python's venv, nginx), check formatting and lints
//!   (`cargo fmt --check`, `cargo clippy --all-targets -- -D warnings`), then `cargo test ARGS`
//!   with Redis and those tools required (`SLUICE_REQUIRE_REDIS=1`, `SLUICE_REQUIRE_TOOLS=1`); then the
//!   clients' own tests against the binary that built: the Rust middleware's `cargo test`,
//!   and the Python package's `pytest` in a virtualenv under `target/python-venv` (its
//!   packages from PyPI).
//!
//! Packages come from the system's package manager (apt on Debian and Ubuntu), through `sudo`
//! only when not root; each one is named before it is installed. On other systems it says
//! what to install and stops.

use std::path::Path;
use std::process::{Command, ExitCode};

/// A system package, and how to tell it is already there.
struct Need {
    package: &'static str,
    /// A command on `PATH`, or an absolute path, that the package provides.
    provides: &'static str,
    why: &'static str,
}

const BUILD: &[Need] = &[
    Need {
        package: "cmake",
        provides: "cmake",
        why: "Pingora builds zlib-ng",
    },
    Need {
        package: "build-essential",
        provides: "cc",
        why: "C code in dependencies (zlib-ng, ring, mimalloc)",
    },
    Need {
        package: "pkg-config",
        provides: "pkg-config",
        why: "native library lookup at build time",
    },
    Need {
        package: "ca-certificates",
        provides: "/etc/ssl/certs/ca-certificates.crt",
        why: "TLS to public APIs",
    },
];

const TEST: &[Need] = &[
    Need {
        package: "curl",
        provides: "curl",
        why: "used by tests",
    },
    Need {
        package: "redis-server",
        provides: "redis-server",
        why: "the fleet tests start their own Redis",
    },
    Need {
        package: "chromium",
        provides: "chromium",
        why: "the /ui test loads the live page in a headless browser",
    },
    Need {
        package: "prometheus",
        provides: "promtool",
        why: "promtool checks the alert rules and the dashboard's queries",
    },
    Need {
        package: "python3",
        provides: "python3",
        why: "the Python client's tests (pytest)",
    },
    Need {
        package: "nginx",
        provides: "/usr/sbin/nginx",
        why: "an h2 upstream that goes away (GOAWAY) after its keepalive_requests",
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((what, rest)) = args.split_first() else {
        return usage();
    };
    let (needs, cargo_args, env): (Vec<&Need>, Vec<&str>, Vec<(&str, &str)>) = match what.as_str() {
        "run" => (
            BUILD.iter().collect(),
            vec!["run", "--release", "--"],
            vec![],
        ),
        "test" => (
            BUILD.iter().chain(TEST).collect(),
            vec!["test"],
            vec![("SLUICE_REQUIRE_REDIS", "1"), ("SLUICE_REQUIRE_TOOLS", "1")],
        ),
        _ => return usage(),
    };
    if let Err(e) = install(&needs) {
        eprintln!("xtask: {e}");
        return ExitCode::FAILURE;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if what == "test" {
        let lints = lint(&root, &cargo);
        if lints != ExitCode::SUCCESS {
            return lints;
        }
    }
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&root).args(&cargo_args).args(rest);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut result = status(&mut cmd, "cargo");
    if result == ExitCode::SUCCESS && what == "test" {
        result = clients(&root, &cargo);
    }
    result
}

/// Run `cmd`; its exit code as ours.
fn status(cmd: &mut Command, what: &str) -> ExitCode {
    match cmd.status() {
        Ok(s) if s.success() => ExitCode::SUCCESS,
        Ok(s) => ExitCode::from(u8::try_from(s.code().unwrap_or(1)).unwrap_or(1)),
        Err(e) => {
            eprintln!("xtask: cannot run {what}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Formatting and lints, before any test: `cargo fmt --check`, then clippy on every target
/// with warnings as errors (the lints `Cargo.toml` declares included).
fn lint(root: &Path, cargo: &str) -> ExitCode {
    let steps: [(&str, &[&str]); 2] = [
        ("cargo fmt --check", &["fmt", "--all", "--check"]),
        (
            "cargo clippy",
            &["clippy", "--all-targets", "--", "-D", "warnings"],
        ),
    ];
    for (what, args) in steps {
        eprintln!("xtask: {what}");
        let result = status(Command::new(cargo).current_dir(root).args(args), what);
        if result != ExitCode::SUCCESS {
            eprintln!(
                "xtask: {what} failed (without rustfmt or clippy: rustup component add rustfmt clippy)"
            );
            return result;
        }
    }
    ExitCode::SUCCESS
}

/// The clients' tests, against the sluice binary `cargo test` built.
fn clients(root: &Path, cargo: &str) -> ExitCode {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = std::fs::canonicalize(&target).unwrap_or(target);
    let sluice = target.join("debug").join("sluice");
    eprintln!("xtask: the Rust client's tests (clients/rust)");
    let rust = status(
        Command::new(cargo)
            .current_dir(root.join("clients/rust"))
            .args(["test"])
            .env("CARGO_TARGET_DIR", target.join("clients"))
            .env("SLUICE_BIN", &sluice),
        "cargo",
    );
    if rust != ExitCode::SUCCESS {
        return rust;
    }
    eprintln!("xtask: the Python client's tests (clients/python, pytest)");
    let venv = target.join("python-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        let made = status(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            "python3 -m venv",
        );
        if made != ExitCode::SUCCESS {
            // Debian's python3 keeps venv in its own package.
            if let Err(e) = install(&[&Need {
                package: "python3-venv",
                provides: "/nonexistent",
                why: "a virtualenv for the Python client's tests",
            }]) {
                eprintln!("xtask: {e}");
                return ExitCode::FAILURE;
            }
            let again = status(
                Command::new("python3").arg("-m").arg("venv").arg(&venv),
                "python3 -m venv",
            );
            if again != ExitCode::SUCCESS {
                return again;
            }
        }
    }
    let installed = status(
        Command::new(&python).current_dir(root).args([
            "-m",
            "pip",
            "install",
            "-q",
            "-e",
            "clients/python[test]",
        ]),
        "pip",
    );
    if installed != ExitCode::SUCCESS {
        return installed;
    }
    status(
        Command::new(&python)
            .current_dir(root.join("clients/python"))
            .args(["-m", "pytest", "-q"])
            .env("SLUICE_BIN", &sluice),
        "pytest",
    )
}

fn usage() -> ExitCode {
    eprintln!("usage: cargo xtask run [sluice args]  |  cargo xtask test [cargo test args]");
    ExitCode::from(2)
}

/// Is what `need` provides already on this machine?
fn present(need: &Need) -> bool {
    if need.provides.starts_with('/') {
        return Path::new(need.provides).exists();
    }
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| dir.join(need.provides).is_file())
    })
}

/// Install the missing packages of `needs` with apt, naming each.
fn install(needs: &[&Need]) -> Result<(), String> {
    let missing: Vec<&&Need> = needs.iter().filter(|n| !present(n)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    for n in &missing {
        eprintln!("xtask: installing {} ({})", n.package, n.why);
    }
    let names: Vec<&str> = missing.iter().map(|n| n.package).collect();
    let apt = ["/usr/bin/apt-get", "/bin/apt-get"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            format!(
                "no apt-get on this machine: install {} with its package manager",
                names.join(" ")
            )
        })?;
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let run = |args: &[&str]| -> Result<(), String> {
        let mut cmd = if root {
            Command::new(apt)
        } else {
            let mut c = Command::new("sudo");
            c.arg(apt);
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        let status = cmd
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {} failed ({status})", args.join(" ")))
        }
    };
    run(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&names);
    run(&install)
}
