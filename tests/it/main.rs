//! fm's integration tests: one test binary (`autotests = false` in Cargo.toml), one module per
//! area, all sharing the fixture in `util` (the test broker, the `fm` command builder).
//! Run them with scripts/test, or `eval "$(scripts/broker start)"` then `cargo test`.

mod util;

// One line per area, sorted (cargo fmt --check reorders them otherwise).
mod concurrency;
mod consume;
mod docs;
mod exec;
mod failover;
mod faults;
mod fuzz;
mod hostile;
mod ops;
mod packaging;
mod plugin;
mod publish;
mod python;
mod record;
mod resilience;
mod rpc;
mod smoke;
mod spool;
mod tls;
mod transaction;
mod worker;
