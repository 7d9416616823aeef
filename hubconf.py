"""torch.hub entry points.

    model = torch.hub.load('path/to/this/repo', 'mae_encoder', checkpoint='out/checkpoint-799.pth', source='local')

returns the pretrained encoder as a timm VisionTransformer with 3 input channels (a four_channels
encoder folded, the pre-encoder and decoder dropped), no classification head, in eval mode.
"""
import models_vit
from inputs.transforms import as_hw
from run.checkpoint import load_checkpoint

dependencies = ["torch", "timm"]


def mae_encoder(checkpoint: str, img_size=None, num_classes: int = 0, global_pool: bool = False):
    """The encoder of a pretraining checkpoint (any mask method, or an official MAE one).
    img_size: default the size it was pretrained at (position embeddings are resized otherwise)."""
    ckpt = load_checkpoint(checkpoint)
    _, _, _, size, shape = models_vit.load_encoder(checkpoint, ckpt)
    model = models_vit.build_vit(models_vit.timm_name(shape), img_size=as_hw(img_size or size),
                                 num_classes=num_classes, global_pool=global_pool)
    models_vit.load_pretrained_encoder(model, checkpoint, fold_mask_channel=True, checkpoint=ckpt)
    return model.eval()
