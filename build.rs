//! Compiles the Open Inference Protocol's gRPC messages (src/grpc/inference.proto)
//! into Rust types with prost. protox parses the file in Rust: no `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "src/grpc/inference.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["src/grpc"])?;
    prost_build::Config::new()
        .bytes(["."])
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
