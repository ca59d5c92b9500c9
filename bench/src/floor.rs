//! The least CPU a replicated byte can cost on this machine, from the same
//! run's limit rows: the passes the design makes every byte take (hashes,
//! compression, the gRPC mTLS hops, the durable writes), each at the cost
//! its limit row measured. Dividing the machine's cores by that floor gives
//! the most any implementation of the design could reach here, which is
//! what a figure below its goal is measured against.
//!
//! Only passes the design requires are counted, so the true floor is
//! higher: receiving NBD writes, the PS's own check of each frame, the MT's
//! undo records, reading the source and every copy are left out.

use crate::profiles::Profile;
use crate::Bench;

/// One counted pass: what it is, and its cores per 100 MB/s of churn.
pub struct Part {
    pub what: String,
    pub cores: f64,
}

/// A floor: the passes, their sum, and the cores of the machine.
pub struct Floor {
    pub parts: Vec<Part>,
    pub machine_cores: f64,
}

impl Part {
    fn new(what: impl Into<String>, cores: f64) -> Part {
        Part {
            what: what.into(),
            cores,
        }
    }
}

impl Floor {
    /// Cores per 100 MB/s, all passes together.
    pub fn per_100_mb(&self) -> f64 {
        self.parts.iter().map(|p| p.cores).sum()
    }

    /// The most MB/s the machine's cores allow at this floor.
    pub fn ceiling_mb_s(&self) -> f64 {
        self.machine_cores / self.per_100_mb().max(1e-9) * 100.0
    }

    /// "blake3 x2 0.049 + ... = 0.84 cores per 100 MB/s".
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|p| format!("{} {:.3}", p.what, p.cores))
            .collect();
        format!(
            "{} = {:.3} cores per 100 MB/s",
            parts.join(" + "),
            self.per_100_mb()
        )
    }
}

/// Which measurement of each limit row a floor is built from. The host's
/// speed moves within a run, not only between runs, so the rows a floor
/// needs are measured again right after the figure it stands beside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// Section 1's rows.
    Limits,
    /// The re-measurement after the figure (section 1's where a row was not
    /// measured again).
    Again,
    /// Per row, the faster rate or the lower cost of section 1's
    /// measurement and the latest re-measurement: the most generous floor
    /// of the two, so a ceiling from it assumes a machine at least as fast
    /// as it was at either time.
    Best,
}

/// A limit row as `at` asks. `better` picks between two measurements:
/// `f64::max` for a rate, `f64::min` for a cost.
pub fn limit(b: &Bench, id: &str, at: At, better: fn(f64, f64) -> f64) -> Option<f64> {
    pick(b.value(id), b.value_again(id), at, better)
}

/// [`limit`] over section 1's value and the re-measured one; a value that
/// is not positive was not measured.
fn pick(
    first: Option<f64>,
    again: Option<f64>,
    at: At,
    better: fn(f64, f64) -> f64,
) -> Option<f64> {
    let first = first.filter(|v| *v > 0.0);
    let again = again.filter(|v| *v > 0.0);
    match (at, first, again) {
        (At::Limits, f, _) => f,
        (At::Again, f, a) => a.or(f),
        (At::Best, Some(f), Some(a)) => Some(better(f, a)),
        (At::Best, f, a) => f.or(a),
    }
}

/// A rate row (MB/s) as cores per 100 MB/s.
fn rate_cost(b: &Bench, id: &str, at: At) -> Option<f64> {
    Some(100.0 / limit(b, id, at, f64::max)?)
}

/// The limit rows every floor uses, as cores per 100 MB/s.
struct Costs {
    blake3: f64,
    hop: f64,
    write: f64,
}

fn costs(b: &Bench, at: At) -> Option<Costs> {
    Some(Costs {
        blake3: rate_cost(b, "limits.blake3", at)?,
        hop: limit(b, "limits.cpu.grpc_hop", at, f64::min)?,
        write: limit(b, "limits.cpu.durable_write", at, f64::min)?,
    })
}

/// zstd-1's ratio on a 2 MiB frame of the text-like profile, as the limits
/// row measures it.
fn text_ratio() -> Option<f64> {
    let frame = Profile::Text.pool(2 << 20);
    let packed = zstd::bulk::compress(&frame, 1).ok()?;
    Some(frame.len() as f64 / packed.len().max(1) as f64)
}

fn machine_cores() -> f64 {
    std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
}

/// Compressible churn: the agent writes its disk, hashes the frame and
/// sends it (hop 1); the PS compresses it, writes it to its cache and
/// forwards it compressed (hop 2); the MT decompresses it, checks its hash
/// and writes the replica.
pub fn text_churn(b: &Bench, at: At) -> Option<Floor> {
    let c = costs(b, at)?;
    let compress = rate_cost(b, "limits.zstd.text.compress", at)?;
    let decompress = rate_cost(b, "limits.zstd.text.decompress", at)?;
    let ratio = text_ratio()?;
    Some(Floor {
        parts: vec![
            Part::new("zstd-1 compress", compress),
            Part::new("decompress", decompress),
            Part::new("blake3 x2", 2.0 * c.blake3),
            Part::new(
                format!("gRPC hops 1 + 1/{ratio:.2}"),
                c.hop * (1.0 + 1.0 / ratio),
            ),
            Part::new(
                format!("durable writes 2 + 1/{ratio:.2}"),
                c.write * (2.0 + 1.0 / ratio),
            ),
        ],
        machine_cores: machine_cores(),
    })
}

/// A full sync of incompressible data: the agent hashes each chunk to
/// compare it with the replica's and hashes the frame; two gRPC hops; the
/// PS's cache and the replica are written durably; the MT checks the hash.
pub fn full_sync(b: &Bench, at: At) -> Option<Floor> {
    let c = costs(b, at)?;
    Some(Floor {
        parts: vec![
            Part::new("blake3 x3", 3.0 * c.blake3),
            Part::new("gRPC hops x2", 2.0 * c.hop),
            Part::new("durable writes x2", 2.0 * c.write),
        ],
        machine_cores: machine_cores(),
    })
}

#[cfg(test)]
mod tests {
    use super::{pick, At};

    #[test]
    fn best_takes_the_faster_rate_and_the_lower_cost() {
        let (first, again) = (Some(200.0), Some(120.0));
        assert_eq!(pick(first, again, At::Limits, f64::max), Some(200.0));
        assert_eq!(pick(first, again, At::Again, f64::max), Some(120.0));
        assert_eq!(pick(first, again, At::Best, f64::max), Some(200.0));
        assert_eq!(pick(first, again, At::Best, f64::min), Some(120.0));
    }

    #[test]
    fn a_row_not_measured_again_falls_back_to_section_1() {
        assert_eq!(pick(Some(0.2), None, At::Again, f64::min), Some(0.2));
        assert_eq!(pick(Some(0.2), None, At::Best, f64::min), Some(0.2));
        assert_eq!(pick(Some(0.2), Some(0.0), At::Best, f64::min), Some(0.2));
        assert_eq!(pick(None, None, At::Best, f64::min), None);
    }
}
