//! stream-processor's integration tests, one binary: the real test broker, processors as child
//! processes, the real ingest-api over HTTP.

mod cli;
mod clocks;
mod exactly_once;
mod harness;
mod scale_out;
