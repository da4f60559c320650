use std::path::PathBuf;

use anyhow::Result;

/// `deltatune fetch`: the default models and data into the cache.
pub fn fetch(cache: Option<PathBuf>) -> Result<()> {
    let cache = cache
        .or_else(|| std::env::var_os("DELTATUNE_CACHE").map(PathBuf::from))
        .unwrap_or_else(crate::settings::home_cache_dir);
    let f = deltatune_data::assets::fetch_all(&cache, &mut |m| eprintln!("{m}"))?;
    println!("model:   {}", f.model_dir.display());
    println!("data:    {}", f.data_dir.display());
    println!("decoder: {}", f.decoder_gguf.display());
    println!("g2p:     {}", f.g2p_dir.display());
    println!("images:  {}", f.fashion_mnist_dir.display());
    Ok(())
}
