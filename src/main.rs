use std::process::ExitCode;

/// mimalloc instead of the system allocator: a proxied request allocates
/// and frees many small buffers (headers, body chunks, futures), which cost
/// glibc's malloc about a fifth of the request's CPU in profiles.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    tollgate::cli::main().await
}
