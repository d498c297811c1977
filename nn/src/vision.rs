//! Images as token sequences: the patch layout shared by the ViT-VQGAN and the contrastive
//! image tower.

use burn::tensor::Tensor;

/// `[batch, channels, grid*patch, grid*patch]` -> `[batch, grid*grid, patch*patch*channels]`,
/// tokens in raster order.
pub fn patchify(images: Tensor<4>, patch: usize) -> Tensor<3> {
    let [batch, channels, height, _] = images.dims();
    let grid = height / patch;
    images
        .reshape([batch, channels, grid, patch, grid, patch])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([batch, grid * grid, patch * patch * channels])
}

/// The inverse of [`patchify`] for a square `grid`.
pub fn unpatchify(patches: Tensor<3>, patch: usize, grid: usize) -> Tensor<4> {
    let [batch, _, values] = patches.dims();
    let channels = values / (patch * patch);
    patches
        .reshape([batch, grid, grid, patch, patch, channels])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([batch, channels, grid * patch, grid * patch])
}
