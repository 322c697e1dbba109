//! `deploy/image/build` checks every tool it calls before it builds anything: on a
//! machine without podman it says so and stops, instead of building and then exiting
//! 127 with no word. Driven with stub tools on a PATH of its own (no buildah needed).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A PATH holding a logging stub for each of `tools` and the real programs a bash
/// script needs to start; returns the PATH and the log every stub appends its name to.
fn stub_path(dir: &Path, tools: &[&str]) -> (String, std::path::PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.join("calls.log");
    for tool in tools {
        let stub = bin.join(tool);
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho {tool} >> {}\nexit 0\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The script's own plumbing (dirname, sed, head) comes from the system.
    for real in [
        "bash", "env", "dirname", "head", "sed", "git", "cat", "rm", "mkdir",
    ] {
        for at in ["/usr/bin", "/bin"] {
            let p = Path::new(at).join(real);
            if p.exists() {
                let _ = std::os::unix::fs::symlink(&p, bin.join(real));
                break;
            }
        }
    }
    (bin.display().to_string(), log)
}

#[test]
fn a_missing_tool_is_named_before_anything_is_built() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/image/build");
    let fake_binary = env!("CARGO_BIN_EXE_braid");
    let all = [
        "buildah", "podman", "strip", "ldd", "awk", "sort", "mktemp", "cp", "chmod",
    ];
    for missing in ["podman", "buildah", "ldd"] {
        let dir = tempfile::tempdir().unwrap();
        let tools: Vec<&str> = all.iter().copied().filter(|t| *t != missing).collect();
        let (path, log) = stub_path(dir.path(), &tools);
        let out = std::process::Command::new(format!("{path}/bash"))
            .args([script, "--binary", fake_binary])
            .env_clear()
            .env("PATH", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{missing}: {stderr}");
        assert!(
            stderr.contains("missing") && stderr.contains(missing),
            "{missing}: {stderr}"
        );
        // Nothing was built or run first.
        let calls = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(calls.is_empty(), "{missing}: called {calls}");
    }
}
