// Rebuild when a migration is added: `sqlx::migrate!` embeds the files of
// migrations/postgres at compile time (the SQLite ones via include_str!).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
