//! `fqvit-cli doctor`: what libtorch sees.

pub(crate) fn run() -> anyhow::Result<()> {
    println!("tch:       0.24.0 (PyTorch 2.11.0)");
    println!(
        "cuda:      {}",
        if tch::Cuda::is_available() { "available" } else { "not available" }
    );
    println!("gpus:      {}", tch::Cuda::device_count());
    println!("cudnn:     {}", tch::Cuda::cudnn_is_available());
    println!("threads:   {}", tch::get_num_threads());
    Ok(())
}
