//! The `peerwire` command.

fn main() {
    println!("peerwire {}", env!("CARGO_PKG_VERSION"));
}
