//! The root package only carries end-to-end tests (`tests/`) and benchmarks (`benches/`).
