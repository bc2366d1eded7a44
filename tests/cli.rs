//! End-to-end tests of the CLI on the shared sample (filled below).
