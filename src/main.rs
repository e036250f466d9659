#[global_allocator]
static ALLOC: tessera::alloc::Allocator = tessera::alloc::Allocator;

fn main() -> std::process::ExitCode {
    tessera::cli::main()
}
