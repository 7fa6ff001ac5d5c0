//! End-to-end measurements on throwaway clusters, always side by side with PostgreSQL's own
//! tools in the same run (the machines are noisy: ratios count, not absolute times).

pub mod capture;
pub mod workload;
