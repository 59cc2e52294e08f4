//! End-to-end scenarios across Tandem's services.
//!
//! The scenarios drive every service as its own process (`tandem serve`) on a throwaway
//! nats-server and PostgreSQL from `tandem-testkit`, and the same scenarios against
//! `tandem standalone`. They arrive with the service behaviours they exercise; the foundation's
//! own process-level checks (each service booting on PostgreSQL and NATS, the standalone mode's
//! health, reflection and shutdown) live in `crates/cli/tests`, beside the binary they run.
