//! The README's first command, `rebound demo`, is part of the suite: it must
//! pass on a fresh machine and print its summary.

use rebound_tests::binary;

#[test]
fn rebound_demo_passes_and_prints_its_summary() {
    let out = std::process::Command::new(binary("rebound").unwrap())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rebound demo failed:\n{stdout}\n{stderr}"
    );
    for line in [
        "Rebound demo summary",
        "recovery points verified by blake3 : 5",
        "tag-to-applied lag",
        "demo passed",
    ] {
        assert!(
            stdout.contains(line),
            "demo output lacks {line:?}:\n{stdout}"
        );
    }
}
