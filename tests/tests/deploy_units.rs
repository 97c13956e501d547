//! What a board gets from `apt install ./fwdllm-*.deb`: the systemd units pass
//! `systemd-analyze verify` and keep their hardening, the units and the packaging metadata
//! agree with each other (config path, binary, unit name), and — when a package has been
//! built by `cross/build.sh amd64` — the .deb holds the right files with the right modes,
//! marks the config as a conffile and enables the unit without starting it.
//!
//! Building a release .deb here would cost a release llama.cpp build, so the package
//! itself is inspected only if `cross/out/amd64/` already has one; everything else is
//! checked statically.

use std::path::{Path, PathBuf};
use std::process::Command;

const DAEMONS: [Daemon; 2] = [
    Daemon {
        package: "fwdllm-agent",
        crate_dir: "edge-agent",
        config: "agent.toml",
    },
    Daemon {
        package: "fwdllm-aggregator",
        crate_dir: "aggregator",
        config: "aggregator.toml",
    },
];

struct Daemon {
    package: &'static str,
    crate_dir: &'static str,
    config: &'static str,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn unit_path(d: &Daemon) -> PathBuf {
    repo()
        .join("systemd")
        .join(format!("{}.service", d.package))
}

fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!(
            "SKIP: systemd-analyze not installed (scripts/setup.sh installs the systemd package)"
        );
    }
    found.then_some("systemd-analyze")
}

/// The unit with `/usr/bin/` pointed at stub executables in `dir`: `verify` insists the
/// ExecStart= binaries exist, and the packaged ones are only on a board.
fn unit_with_stub_binaries(d: &Daemon, dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let stub = bin.join(d.package);
    std::fs::write(&stub, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let unit = std::fs::read_to_string(unit_path(d)).unwrap();
    let path = dir.join(format!("{}.service", d.package));
    std::fs::write(
        &path,
        unit.replace("/usr/bin/", &format!("{}/", bin.display())),
    )
    .unwrap();
    path
}

/// `systemd-analyze <args> <unit>` on the unit of `d` with stub binaries.
fn analyze_unit(analyze: &str, d: &Daemon, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_stub_binaries(d, dir.path());
    Command::new(analyze)
        .args(args)
        .arg(&unit)
        .output()
        .unwrap()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    for d in &DAEMONS {
        let out = analyze_unit(analyze, d, &["verify", "--man=no"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            d.package
        );
    }
}

#[test]
fn units_keep_their_hardening_score() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    for d in &DAEMONS {
        // --offline: judge the file alone, no running systemd needed (containers, CI).
        let out = analyze_unit(analyze, d, &["security", "--offline=true"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let level: f64 = stdout
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: no exposure level in:\n{stdout}", d.package));
        println!("{}: systemd-analyze security exposure {level}", d.package);
        // 1.1 when written; anything above 2.0 means a protection was dropped.
        assert!(
            level <= 2.0,
            "{}: exposure {level} > 2.0:\n{stdout}",
            d.package
        );
    }
}

#[test]
fn units_are_notify_services_that_validate_the_packaged_config_first() {
    for d in &DAEMONS {
        let unit = std::fs::read_to_string(unit_path(d)).unwrap();
        let config = format!("/etc/fwdllm/{}", d.config);
        assert_eq!(unit_values(&unit, "Type"), ["notify"], "{}", d.package);
        assert_eq!(
            unit_values(&unit, "Restart"),
            ["on-failure"],
            "{}",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "WatchdogSec").len(),
            1,
            "{}: WatchdogSec",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "ExecStartPre"),
            [format!("/usr/bin/{} validate --config {config}", d.package)],
            "{}",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "ExecStart"),
            [format!("/usr/bin/{} run --config {config}", d.package)],
            "{}",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "LoadCredential"),
            ["mqtt-password", "mqtt-tls-key"],
            "{}",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "StateDirectory"),
            [d.package],
            "{}",
            d.package
        );
        assert_eq!(
            unit_values(&unit, "ConfigurationDirectory"),
            ["fwdllm"],
            "{}",
            d.package
        );
        assert_eq!(unit_values(&unit, "UMask"), ["0077"], "{}", d.package);
    }
}

fn deb_metadata(d: &Daemon) -> toml::Table {
    let manifest = repo().join(d.crate_dir).join("Cargo.toml");
    let doc: toml::Table = toml::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    doc["package"]["metadata"]["deb"]
        .as_table()
        .unwrap_or_else(|| panic!("{}: no deb metadata", d.package))
        .clone()
}

#[test]
fn package_metadata_ships_binary_config_and_enabled_unit() {
    for d in &DAEMONS {
        let deb = deb_metadata(d);
        let crate_dir = repo().join(d.crate_dir);
        assert_eq!(deb["name"].as_str(), Some(d.package));
        assert!(
            deb["depends"].as_str().unwrap().contains("$auto"),
            "{}: Depends must be computed",
            d.package
        );

        let assets: Vec<(String, String, String)> = deb["assets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let a = a.as_array().unwrap();
                let s = |i: usize| a[i].as_str().unwrap().to_owned();
                (s(0), s(1), s(2))
            })
            .collect();
        for (src, _, _) in &assets {
            if src.starts_with("target/release/") {
                continue;
            }
            let present = match src.rsplit_once("/*") {
                // A glob such as "tasks/*.toml" must match at least one file.
                Some((dir, suffix)) => std::fs::read_dir(crate_dir.join(dir))
                    .map(|entries| {
                        entries.filter_map(Result::ok).any(|e| {
                            e.file_name().to_string_lossy().ends_with(suffix) && e.path().is_file()
                        })
                    })
                    .unwrap_or(false),
                None => crate_dir.join(src).is_file(),
            };
            assert!(present, "{}: asset {src} does not exist", d.package);
        }
        let find = |dest: &str| {
            assets
                .iter()
                .find(|(_, dst, _)| dst == dest)
                .unwrap_or_else(|| panic!("{}: no asset for {dest}", d.package))
        };
        let (src, _, mode) = find("usr/bin/");
        assert_eq!(
            (src.as_str(), mode.as_str()),
            (format!("target/release/{}", d.package).as_str(), "755")
        );
        // The config holds no secrets (those come through LoadCredential=), but it must
        // not be writable by anyone but root.
        let (src, _, mode) = find(&format!("etc/fwdllm/{}", d.config));
        assert_eq!(
            (src.as_str(), mode.as_str()),
            (format!("../systemd/{}.toml", d.package).as_str(), "644")
        );

        let units = deb["systemd-units"].as_table().unwrap();
        assert_eq!(units["unit-name"].as_str(), Some(d.package));
        assert_eq!(
            units["enable"].as_bool(),
            Some(true),
            "{}: unit must be enabled",
            d.package
        );
        assert_eq!(
            units["start"].as_bool(),
            Some(false),
            "{}: unit must not start before configuration",
            d.package
        );
        let unit_dir = crate_dir.join(units["unit-scripts"].as_str().unwrap());
        assert!(unit_dir.join(format!("{}.service", d.package)).is_file());
        // Without maintainer-scripts cargo-deb silently generates no enable/disable scripts;
        // ours adds the stop-on-removal that start = false leaves out.
        let scripts = crate_dir.join(
            deb["maintainer-scripts"]
                .as_str()
                .expect("maintainer-scripts unset"),
        );
        let prerm = std::fs::read_to_string(scripts.join("prerm")).unwrap();
        assert!(
            prerm.contains(&format!("deb-systemd-invoke stop {}.service", d.package)),
            "{prerm}"
        );
        assert!(
            prerm.contains("#DEBHELPER#"),
            "{}: prerm lacks the #DEBHELPER# token",
            d.package
        );
    }
}

fn built_deb(d: &Daemon) -> Option<PathBuf> {
    let dir = repo().join("cross/out/amd64");
    let found = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with(&format!("{}_", d.package)) && name.ends_with("_amd64.deb")
        });
    if found.is_none() {
        println!(
            "SKIP: no {} .deb in {} (build one with `make deb`)",
            d.package,
            dir.display()
        );
    }
    found
}

#[test]
fn built_amd64_package_installs_the_right_files() {
    for d in &DAEMONS {
        let Some(deb) = built_deb(d) else { continue };
        let root = tempfile::tempdir().unwrap();
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(root.path())
            .status()
            .unwrap();
        assert!(status.success());
        let control = root.path().join("DEBIAN");
        let status = Command::new("dpkg-deb")
            .arg("-e")
            .arg(&deb)
            .arg(&control)
            .status()
            .unwrap();
        assert!(status.success());

        let mode = |rel: &str| {
            let meta = std::fs::metadata(root.path().join(rel))
                .unwrap_or_else(|e| panic!("{}: {rel}: {e}", d.package));
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777
        };
        assert_eq!(mode(&format!("usr/bin/{}", d.package)), 0o755);
        assert_eq!(mode(&format!("etc/fwdllm/{}", d.config)), 0o644);
        let unit_rel = ["lib/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .map(|dir| format!("{dir}/{}.service", d.package))
            .find(|p| root.path().join(p).is_file())
            .unwrap_or_else(|| panic!("{}: unit not in package", d.package));
        assert_eq!(mode(&unit_rel), 0o644);
        assert_eq!(
            std::fs::read(root.path().join(&unit_rel)).unwrap(),
            std::fs::read(unit_path(d)).unwrap(),
            "{}: packaged unit differs from systemd/ (rebuild with `make deb`)",
            d.package
        );

        let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
        assert!(
            conffiles
                .lines()
                .any(|l| l == format!("/etc/fwdllm/{}", d.config)),
            "{conffiles}"
        );
        let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
        assert!(
            postinst.contains(&format!(
                "deb-systemd-helper enable '{}.service'",
                d.package
            )) || postinst.contains(&format!("deb-systemd-helper enable {}.service", d.package)),
            "{postinst}"
        );
        assert!(
            !postinst.contains("invoke-rc.d")
                && !postinst.contains("systemctl --system start")
                && !postinst.contains("deb-systemd-invoke start"),
            "{}: postinst starts the unit:\n{postinst}",
            d.package
        );
        let prerm = std::fs::read_to_string(control.join("prerm")).unwrap();
        assert!(
            prerm.contains(&format!("deb-systemd-invoke stop {}.service", d.package)),
            "{prerm}"
        );
        let fields = std::fs::read_to_string(control.join("control")).unwrap();
        assert!(
            fields
                .lines()
                .any(|l| l.starts_with("Depends:") && l.contains("libc6")),
            "{fields}"
        );
    }
}
