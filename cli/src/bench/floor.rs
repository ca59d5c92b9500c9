//! The least CPU a replicated byte can cost on this machine, from the same
//! run's limit rows: the passes the design makes every byte take (hashes,
//! compression, the gRPC mTLS hops, the durable writes), each at the cost
//! its limit row measured. Dividing the machine's cores by that floor gives
//! the most any implementation of the design could reach here, which is
//! what a figure below its goal is measured against (issue 4, done-means 3).
//!
//! Only passes the design requires are counted, so the true floor is
//! higher: receiving NBD writes, the PS's own check of each frame, the MT's
//! undo records, reading the source and every copy are left out.

use super::profiles::Profile;
use super::Bench;

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

/// The limit rows a floor is built from, as cores per 100 MB/s.
struct Costs {
    blake3: f64,
    hop: f64,
    write: f64,
}

fn costs(b: &Bench) -> Option<Costs> {
    let v = |id: &str| b.value(id).filter(|v| *v > 0.0);
    Some(Costs {
        blake3: 100.0 / v("limits.blake3")?,
        hop: v("limits.cpu.grpc_hop")?,
        write: v("limits.cpu.durable_write")?,
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
pub fn text_churn(b: &Bench) -> Option<Floor> {
    let c = costs(b)?;
    let v = |id: &str| b.value(id).filter(|v| *v > 0.0);
    let compress = 100.0 / v("limits.zstd.text.compress")?;
    let decompress = 100.0 / v("limits.zstd.text.decompress")?;
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
pub fn full_sync(b: &Bench) -> Option<Floor> {
    let c = costs(b)?;
    Some(Floor {
        parts: vec![
            Part::new("blake3 x3", 3.0 * c.blake3),
            Part::new("gRPC hops x2", 2.0 * c.hop),
            Part::new("durable writes x2", 2.0 * c.write),
        ],
        machine_cores: machine_cores(),
    })
}
