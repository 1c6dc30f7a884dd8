//! ingest-api's integration tests, one binary: the application on port 0 with a real SQLite
//! file, its router called without a socket, and the binary itself.

mod api;
mod cli;
mod helpers;
mod hostile;
mod routes;
