//! ingest-proxy's integration tests, one binary: the proxy on port 0 against the real test
//! broker (scripts/broker), its router called without a socket, and the binary itself.

mod cli;
mod helpers;
mod hostile;
mod proxy;
mod routes;
