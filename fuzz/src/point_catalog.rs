//! The recovery-point catalog `points.log` (master-target/src/catalog.rs)
//! as the MT loads it on start, with and without repairing a torn tail.
//!
//! The first byte chooses: `% 3 == 0`, the bytes are the file as found;
//! `% 3 == 1`, each line the input gives is prefixed with its valid
//! checksum (most lines then reach the JSON decoder); `% 3 == 2`, lines are
//! points written from the input's fields, some damaged afterwards.

use rebound_mt::catalog;

use crate::input::Input;
use crate::scratch::Scratch;

pub fn point_catalog(data: &[u8]) {
    let mut input = Input::new(data);
    let file = match input.u8() % 3 {
        0 => input.rest().to_vec(),
        1 => summed_lines(input.rest()),
        _ => points(&mut input),
    };
    let scratch = Scratch::with("points.log", &file);
    let found = catalog::load(scratch.path(), false).expect("a readable catalog loads");
    assert_eq!(
        scratch.read(),
        file,
        "loading without repair changed the file"
    );
    assert!(
        found.windows(2).all(|w| w[0].seq <= w[1].seq),
        "points are not in seq order"
    );

    // Every point loaded writes back to a line that loads as the same point.
    let one = Scratch::new("one-point.log");
    for p in &found {
        let json = serde_json::to_string(p).expect("a point serializes");
        let mut line = summed(json.as_bytes());
        line.push(b'\n');
        one.write(&line);
        let back = catalog::load(one.path(), false).expect("a readable catalog loads");
        assert_eq!(
            back,
            std::slice::from_ref(p),
            "a point does not round trip through its line"
        );
    }

    // Repair keeps every point and leaves a prefix of the file that loads
    // the same without anything left to repair.
    let repaired = catalog::load(scratch.path(), true).expect("a readable catalog repairs");
    assert_eq!(repaired, found, "repair changed the points");
    let after = scratch.read();
    assert!(
        file.starts_with(&after),
        "repair did not cut the file to a prefix"
    );
    assert!(
        after.is_empty() || after.ends_with(b"\n"),
        "repair left a torn line"
    );
    assert_eq!(catalog::load(scratch.path(), false).expect("reload"), found);
}

/// `<16 hex digits of blake3(json)> <json>` as the catalog writes lines.
fn summed(json: &[u8]) -> Vec<u8> {
    let sum = blake3::hash(json).to_hex();
    let mut line = sum.as_bytes()[..16].to_vec();
    line.push(b' ');
    line.extend_from_slice(json);
    line
}

/// The input's lines, each with a valid checksum.
fn summed_lines(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut lines = text.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        out.extend_from_slice(&summed(line));
        if lines.peek().is_some() {
            out.push(b'\n');
        }
    }
    out
}

/// Lines of points from the input's fields, with the damage it asks for.
fn points(input: &mut Input<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut n = 0;
    while !input.is_empty() && n < 32 {
        n += 1;
        let op = input.u8();
        match op % 5 {
            0 if !out.is_empty() => {
                let at = usize::from(input.u16()) % out.len();
                out[at] ^= input.u8() | 1;
                continue;
            }
            1 => {
                let keep = out.len().saturating_sub(usize::from(input.u8()) + 1);
                out.truncate(keep);
                continue;
            }
            _ => {}
        }
        let id_len = usize::from(input.u8() % 16);
        let id = String::from_utf8_lossy(input.take(id_len)).into_owned();
        let kind = ["crash", "app", "shutdown", ""][usize::from(input.u8() % 4)];
        let mut json = serde_json::json!({
            "id": id,
            "kind": kind,
            "time_ms": input.u64(),
            "seq": input.u64(),
            "group": if op & 0x80 != 0 { "g" } else { "" },
            "interval": input.u64(),
        });
        if op & 0x40 != 0 {
            // The MT's own time of the cut, in catalogs that record it.
            json["cut_ms"] = input.u64().into();
        }
        out.extend_from_slice(&summed(json.to_string().as_bytes()));
        out.push(b'\n');
    }
    out
}
