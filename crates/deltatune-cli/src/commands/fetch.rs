use std::path::PathBuf;

use anyhow::Result;

/// `deltatune fetch`: the default models and data into the cache.
pub fn fetch(cache: Option<PathBuf>) -> Result<()> {
    let cache = cache
        .or_else(|| std::env::var_os("DELTATUNE_CACHE").map(PathBuf::from))
        .unwrap_or_else(crate::settings::home_cache_dir);
    let convert = |onnx: &std::path::Path, dir: &std::path::Path| {
        deltatune_models::vit::convert_dinov2_onnx(onnx, dir)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let f = deltatune_data::assets::fetch_all(&cache, &convert, &mut |m| eprintln!("{m}"))?;
    println!("model:   {}", f.model_dir.display());
    println!("data:    {}", f.data_dir.display());
    println!("decoder: {}", f.decoder_gguf.display());
    println!("decoder: {}", f.gemma3_gguf.display());
    println!("g2p:     {}", f.g2p_dir.display());
    println!("vision:  {}", f.vision_dir.display());
    println!("images:  {}", f.fashion_mnist_dir.display());
    Ok(())
}
