//! Settings helpers shared by the services.

use clap::Parser;

/// A service's settings at their defaults, reading neither the command line nor the process
/// environment (for tests and benchmarks: a variable set in the shell cannot leak into them).
pub fn defaults<T: Parser>() -> T {
    let cmd = T::command().mut_args(|a| a.env(None::<&str>));
    let name = cmd.get_name().to_owned();
    let matches = cmd.get_matches_from([name]);
    T::from_arg_matches(&matches).expect("every setting has a default")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Parser)]
    struct Demo {
        /// Bound to PATH, which every test process has.
        #[arg(long, env = "PATH", default_value = "unset")]
        search: String,
    }

    #[test]
    fn defaults_ignore_the_environment() {
        assert_ne!(
            Demo::parse_from(["demo"]).search,
            "unset",
            "clap reads the environment"
        );
        assert_eq!(defaults::<Demo>().search, "unset", "defaults do not");
    }
}
