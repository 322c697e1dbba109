//! Compiles the Open Inference Protocol's gRPC messages (src/grpc/inference.proto) and
//! the OTLP trace messages braid exports (src/trace/otlp.proto) into Rust types with
//! prost. protox parses the files in Rust: no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["src/grpc/inference.proto", "src/trace/otlp.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let descriptors = protox::compile(protos, ["src/grpc", "src/trace"])?;
    prost_build::Config::new()
        .bytes(["."])
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
