//! The Debian packages and systemd units: what `cargo deb` builds lands
//! where docs/DEPLOY.md says, and every unit passes `systemd-analyze verify`.
//!
//! The packages are built by scripts/test (`cargo deb`) before the suite
//! runs; without them this test fails and says so, it never skips.

use rebound_lab::Bins;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (package, binary, component) of each daemon package.
const DAEMONS: [(&str, &str, &str); 4] = [
    ("rebound-agent", "rebound-agent", "agent"),
    ("rebound-ps", "rebound-ps", "ps"),
    ("rebound-mt", "rebound-mt", "mt"),
    ("rebound-cs", "rebound-cs", "cs"),
];
/// The operator CLI's package and binary.
const CLI: (&str, &str) = ("rebound", "rebound");

/// `target/debian`, beside the directory of the built binaries.
fn debian_dir() -> PathBuf {
    let bins = Bins::locate().unwrap();
    bins.dir
        .parent()
        .map(|t| t.join("debian"))
        .unwrap_or_else(|| PathBuf::from("target/debian"))
}

/// The newest `<package>_*.deb` in `dir`.
fn find_deb(dir: &Path, package: &str) -> PathBuf {
    let prefix = format!("{package}_");
    let newest = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with(&prefix) && n.ends_with(".deb")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
    match newest {
        Some(e) => e.path(),
        None => panic!(
            "no {package}_*.deb in {}: the packages are built by scripts/test \
             (`cargo deb -p <crate>`); run scripts/test, or build them the way it does",
            dir.display()
        ),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Extracts every package into one root (`dpkg -x`) and each package's
/// control files into `control/<package>` (`dpkg -e`).
fn install(root: &Path, control: &Path) {
    let dir = debian_dir();
    std::fs::create_dir_all(control).unwrap();
    let packages = DAEMONS.iter().map(|d| d.0).chain([CLI.0]);
    for package in packages {
        let deb = find_deb(&dir, package);
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(root));
        run(Command::new("dpkg")
            .arg("-e")
            .arg(&deb)
            .arg(control.join(package)));
    }
}

fn assert_stripped(bin: &Path) {
    let sections = run(Command::new("readelf").args(["-S", "--wide"]).arg(bin));
    // Debug info and the symbol table go; `.debug_gdb_scripts` (rustc's
    // pretty-printer hook, a few bytes) is not debug info.
    let debug: Vec<&str> = sections
        .lines()
        .filter(|l| {
            (l.contains(" .debug_") && !l.contains(" .debug_gdb_scripts"))
                || l.contains(" .symtab ")
        })
        .collect();
    assert!(
        debug.is_empty(),
        "{} is not stripped: {debug:?}",
        bin.display()
    );
}

fn assert_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{} is not in the package: {e}", path.display()));
    assert!(
        meta.is_file() && meta.permissions().mode() & 0o111 != 0,
        "{} is not an executable file",
        path.display()
    );
}

#[test]
fn packages_put_every_file_where_the_docs_say() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, control) = (tmp.path().join("root"), tmp.path().join("control"));
    install(&root, &control);

    for (package, bin, component) in DAEMONS {
        let bin = root.join("usr/bin").join(bin);
        assert_executable(&bin);
        assert_stripped(&bin);
        let unit = root.join(format!("lib/systemd/system/rebound-{component}.service"));
        assert!(unit.is_file(), "{package}: no {}", unit.display());
        let example = format!("/etc/rebound/{component}.toml.example");
        let text = std::fs::read_to_string(root.join(&example[1..]))
            .unwrap_or_else(|e| panic!("{package}: no {example}: {e}"));
        assert!(
            text.contains("[tls]"),
            "{package}: {example} is not the example config"
        );
        // Only the example under /etc: the package never writes the config.
        assert!(
            !root.join(format!("etc/rebound/{component}.toml")).exists(),
            "{package} installs a live config"
        );
        let ctl = control.join(package);
        for script in ["postinst", "prerm", "postrm"] {
            assert_executable(&ctl.join(script));
            run(Command::new("sh").arg("-n").arg(ctl.join(script)));
        }
        let conffiles = std::fs::read_to_string(ctl.join("conffiles")).unwrap_or_default();
        assert!(
            conffiles.lines().any(|l| l == example),
            "{package}: {example} is not a conffile: {conffiles:?}"
        );
        let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
        assert!(
            !postinst.contains("systemctl start") && !postinst.contains("systemctl enable"),
            "{package}: the postinst starts or enables the unit"
        );
    }
    let cli = root.join("usr/bin").join(CLI.1);
    assert_executable(&cli);
    assert_stripped(&cli);
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, control) = (tmp.path().join("root"), tmp.path().join("control"));
    install(&root, &control);
    // The units' dependencies (network-online.target, …) come from the
    // host's systemd; ExecStart's binaries from the packages.
    let units = root.join("lib/systemd/system");
    for host_dir in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        let Ok(entries) = std::fs::read_dir(host_dir) else {
            continue;
        };
        for e in entries.flatten() {
            let to = units.join(e.file_name());
            if e.file_type().is_ok_and(|t| t.is_file()) && !to.exists() {
                let _ = std::fs::copy(e.path(), to);
            }
        }
    }
    for (package, _, component) in DAEMONS {
        let unit = format!("rebound-{component}.service");
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", root.display()))
            .arg(&unit)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run systemd-analyze (the Debian package systemd has it): {e}")
            });
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{package}: systemd-analyze verify {unit} failed: {stderr}"
        );
        // Unknown keys and bad values are only warnings: none allowed.
        assert!(
            !stderr.contains("rebound-"),
            "{package}: systemd-analyze verify {unit} warns: {stderr}"
        );
        let text = std::fs::read_to_string(units.join(&unit)).unwrap();
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=30",
            "Restart=on-failure",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
        ] {
            assert!(text.lines().any(|l| l == line), "{unit} lacks {line}");
        }
        for path in [
            format!("ConditionPathExists=/etc/rebound/{component}.toml"),
            format!("ConditionPathExists=/etc/rebound/tls/{component}.pem"),
            format!("ReadWritePaths=/var/lib/rebound/{component}"),
            format!(
                "ExecStart=/usr/bin/rebound-{component} run --config /etc/rebound/{component}.toml"
            ),
        ] {
            assert!(text.lines().any(|l| l == path), "{unit} lacks {path}");
        }
        let user = if component == "agent" {
            "User=root"
        } else {
            "User=rebound"
        };
        assert!(text.lines().any(|l| l == user), "{unit} lacks {user}");
    }
}
