//! One module per subcommand, each with `run(args) -> anyhow::Result<()>`.

pub(crate) mod bench;
pub(crate) mod bench_table;
pub(crate) mod convert;
pub(crate) mod doctor;
pub(crate) mod eval;
pub(crate) mod quantize;
pub(crate) mod shared;
