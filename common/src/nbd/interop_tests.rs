//! The NBD server against real clients: qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio's nbd engine (DESIGN.md §5 "Clients that must work").
//!
//! A hand-written client only proves we agree with ourselves; these tests
//! prove we agree with the implementations operators use. A missing client
//! fails the test with the command that installs it (DESIGN.md §10).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::testutil::*;
use super::BlockDevice;

const MIB: usize = 1 << 20;

/// Fails (never skips) when a client is not installed.
fn require(binary: &str, package: &str) -> String {
    let path = format!("/usr/bin/{binary}");
    if Path::new(&path).exists() {
        return path;
    }
    if let Ok(out) = Command::new("which").arg(binary).output() {
        let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !found.is_empty() {
            return found;
        }
    }
    panic!(
        "NBD interop test needs `{binary}`, which is not installed; \
         install it with: sudo apt-get install -y {package}"
    );
}

/// Runs a client with a timeout and returns its output; fails on a
/// non-zero exit with everything it printed.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let started = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{desc} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{desc} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn qemu_io_writes_and_verifies_a_pattern() {
    let qemu_io = require("qemu-io", "qemu-utils");
    let dev = MemDevice::new(16 * MIB, false);
    let srv = TestServer::start(vec![("disk0", dev.clone())]);
    let out = run(
        Command::new(&qemu_io)
            .args(["-f", "raw", &srv.uri("disk0")])
            .args(["-c", "write -P 0xab 0 1M"])
            .args(["-c", "read -P 0xab 0 1M"])
            .args(["-c", "write -z 1M 64k"])
            .args(["-c", "read -P 0 1M 64k"])
            .args(["-c", "aio_write -P 0xcd 2M 4k"])
            .args(["-c", "aio_flush"])
            .args(["-c", "flush"])
            .args(["-c", "read -P 0xcd 2M 4k"]),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(!t.contains("Pattern verification failed"), "{t}");
    assert!(!t.contains("error"), "{t}");
    let contents = dev.contents();
    assert!(contents[..MIB].iter().all(|&b| b == 0xab));
    assert!(contents[2 * MIB..2 * MIB + 4096].iter().all(|&b| b == 0xcd));
}

#[test]
fn qemu_io_over_unix_socket_and_read_only_view() {
    let qemu_io = require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let view = MemDevice::new(4 * MIB, true);
    view.fill(0, &[0x42u8; 65536]);
    let registry = Arc::new(MapRegistry {
        exports: vec![("m1/disk0@latest".to_string(), view as Arc<dyn BlockDevice>)],
    });
    let shutdown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handle = super::serve_unix(listener, registry, shutdown.clone());

    let uri = format!("nbd+unix:///m1/disk0@latest?socket={}", sock.display());
    let out = run(
        Command::new(&qemu_io)
            .args(["-r", "-f", "raw", &uri])
            .args(["-c", "read -P 0x42 0 64k"])
            .args(["-c", "read -P 0 64k 64k"]),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(!t.contains("Pattern verification failed"), "{t}");

    // Opening the read-only view for writing must fail.
    let out = Command::new(&qemu_io)
        .args(["-f", "raw", &uri, "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(
        !out.status.success(),
        "qemu-io opened a read-only view for writing: {t}"
    );

    shutdown.store(true, std::sync::atomic::Ordering::SeqCst);
    handle.join().unwrap();
}

#[test]
fn qemu_img_info_reports_the_size() {
    let qemu_img = require("qemu-img", "qemu-utils");
    let srv = TestServer::start(vec![("disk0", MemDevice::new(16 * MIB, false))]);
    let out = run(
        Command::new(&qemu_img).args(["info", "-f", "raw", &srv.uri("disk0")]),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(t.contains("16777216 bytes"), "{t}");
}

#[test]
fn nbdinfo_lists_exports_and_describes_one() {
    let nbdinfo = require("nbdinfo", "libnbd-bin");
    let srv = TestServer::start(vec![
        ("disk0", MemDevice::new(16 * MIB, false)),
        ("m1/disk1@latest", MemDevice::new(8 * MIB, true)),
    ]);
    let out = run(
        Command::new(&nbdinfo).args(["--list", &format!("nbd://{}", srv.addr)]),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(t.contains("disk0"), "{t}");
    assert!(t.contains("m1/disk1@latest"), "{t}");

    let out = run(
        Command::new(&nbdinfo).arg(srv.uri("m1/disk1@latest")),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(t.contains("8388608"), "{t}");
    assert!(t.contains("is_read_only: true"), "{t}");
    assert!(t.contains("block_size_minimum: 512"), "{t}");
    assert!(t.contains("block_size_maximum: 33554432"), "{t}");

    let out = run(
        Command::new(&nbdinfo).args(["--size", &srv.uri("disk0")]),
        TIMEOUT,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16777216");
}

#[test]
fn nbdcopy_round_trips_a_disk() {
    let nbdcopy = require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let back = dir.path().join("back.img");
    let mut data = vec![0u8; 8 * MIB];
    Rng(12345).fill(&mut data);
    // Leave a zero region so nbdcopy exercises its zeroing path too.
    data[3 * MIB..4 * MIB].fill(0);
    std::fs::write(&src, &data).unwrap();

    let dev = MemDevice::new(8 * MIB, false);
    dev.fill(3 * MIB, &[0xffu8; MIB]);
    let srv = TestServer::start(vec![("disk0", dev.clone())]);
    run(
        Command::new(&nbdcopy).args([src.to_str().unwrap(), &srv.uri("disk0")]),
        TIMEOUT,
    );
    assert!(
        dev.contents() == data,
        "export differs from the source file"
    );
    run(
        Command::new(&nbdcopy).args([&srv.uri("disk0"), back.to_str().unwrap()]),
        TIMEOUT,
    );
    assert!(std::fs::read(&back).unwrap() == data, "copy back differs");
}

#[test]
fn fio_randwrite_with_verify() {
    let fio = require("fio", "fio");
    let file = tempfile::tempfile().unwrap();
    let dev = FileDevice::new(file, 16 * MIB as u64).unwrap();
    let srv = TestServer::start(vec![("disk0", dev)]);
    let started = Instant::now();
    let out = run(
        Command::new(&fio).args([
            "--name=rebound",
            "--ioengine=nbd",
            &format!("--uri={}", srv.uri("disk0")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
        ]),
        TIMEOUT,
    );
    let t = text(&out);
    assert!(!t.contains("verify:"), "{t}");
    assert!(!t.contains("bad magic"), "{t}");
    assert!(t.contains("err= 0"), "{t}");
    // Every block written was read back and checked.
    assert!(t.contains("issued rwts: total=2048,2048,"), "{t}");
    eprintln!("fio finished in {:?}", started.elapsed());
}
