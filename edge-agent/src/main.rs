fn main() {
    println!("fwdllm-agent {}", env!("CARGO_PKG_VERSION"));
}
