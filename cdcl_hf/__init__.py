"""cdcl-hf: Cross-Domain Consistency Learning for batch-robust embeddings of high-content screens.

Importing the package registers the CDCL classes with transformers' Auto classes, so that
`AutoModel.from_pretrained(...)` and `AutoImageProcessor.from_pretrained(...)` use the installed code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_cdcl import CDCLConfig
from .image_processing_cdcl import CDCLImageProcessor
from .modeling_cdcl import CDCLModel, CDCLPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(CDCLConfig.model_type, CDCLConfig, exist_ok=True)
AutoModel.register(CDCLConfig, CDCLModel, exist_ok=True)
AutoImageProcessor.register(CDCLConfig, image_processor_classes={"pil": CDCLImageProcessor}, exist_ok=True)

# save_pretrained copies these classes' files (and their single-dot imports) into the checkpoint and writes
# auto_map, so that a machine without cdcl-hf loads it with trust_remote_code=True.
CDCLConfig.register_for_auto_class()
CDCLModel.register_for_auto_class("AutoModel")
CDCLImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["CDCLConfig", "CDCLModel", "CDCLPreTrainedModel", "CDCLImageProcessor", "__version__"]
