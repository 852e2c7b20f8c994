//! fm's integration tests: one test binary (`autotests = false` in Cargo.toml), one module per
//! area, all sharing the fixture in `util` (the test broker, the `fm` command builder).
//! Run them with scripts/test, or `eval "$(scripts/broker start)"` then `cargo test`.

mod util;

mod consume;
mod smoke;
mod ops;
mod exec;
mod faults;
mod tls;
mod failover;
mod worker;
