fn main() {
    println!("fwdllm-aggregator {}", env!("CARGO_PKG_VERSION"));
}
