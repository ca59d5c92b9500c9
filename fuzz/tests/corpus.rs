//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through
//! every target on stable, so a decoder change that breaks an input the
//! fuzzer once found interesting fails the normal test suite.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list the corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the corpus {} is empty", dir.display());
    for file in files {
        let data = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("cannot read corpus file {}: {e}", file.display()));
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("fuzz target {target} failed on {}: {what}", file.display());
        }
    }
}

macro_rules! corpus_tests {
    ($($target:ident),* $(,)?) => {
        $(
            #[test]
            fn $target() {
                replay(stringify!($target), rebound_fuzz::$target);
            }
        )*
    };
}

corpus_tests!(
    nbd_handshake,
    nbd_request,
    frame,
    undo_journal,
    ps_segment,
    point_catalog,
    dirty_log,
    enrollment,
    control,
);

#[test]
fn every_target_has_a_corpus_test() {
    assert_eq!(
        rebound_fuzz::TARGETS.len(),
        9,
        "add the new target to corpus_tests!"
    );
}
