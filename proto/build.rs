//! Generates the gRPC code from `proto/rebound.proto` (data plane) and
//! `proto/control.proto` (control plane) with a vendored protoc,
//! so a fresh machine builds with cargo alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the env now.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto/rebound.proto");
    println!("cargo:rerun-if-changed=proto/control.proto");
    tonic_prost_build::configure()
        // A frame is a few MiB: as `Bytes` the agent sends it from a buffer
        // it reuses, and the PS and the MT take it from the decode buffer
        // without a copy.
        .bytes(".rebound.v1.IngestRequest.frame")
        .bytes(".rebound.v1.ApplyRequest.frame")
        .compile_protos(&["proto/rebound.proto", "proto/control.proto"], &["proto"])?;
    Ok(())
}
