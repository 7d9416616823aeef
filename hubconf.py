"""torch.hub entry points.

    model = torch.hub.load('path/to/this/repo', 'mae_encoder', checkpoint='out/checkpoint-799.pth', source='local')

returns the pretrained encoder as a timm VisionTransformer with 3 input channels (a four_channels
encoder folded, the pre-encoder and decoder dropped), no classification head, in eval mode.
"""
dependencies = ["torch", "timm"]


def mae_encoder(checkpoint: str, img_size=None, num_classes: int = 0, global_pool: bool = False):
    """The encoder of a pretraining checkpoint (any mask method, or an official MAE one).
    img_size: default the size it was pretrained at (position embeddings are resized otherwise)."""
    import models_vit
    from tools.export import load_encoder, timm_name
    from util.checkpoint import load_checkpoint
    from util.checkpoint_adapt import load_pretrained_encoder
    from util.transforms import as_hw
    ckpt = load_checkpoint(checkpoint)
    _, _, _, size, shape = load_encoder(checkpoint, ckpt)
    model = models_vit.build_vit(timm_name(shape), img_size=as_hw(img_size or size), num_classes=num_classes,
                                 global_pool=global_pool)
    load_pretrained_encoder(model, checkpoint, fold_mask_channel=True, checkpoint=ckpt)
    return model.eval()
