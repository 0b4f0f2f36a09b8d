//! Generates the Open Inference Protocol gRPC client from `proto/open_inference.proto` (needs
//! `protoc`, which scripts/setup.sh installs).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/open_inference.proto");
    tonic_prost_build::configure()
        .build_server(false)
        // Raw tensors as `Bytes`: a request kept for a retry is shared, not copied.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .compile_protos(&["proto/open_inference.proto"], &["proto"])?;
    Ok(())
}
