//! `sluice --check`: every error with its key path and a non-zero exit; shipped configs valid.

mod support;

use support::*;

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn unknown_keys_bad_durations_and_bad_addresses_are_rejected_with_their_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text, path) in [
        (
            "unknown.toml",
            "[server]\nlisten = \"127.0.0.1:8080\"\nlisten_typo = 1\n",
            "server",
        ),
        (
            "duration.toml",
            "[server]\nconnect_timeout = \"soonish\"\n",
            "server.connect_timeout",
        ),
        (
            "address.toml",
            "[server]\nlisten = \"localhost\"\n",
            "server.listen",
        ),
        ("top.toml", "[sever]\nlisten = \"127.0.0.1:1\"\n", "sever"),
        (
            "route.toml",
            "[[routes]]\nprefix = \"/x\"\ntarget = \"https://a.test\"\nweight = 2\n",
            "routes[0]",
        ),
    ] {
        let out = check_config(dir.path(), name, text);
        assert!(!out.status.success(), "{name} must be rejected");
        let err = stderr_of(&out);
        assert!(err.contains(path), "{name}: expected {path:?} in {err}");
    }
}

#[test]
fn every_semantic_error_is_reported_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = check_config(
        dir.path(),
        "many.toml",
        "[server]\nlisten = \"nope\"\nadmin_listen = \"127.0.0.1:0x\"\nread_timeout = \"0s\"\n\
         [resolve]\n\"a.test\" = [\"10.0.0.1\"]\n[[routes]]\nprefix = \"x\"\ntarget = \"gopher://a\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    for path in [
        "server.listen",
        "server.admin_listen",
        "server.read_timeout",
        "resolve.\"a.test\"[0]",
        "routes[0].prefix",
        "routes[0].target",
    ] {
        assert!(err.contains(path), "expected {path:?} in {err}");
    }
}

#[test]
fn shipped_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("conf/sluice.toml"),
        root.join("conf/default.toml"),
    ];
    for entry in std::fs::read_dir(root.join("conf/examples")).expect("conf/examples") {
        files.push(entry.expect("entry").path());
    }
    assert!(
        files.len() >= 4,
        "reference, default and examples: {files:?}"
    );
    for f in files {
        let out = check_file(&f);
        assert!(out.status.success(), "{}: {}", f.display(), stderr_of(&out));
    }
    // And the embedded default, with no file at all.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check")
        .env_remove("SLUICE_CONFIG")
        .output()
        .expect("run");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("embedded default"));
}

#[test]
fn sluice_config_env_names_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("env.toml");
    std::fs::write(&path, "[server]\nthreads = \"two\"\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--check")
        .env("SLUICE_CONFIG", &path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(stderr_of(&out).contains("server.threads"));
}

#[test]
fn a_busy_listen_address_is_a_clear_startup_error() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = busy.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("busy.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"{addr}\"\nadmin_listen = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = stderr_of(&out);
    assert!(
        err.contains("server.listen") && err.contains("cannot listen"),
        "{err}"
    );
}

#[test]
fn check_warns_about_an_open_admin_listener_without_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = check_config(
        dir.path(),
        "open.toml",
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\n",
    );
    assert!(open.status.success(), "valid, only risky");
    assert!(
        stderr_of(&open).contains("warning: server.admin_listen 0.0.0.0:9090 is not on loopback"),
        "{}",
        stderr_of(&open)
    );
    let guarded = check_config(
        dir.path(),
        "guarded.toml",
        "[server]\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"0123456789abcdef-token\"\n",
    );
    assert!(guarded.status.success());
    assert!(
        !stderr_of(&guarded).contains("warning"),
        "{}",
        stderr_of(&guarded)
    );
    let short = check_config(dir.path(), "short.toml", "[server]\nadmin_token = \"x\"\n");
    assert!(!short.status.success());
    assert!(stderr_of(&short).contains("server.admin_token"));
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_with_what_validation_finds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = check_config(
        dir.path(),
        "types.toml",
        "[server]\nlisten = \"127.0.0.1:1\"\nthreds = 2\n[defaults]\nrps = \"fast\"\n\
         [hosts.\"api.test\"]\nburst = 0\ncolour = \"red\"\n[[routes]]\nprefix = \"x\"\n\
         target = \"https://a.test\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    for (path, line) in [
        ("server.threds", "(line 3)"),
        ("defaults.rps", "(line 5)"),
        ("hosts.api.test.colour", "(line 8)"),
    ] {
        assert!(
            err.lines().any(|l| l.contains(path) && l.contains(line)),
            "expected {path} {line} in {err}"
        );
    }
    // And what validation of the rest finds.
    assert!(err.contains("routes[0].prefix"), "{err}");
}

#[test]
fn interception_needs_a_ca_whose_key_is_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = check_config(
        dir.path(),
        "no-ca.toml",
        "[intercept]\nhosts = [\"api.openai.com\", \"bad/name\"]\nleaf_ttl = \"1m\"\n",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    for needle in [
        "intercept: hosts need both ca_cert and ca_key",
        "intercept.hosts[1]",
        "intercept.leaf_ttl",
    ] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
    // Two CAs from `sluice ca init`: a certificate with the other's key is refused.
    for name in ["a", "b"] {
        let made = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["ca", "init"])
            .arg(dir.path().join(name))
            .output()
            .expect("ca init");
        assert!(made.status.success());
    }
    let pem = |ca: &str, f: &str| dir.path().join(ca).join(f).display().to_string();
    let out = check_config(
        dir.path(),
        "mismatch.toml",
        &format!(
            "[intercept]\nhosts = [\"api.openai.com\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
            pem("a", "ca.pem"),
            pem("b", "ca.key")
        ),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("does not belong"),
        "{}",
        stderr_of(&out)
    );
    let out = check_config(
        dir.path(),
        "good.toml",
        &format!(
            "[intercept]\nhosts = [\"api.openai.com\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
            pem("a", "ca.pem"),
            pem("a", "ca.key")
        ),
    );
    assert!(out.status.success(), "{}", stderr_of(&out));
}

/// Before: a CA key of mode 0644 passed `--check` without a word.
#[test]
fn check_warns_about_a_ca_key_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["ca", "init"])
        .arg(dir.path().join("ca"))
        .output()
        .expect("sluice ca init");
    assert!(made.status.success());
    let (cert, key) = (dir.path().join("ca/ca.pem"), dir.path().join("ca/ca.key"));
    let config = format!(
        "[intercept]\nhosts = [\"api.example.test\"]\nca_cert = \"{}\"\nca_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let private = check_config(dir.path(), "private.toml", &config);
    assert!(private.status.success(), "{}", stderr_of(&private));
    assert!(
        !stderr_of(&private).contains("warning"),
        "{}",
        stderr_of(&private)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let open = check_config(dir.path(), "open.toml", &config);
    assert!(open.status.success(), "valid, only risky");
    let err = stderr_of(&open);
    assert!(
        err.contains("warning: intercept.ca_key")
            && err.contains("0644")
            && err.contains("chmod 600"),
        "{err}"
    );
}
