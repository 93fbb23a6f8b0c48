//! Rebuild the embedded migrator when a migration file is added or changed (`sqlx::migrate!`
//! reads the folder at compile time).
fn main() {
    println!("cargo:rerun-if-changed=.");
}
