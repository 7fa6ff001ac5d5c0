fn main() -> std::process::ExitCode {
    walshift::cli::main()
}
