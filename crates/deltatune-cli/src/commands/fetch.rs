use std::path::PathBuf;

use anyhow::Result;

/// `deltatune fetch`: the default model and data into the cache.
pub fn fetch(cache: Option<PathBuf>) -> Result<()> {
    let cache = cache
        .or_else(|| std::env::var_os("DELTATUNE_CACHE").map(PathBuf::from))
        .unwrap_or_else(crate::settings::home_cache_dir);
    let f = deltatune_data::assets::fetch_defaults(&cache, &mut |m| eprintln!("{m}"))?;
    println!("model: {}", f.model_dir.display());
    println!("data:  {}", f.data_dir.display());
    Ok(())
}
