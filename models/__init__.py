"""BLIP retrieval model: ViT image encoder, BERT text encoder with cross-attention, losses, checkpoints."""
import install_check  # noqa: F401 - first (timm imports torchvision): a mismatched pair stops here
from models.blip_retrieval import BLIP_Retrieval, blip_retrieval, model_from_config
from models.tokenizer import init_tokenizer

__all__ = ['BLIP_Retrieval', 'blip_retrieval', 'init_tokenizer', 'model_from_config']
